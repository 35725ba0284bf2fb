"""Every CausalLM class of the installed transformers, built from a tiny config (tests/test_hf_causal_lm_sweep.py).

``tiny_config(model_type)`` shrinks the config class's defaults (only keys the class has are overridden) and
sets the known logit transforms to non-identity values, so a reading that ignores one is visibly wrong.
``check(model_type)`` returns ``(status, detail)`` with status "ok" (the fused loss equals the loss from the
model's own ``.logits``), "refused" (``hf.distillation_loss`` raised ValueError; detail is the message),
"WRONG" (the fused loss differs: a bug), or "unbuildable" (no tiny model could be built or run; detail says why).
"""
from __future__ import annotations

import copy
import warnings

import torch

SMALL = dict(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=2,
             n_positions=64, d_model=32, n_layers=2, num_layers=2, n_heads=2, ffn_dim=64, d_ff=64,
             decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64, encoder_layers=2,
             encoder_attention_heads=2, encoder_ffn_dim=64, moe_intermediate_size=32, num_experts=4,
             n_routed_experts=4, num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
             hidden_dim=32, emb_dim=32, embed_dim=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, intermediate_dim=64,
             # gated delta-net (linear attention) layers: their chunked torch scan is the slow part
             linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2)

# Per model type: overrides on top of SMALL (found by building each; the reason is the default that broke).
OVERRIDES = {
    # mamba_n_heads must divide expand * hidden; a small state and chunk keep the pure-torch scan fast.
    "bamba": dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
                             mamba_chunk_size=16),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16),
    "codegen": dict(rotary_dim=8),                                          # rotary_dim 64 > head dim 16
    "gptj": dict(rotary_dim=8),
    "diffllama": dict(num_key_value_heads=2),                               # differential attention: even KV heads
    "dots3_note_text": dict(num_key_value_heads=2),
    "mamba2": dict(num_heads=4, head_dim=16, n_groups=1),                   # hidden * expand == heads * head_dim
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),            # one entry per layer
    "reformer": dict(is_decoder=True, attn_layers=["local", "lsh"], axial_pos_shape=[8, 8],
                     axial_pos_embds_dim=[16, 16], max_position_embeddings=64),
    "zaya": dict(num_experts_per_tok=1, num_experts=4),
    # multi-head latent attention: as many KV heads as query heads
    **{t: dict(head_dim=None, num_key_value_heads=2, n_group=1, topk_group=1)
       for t in ("axk1", "axk2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "sarvam_mla", "glm4_moe_lite",
                 "minicpm3", "youtu", "deepseek_v2")},
    "bailing_hybrid": dict(n_group=1, topk_group=1),
    # the indexer's heads must fit one key head's query heads; its pools shrunk to the tiny sequence
    "kolibri1_1": dict(index_num_heads=2, index_topk=4, index_pool_size=16, index_compression=4,
                       index_num_local_tokens=2, index_num_sink_tokens=1, sliding_window=4,
                       layer_types=["sliding_attention", "indexed_attention"]),
}

# Config keys of logit transforms, set to non-identity values where the class has them (None keeps it off).
TRANSFORMS = dict(logit_scale=0.5, logits_scaling=0.5, lm_head_multiplier=0.5, final_logit_softcapping=3.0,
                  logits_soft_cap=3.0, output_logit_soft_cap=3.0, logits_mup_width_multiplier=4.0)

MAX_PARAMS = 4_000_000


def tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    keys = set(cls().to_dict())
    kw = {k: v for k, v in SMALL.items() if k in keys}
    for k in ("layer_types", "mlp_layer_types"):
        if k in keys:
            kw[k] = None
    for k, v in TRANSFORMS.items():
        if k in keys and cls().to_dict()[k] is not None:
            kw[k] = v
    kw.update(OVERRIDES.get(model_type, {}))
    kw = {k: v for k, v in kw.items() if v is not None or k in ("layer_types", "mlp_layer_types")}
    cfg = cls(**kw)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    cfg.initializer_range = 0.1
    return cfg


def build(model_type: str, seed: int = 0):
    """A tiny randomly initialised model of ``model_type`` (eval mode), its parameters perturbed by 10%
    (multiplicatively) so constant-initialised parts (norm gains, learned logit scales) are not identities."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    if n > MAX_PARAMS:
        raise RuntimeError(f"the tiny config still has {n} parameters")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.mul_(1 + 0.1 * torch.randn_like(p))
    return model


def _logits_loss(student, teacher, ids, completion):
    import opd_kernels.reference as ref

    zs = student(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        zt = teacher(input_ids=ids, use_cache=False).logits
    v = zs.shape[-1]
    return ref.logits_divergence(zs[:, :-1].double(), zt[:, :-1, :v].double(), mask=completion[:, 1:])


def check(model_type: str, rtol: float = 1e-4):
    from opd_kernels import hf

    warnings.filterwarnings("ignore")
    try:
        student = build(model_type, seed=0)
        teacher = copy.deepcopy(student)
        with torch.no_grad():
            for p in teacher.parameters():
                if p.is_floating_point():
                    p.mul_(1 + 0.2 * torch.randn_like(p))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 120, (2, 9), generator=g)
        completion = torch.zeros_like(ids, dtype=torch.bool)
        completion[:, 4:] = True
        oracle = _logits_loss(student, teacher, ids, completion)
        oracle.backward()
        g_ref = student.get_output_embeddings().weight.grad.clone()
        student.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001 - any failure to build or run the model itself
        return "unbuildable", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        fused = hf.distillation_loss(student, teacher, ids, loss_mask=completion)
    except ValueError as e:
        return "refused", str(e)
    fused.backward()
    g = student.get_output_embeddings().weight.grad
    err = float((fused.double() - oracle).abs() / oracle.abs().clamp_min(1e-30))
    gerr = float((g.double() - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-30))
    if not (err < rtol and gerr < 10 * rtol):
        return "WRONG", f"loss rel err {err:.3g}, lm_head grad rel err {gerr:.3g}"
    return "ok", f"loss rel err {err:.2g}"


def causal_lm_types():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def new_since(families_file: str) -> list[str]:
    """The installed transformers' CausalLM model types that ``families_file`` (one per line, ``#`` comments;
    written by ``make pin``) does not list."""
    with open(families_file) as f:
        known = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    return [t for t in causal_lm_types() if t not in known]


_VERDICT = {"ok": "read correctly", "refused": "refused by name", "unbuildable": "unbuildable from a tiny config",
            "WRONG": "WRONG: builds and gives a wrong loss"}


def main(argv: list[str]) -> int:
    """``python tests/causal_lm_sweep.py [TYPE ...]`` checks the given (or every) CausalLM type;
    ``--new-since FILE`` checks those added since the pinned list. Exit status 1 if any is read wrongly."""
    import argparse
    import time
    from collections import Counter

    import transformers

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("types", nargs="*")
    p.add_argument("--new-since", metavar="FILE", help="check only the types FILE does not list")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    types = args.types or (new_since(args.new_since) if args.new_since else causal_lm_types())
    if args.new_since:
        print(f"transformers {transformers.__version__}: {len(types)} CausalLM families new since "
              f"{args.new_since}" + (":" if types else "."))
    results = {}
    for mt in types:
        t0 = time.time()
        results[mt] = check(mt)
        status, detail = results[mt]
        print(f"  {mt:28s} {_VERDICT[status]:32s} {time.time() - t0:5.1f}s  {detail[:200]}", flush=True)
    if results:
        print(dict(Counter(_VERDICT[s] for s, _ in results.values())))
    return 1 if any(s == "WRONG" for s, _ in results.values()) else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
