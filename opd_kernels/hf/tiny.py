"""Tiny randomly initialised CausalLMs built from transformers configs (tests and examples; no downloads)."""
from __future__ import annotations

import torch

# Per family: the config class name and the keyword names for (hidden, layers, heads) beyond the
# common ones. Each entry exercises a different lm_head reading (see heads.py).
FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "cohere", "gpt2", "granite")


def tiny_config(family: str, *, vocab_size: int = 131, hidden_size: int = 32, layers: int = 2, **overrides):
    """A transformers config for a ``family`` model small enough to run in milliseconds on a CPU."""
    import transformers as tf

    heads = 2
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                  max_position_embeddings=128, head_dim=hidden_size // heads)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads,
                            n_positions=128)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(**common, final_logit_softcapping=3.0, attn_logit_softcapping=50.0,
                              query_pre_attn_scalar=hidden_size // heads, sliding_window=16)
    elif family == "cohere":
        cfg = tf.CohereConfig(**common, logit_scale=0.5)
    elif family == "granite":
        cfg = tf.GraniteConfig(**common, logits_scaling=0.5)
    elif family in ("llama", "qwen2", "qwen3"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[family]
        cfg = cls(**common)
    else:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    # Keep the special ids inside the tiny vocabulary (the defaults point at real tokenizers' ids).
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    # 10x the usual init scale: random models then have peaked next-token distributions and divergences
    # of order 1, so tests compare numbers that are not all ~0.
    cfg.initializer_range = 0.2
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_causal_lm(family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   **config_kwargs) -> torch.nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` of ``family`` (eager attention, fp32 by default)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **config_kwargs)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def tiny_tokenizer(vocab_size: int = 131):
    """A whitespace word-level fast tokenizer over ``<pad> <s> </s> user assistant t5 ... t{V-1}``.

    It has a chat template, so chat-based trainers (TRL) run on tiny models without downloads. Ids match
    :func:`tiny_config`'s special ids (pad 0, bos 1, eos 2).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "user", "assistant"] + [f"t{i}" for i in range(5, vocab_size)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok
