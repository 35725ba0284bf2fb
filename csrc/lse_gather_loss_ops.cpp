// Schema and CPU registration of opd::lse_gather_loss (the fused lse/gather loss of csrc/driver.cpp),
// as a fragment of the `opd` library declared in csrc/ops.cpp. The CUDA kernel is registered by
// csrc/cuda/glue.cpp; the fake (meta) implementation and autograd formula are in
// opd_kernels/backends/_lse_gather_loss.py.
#include <torch/library.h>

#include "driver.h"

TORCH_LIBRARY_FRAGMENT(opd, m) {
  // loss = sum_n weights_n values_n; values (N,) the per-row losses; for grad_mask = (hidden, weight,
  // bias) d loss / d input formed in the same pass (empty tensors for the ones not requested).
  // kind "sampled_token" (ids and teacher (N, 1); estimator "is" | "k1" | "k3"; sampler (N,) or None) or
  // "topk" (ids and teacher (N, k); divergence "reverse_kl" | "forward_kl"; tail_bucket).
  m.def(
      "lse_gather_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor teacher, "
      "Tensor? sampler, Tensor weights, str kind, str estimator, str divergence, bool tail_bucket, "
      "float kl_coef, float entropy_coef, float temperature, float? softcap, float scale, int vocab_size, "
      "bool[3] grad_mask, int chunk_rows) "
      "-> (Tensor loss, Tensor values, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(opd, CPU, m) { m.impl("lse_gather_loss", &opd::lse_gather_loss); }
