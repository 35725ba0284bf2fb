"""The embedded study of ``opd-distill``: a toy-scale test of the published on-policy distillation claims.

A teacher (a tiny Llama, hidden 32, 2 layers) learns running sums of 6 digits (12-token answers with
every running total, ``tasks.RunningSum``) and is stopped at 90% validation accuracy, so that it
stays imperfect; a smaller student (hidden 24) is SFT-warmed to 45%. From that same student, five
methods train with the same optimizer, prompt stream and sampling seeds: dense full-vocabulary
reverse-KL OPD (``opd_kernels.linear_divergence``), sampled-token OPD
(``opd_kernels.sampled_token_opd_loss``), offline dense KD (forward KL on teacher samples), SFT on
teacher samples and REINFORCE on the 0/1 reward, over several seeds, against FLOPs
(``flops.py``) and CPU seconds. It measures forgetting of a second skill at matched accuracy and
runs a continual-learning experiment, then writes ``report.json`` with a verdict per claim
(``analysis.py``). See docs/demo.md. Entry point: :func:`opd_kernels.demo.cli.main`.
"""
