"""Triton kernels for the ``fused`` strategy (DESIGN.md section 3): tile-fused lm_head + divergence.

One file per kernel family, each short enough to read top to bottom:

- ``tiles.py``          shared ``@triton.jit`` helpers: one (tokens x vocab) logit tile through tl.dot,
                        the logit transform and its derivative, and the gradient-matmul epilogue.
- ``divergence_fwd.py`` forward of reverse_kl / forward_kl / jsd: online softmax over vocab blocks.
- ``divergence_bwd.py`` backward: recompute tiles, form dLoss/dz, accumulate dH and dW with atomics.
- ``lse.py``            logsumexp + entropy of one model (forward and dense backward).
- ``gather.py``         logits at given ids (N, k) (forward and sparse backward).
- ``launch.py``         Python launchers: block sizes, output allocation, grids.

Nothing here allocates an N x V (or C x V) buffer: per-token outputs are (N,), row statistics (3, N),
gradient accumulators are fp32 copies of the inputs' shapes (N x H and V x H).

Kernels are created when this package's submodules are imported, and Triton decides *then* whether
they are interpreted (``TRITON_INTERPRET=1`` in the environment at that moment) or compiled for a GPU.
``INTERPRETED`` records which it was.
"""
