"""FLOPs of every model call the study makes, by formula (matrix products only).

For a Llama decoder with hidden H, intermediate I, L layers, vocabulary V (every head a query and a
key/value head, so the q, k, v, o projections are all H x H), one forward over the positions
``start .. start + n - 1`` of a sequence (earlier positions come from the KV cache) costs::

    L * (n * (8 H^2 + 6 H I) + 4 H * sum_{p = start}^{start + n - 1} (p + 1))   decoder
    + 2 H V * heads                                                           lm_head rows

- ``8 H^2``: the q, k, v and o projections (2 FLOPs per multiply-add, 4 matrices of H x H);
- ``6 H I``: the SwiGLU MLP (gate, up and down projections of H x I);
- ``4 H (p + 1)``: causal attention at position p: q.k over p + 1 keys and the weighted sum of as many
  values (2 H FLOPs each);
- ``2 H V``: one lm_head row, for each position whose logits are computed (``heads``).

Norms, RoPE, softmax, SiLU and the embedding gather are elementwise or lookups and left out. A
training step (forward + backward) is counted as 3x its forward, the usual rule (the backward
computes the gradients of both the inputs and the weights of every product).
"""
from __future__ import annotations

from .models import ModelSize


def forward_flops(size: ModelSize, vocab: int, n: int, *, start: int = 0, heads: int = 0) -> int:
    """FLOPs of one forward of one sequence over ``n`` positions after ``start`` cached ones, with
    the lm_head applied at ``heads`` of them."""
    h, i = size.hidden, size.intermediate
    keys = (start + 1 + start + n) * n // 2   # sum of (p + 1) for p in [start, start + n)
    return size.layers * (n * (8 * h * h + 6 * h * i) + 4 * h * keys) + 2 * h * vocab * heads


def generate_flops(size: ModelSize, vocab: int, batch: int, prompt_len: int, n_new: int) -> int:
    """:func:`opd_kernels.demo.models.generate`: a prefill over the prompt (lm_head at its last
    position), then ``n_new - 1`` cached one-position steps."""
    total = forward_flops(size, vocab, prompt_len, heads=1)
    for k in range(n_new - 1):
        total += forward_flops(size, vocab, 1, start=prompt_len + k, heads=1)
    return batch * total


def score_flops(size: ModelSize, vocab: int, batch: int, prompt_len: int, n_new: int) -> int:
    """A no-grad forward over ``seq[:, :-1]`` (P + n - 1 positions) with the lm_head at the n
    completion positions: the teacher's scoring pass (hidden states + the fused op's logits)."""
    return batch * forward_flops(size, vocab, prompt_len + n_new - 1, heads=n_new)


def train_flops(size: ModelSize, vocab: int, batch: int, prompt_len: int, n_new: int) -> int:
    """Forward + backward of the student over the same positions: 3x :func:`score_flops`."""
    return 3 * score_flops(size, vocab, batch, prompt_len, n_new)
