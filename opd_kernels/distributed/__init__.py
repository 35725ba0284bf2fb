"""Vocab-parallel (tensor-parallel lm_head) execution of the linear ops over torch.distributed.

``process_group=pg`` is an option of ``opd_kernels.linear_divergence``, ``linear_logprobs`` and
``linear_topk_divergence``: they validate, agree on the shard layout (:mod:`.shards`) and call the
primitives of :mod:`.vocab_parallel` where they would call a backend's; see docs/distributed.md.
"""
