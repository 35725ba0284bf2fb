"""Triton kernels for the ``fused`` strategy (docs/design.md section 3): tile-fused lm_head + divergence.
docs/triton.md explains the design, the measurements and what has not been measured (no GPU run yet).

One file per kernel family, each short enough to read top to bottom:

- ``tiles.py``           shared ``@triton.jit`` helpers: one (tokens x vocab) logit tile through tl.dot,
                         the logit transform and its derivative, online softmax, the gradient epilogues
                         (atomic, and owner-only for the deterministic mode).
- ``divergence_math.py`` per-tile divergence arithmetic shared by the linear and the logits kernels.
- ``divergence_fwd.py``  forward of reverse_kl / forward_kl / jsd: online softmax over vocabulary tiles.
- ``divergence_bwd.py``  backward: recompute tiles, filter, form dLoss/dz, atomically accumulate dH, dW
                         (``deterministic=True``: owner programs, fixed order, no atomics).
- ``lse.py``             logsumexp + entropy of one model and its logits at given ids (forward, backward).
- ``gather.py``          logits at given ids (N, k) by per-id dot products (forward and sparse backward;
                         compiled by the compile check, not launched: lse.py takes them from its tiles).
- ``row_loss.py``        the fused row loss ``lse_gather_loss`` (sampled-token, top-k KL): gradient
                         formed in the forward from a C x V logits workspace (interpreter-tested only).
- ``logits.py``          the divergences from given logits (``logits_divergence``).
- ``splits.py``          vocabulary splits of the forward kernels and the merge of their row states.
- ``launch.py``          Python launchers: block sizes, allocation, grids.

Tools around these kernels live outside the runtime package: ``benchmarks/triton_compile_check.py``
(compiles every kernel for sm_80/sm_90 without a GPU and reports ptxas resources),
``benchmarks/triton_filter_study.py`` (the measurement behind the ``filter_eps`` default) and
``tests/triton_testing.py`` (the test modules' interpreter switch and device parameters).

Nothing here allocates an N x V (or C x V) buffer - except ``logits.py``'s backward, whose output is the
N x V_s gradient of logits the caller already holds. Per-token outputs are (N,), row statistics (STATS_ROWS, N),
split states (k, S, N), gradient accumulators fp32 copies of the inputs' shapes (N x H and V x H).

Importing ``launch`` imports triton and creates the kernels; Triton decides then whether they are
interpreted (``TRITON_INTERPRET=1``) or compiled for a GPU, and ``launch.INTERPRET`` records which.
opd_kernels.backends.triton imports it on the first kernel launch.
"""

# Rows of the divergence ops' row statistics (divergence_math.store_rows), here so that
# opd_kernels.backends.triton can shape them without importing triton.
STATS_ROWS = 6
