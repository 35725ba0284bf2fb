"""Benchmark cases: which op, at which shape and dtype, and the random inputs that go with it.

A case is one point of a table or one point of a sweep. Inputs are drawn so that the logits look like a
language model's (standard-normal hidden states, lm_head rows scaled so that logits have a standard
deviation of ``LOGIT_STD``): that keeps softmaxes peaked as in practice, which matters for the Triton
backend's gradient filtering, and keeps every exp() finite in bf16/fp16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch

#: the ops the suite knows, in the order tables list them
OPS = ("linear_divergence", "linear_logprobs", "linear_topk_divergence", "logits_divergence",
       "linear_sampled_token_opd_loss")
MODES = ("fwd+bwd", "fwd")
LOGIT_STD = 4.0
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class Case:
    """One measured configuration.

    ``H`` is the student hidden size (the hidden size for single-model ops), ``H_t`` the teacher's
    (linear_divergence only), ``k`` the number of teacher top-k ids (linear_topk_divergence only).
    ``mode`` is "fwd+bwd" (loss and student gradients) or "fwd" (no autograd graph, e.g. the teacher-side
    log-prob gather). ``name`` labels named cases (by their shape) and ``sweep`` the swept axis ("N"/"V").
    ``token_weights``: linear_divergence / linear_topk_divergence called with per-token float weights.
    """
    op: str
    N: int
    H: int
    V: int
    dtype: str = "fp32"
    device: str = "cpu"
    H_t: Optional[int] = None
    k: int = 0
    divergence: str = "reverse_kl"
    mode: str = "fwd+bwd"
    name: str = ""
    sweep: str = ""
    beta: float = 0.5
    token_weights: bool = False

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {OPS}, got {self.op!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype: expected 'fp32', 'bf16' or 'fp16', got {self.dtype!r}")
        if min(self.N, self.V) < 1 or (self.H < 1 and self.op != "logits_divergence"):
            raise ValueError(f"N, H, V: expected >= 1 (H unused by logits_divergence), got N={self.N} "
                             f"H={self.H} V={self.V}")
        if self.op == "linear_topk_divergence" and not 1 <= self.k <= self.V:
            raise ValueError(f"k: expected 1 <= k <= V={self.V} for linear_topk_divergence, got {self.k}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def teacher_hidden(self) -> int:
        return self.H_t if self.H_t is not None else self.H

    @property
    def label(self) -> str:
        """Short human-readable description used in tables and plot titles."""
        shape = f"N={self.N}" + (f" H={self.H}" if self.op != "logits_divergence" else "") + (f" H_t={self.H_t}" if self.op == "linear_divergence" else "")
        shape += f" V={self.V}" + (f" k={self.k}" if self.op == "linear_topk_divergence" else "")
        div = f" {self.divergence}" if self.op in ("linear_divergence", "linear_topk_divergence",
                                                     "logits_divergence") else ""
        div += " token_weights" if self.token_weights else ""
        return f"{self.op}{div} {self.mode} {self.dtype} {shape}"

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)


def make_inputs(case: Case, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Fresh random inputs for ``case`` on its device. Student-side tensors require grad in "fwd+bwd".

    Keys per op:
      linear_divergence:      hs (N, H), Ws (V, H), ht (N, H_t), Wt (V, H_t)
      linear_logprobs:        h (N, H), W (V, H), targets (N,) int64
      linear_topk_divergence: hs (N, H), Ws (V, H), ids (N, k) int64 distinct per row, teacher_lp (N, k) fp32
      logits_divergence:      zs (N, V), zt (N, V)
      linear_sampled_token_opd_loss: h (N, H), W (V, H), targets (N,) int64, teacher_lp (N,), sampler_lp (N,)
    ``token_weights=True`` adds tw (N,) fp32 in [0, 2).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev, dt = case.torch_device, case.torch_dtype
    grad = case.mode == "fwd+bwd"

    def hidden(n, h):
        return torch.randn(n, h, generator=g).to(dev, dt)

    def lm_head(v, h):
        return (torch.randn(v, h, generator=g) * (LOGIT_STD / h ** 0.5)).to(dev, dt)

    extra = {"tw": (torch.rand(case.N, generator=g) * 2.0).to(dev)} if case.token_weights else {}
    if case.op == "linear_divergence":
        hs, Ws = hidden(case.N, case.H), lm_head(case.V, case.H)
        ht, Wt = hidden(case.N, case.teacher_hidden), lm_head(case.V, case.teacher_hidden)
        return {"hs": hs.requires_grad_(grad), "Ws": Ws.requires_grad_(grad), "ht": ht, "Wt": Wt, **extra}
    if case.op == "linear_sampled_token_opd_loss":
        h, W = hidden(case.N, case.H), lm_head(case.V, case.H)
        targets = torch.randint(0, case.V, (case.N,), generator=g).to(dev)
        # sampled-token log-probs of LM-like magnitude; the sampler slightly off the student (off-policy ratio)
        teacher_lp = -torch.rand(case.N, generator=g) * 6.0
        sampler_lp = -torch.rand(case.N, generator=g) * 6.0
        return {"h": h.requires_grad_(grad), "W": W.requires_grad_(grad), "targets": targets,
                "teacher_lp": teacher_lp.to(dev), "sampler_lp": sampler_lp.to(dev)}
    if case.op == "linear_logprobs":
        h, W = hidden(case.N, case.H), lm_head(case.V, case.H)
        targets = torch.randint(0, case.V, (case.N,), generator=g).to(dev)
        return {"h": h.requires_grad_(grad), "W": W.requires_grad_(grad), "targets": targets}
    if case.op == "linear_topk_divergence":
        hs, Ws = hidden(case.N, case.H), lm_head(case.V, case.H)
        # k distinct ids per row in O(N k): ids_j = (a_n + j * s) mod V with a random offset a_n and a
        # stride s coprime to V (so j -> ids_j is injective for j < V).
        stride = 7919
        while math.gcd(stride, case.V) != 1:
            stride += 2
        offsets = torch.randint(0, case.V, (case.N, 1), generator=g)
        ids = (offsets + torch.arange(case.k) * stride) % case.V
        # teacher log-probs of a peaked distribution whose top-k mass is < 1 (non-empty tail bucket)
        scores = torch.randn(case.N, case.k + 1, generator=g) * 2.0
        teacher_lp = torch.log_softmax(scores, dim=-1)[:, :case.k]
        return {"hs": hs.requires_grad_(grad), "Ws": Ws.requires_grad_(grad), "ids": ids.to(dev),
                "teacher_lp": teacher_lp.to(dev), **extra}
    # logits_divergence: raw logits of the two models, as an inference engine or an HF forward returns them
    zs = (torch.randn(case.N, case.V, generator=g) * LOGIT_STD).to(dev, dt)
    zt = (torch.randn(case.N, case.V, generator=g) * LOGIT_STD).to(dev, dt)
    return {"zs": zs.requires_grad_(grad), "zt": zt}


def grad_leaves(inputs: Dict[str, torch.Tensor]):
    """The inputs that receive gradients, in a fixed order (empty in "fwd" mode)."""
    return [(k, t) for k, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad]


def clear_grads(inputs: Dict[str, torch.Tensor]) -> None:
    for _, t in grad_leaves(inputs):
        t.grad = None
