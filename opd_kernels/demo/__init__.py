"""The embedded default experiment of ``opd-distill``: a real, small distillation study on a CPU.

A teacher learns 3-digit addition, a smaller student is SFT-warmed on a little data, and four
methods continue from that same student checkpoint at an equal budget of student training tokens:
dense full-vocabulary reverse-KL OPD (``opd_kernels.linear_divergence``), sampled-token OPD
(``opd_kernels.sampled_token_opd_loss``), SFT on teacher samples, and REINFORCE on the 0/1 reward.
See docs/demo.md. Entry point: :func:`opd_kernels.demo.cli.main`.
"""
