"""Vocabulary splits for the row-statistics kernels (divergence_fwd.py, lse.py).

A forward kernel keeps one program per token block walking the whole vocabulary; with few token blocks
(N = 4096 tokens in blocks of 64 is 64 programs for 132 H100 SMs) most of the GPU idles. Splitting each
row's vocabulary over S programs (as flash-decoding splits the keys) fixes that: each split writes its
partial online-softmax state, (k, S, N) fp32, and :func:`merge_online` combines the splits in PyTorch
(O(S N) work and memory, no host sync), in a fixed order (:func:`split_sum`): the forward gives
bitwise-equal results when repeated on the same device, with or without ``deterministic=True``.
"""
import torch
import triton


def split_vocab(n_blocks: int, vocab_size: int, block_v: int, device: torch.device, interpreted: bool):
    """(S, V_SPLIT): how many programs share one token block's vocabulary, and the columns each takes (a
    multiple of ``block_v``, so no tile straddles two splits; no split is empty). On the GPU, enough
    splits for ~2 programs per SM (1 when the token blocks alone fill it); under the interpreter 2 (when
    there are 2 vocabulary tiles), so the tests exercise the merge."""
    v_blocks = triton.cdiv(vocab_size, block_v)
    if interpreted or device.type != "cuda":
        splits = min(2, v_blocks)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(v_blocks, triton.cdiv(2 * sms, n_blocks)))
    v_split = triton.cdiv(v_blocks, splits) * block_v
    return triton.cdiv(vocab_size, v_split), v_split


def merge_online(m: torch.Tensor, *sums: torch.Tensor):
    """Merge per-split online-softmax state: the row max over splits and each running sum rescaled to it,
    ``sum_s x_s exp(m_s - m)``. A zero weight (a split with only -inf logits, or underflow) drops the
    split's term instead of multiplying it (its sum may be inf: 0 * inf would be NaN); a NaN weight (a NaN
    logit) keeps the NaN."""
    m_all = m.amax(0)
    w = torch.exp(m - shift_of(m_all))
    return (m_all,) + tuple(split_sum(torch.where(w == 0, torch.zeros_like(x), x * w)) for x in sums)


def shift_of(m: torch.Tensor) -> torch.Tensor:
    """The shift of a row's exponentials, as tiles.row_shift: its max, 0 where that is -inf."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def merge_weighted(m: torch.Tensor, d: torch.Tensor, acc: torch.Tensor):
    """(m, d, acc) merged over splits, where acc = sum e^(z - m_s) (z - m_s - x) is relative to each split's
    own max m_s (divergence_math.kl_step): moved to the row max M as acc + d (m_s - M) first
    (divergence_math.move_weighted_sum; 0 for a split with d = 0). The split holding the max moves by
    exactly 0."""
    moved = torch.where(d == 0, torch.zeros_like(acc), acc + d * (shift_of(m) - shift_of(m.amax(0))))
    return merge_online(m, d, moved)


def split_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(0)`` for (S, N) split partials, in an order fixed by S alone: a pairwise tree,
    ``x[:h] + x[h:2h]`` (h = S // 2) with an odd last row carried to the next level. Elementwise adds only
    (ceil(log2 S) of them), so the order cannot depend on how a library reduction kernel is configured
    for the device or the shape. (The max of the merge is exact in any order.)"""
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        head = x[:h] + x[h:2 * h]
        x = torch.cat([head, x[2 * h:]]) if x.shape[0] % 2 else head
    return x[0]


