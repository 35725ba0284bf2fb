"""Vocab-parallel (tensor-parallel lm_head) execution of the linear ops over torch.distributed.

``process_group=pg`` is an option of ``opd_kernels.linear_divergence``, ``linear_logprobs`` and
``linear_topk_divergence``: they validate, agree on the shard layout (:mod:`.shards`) and call the
primitives of :mod:`.vocab_parallel` where they would call a backend's; see docs/distributed.md.
``opd_kernels.distributed.linear_divergence`` etc. are those same public functions (a process_group makes
them vocab-parallel), named here for callers that import them from this package.
"""

__all__ = ["linear_divergence", "linear_logprobs", "linear_topk_divergence"]


def __getattr__(name):
    # The public functions live in opd_kernels.api, which imports this package on use only: resolved
    # lazily, so importing opd_kernels.distributed does not import the API back.
    if name in __all__:
        from .. import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
