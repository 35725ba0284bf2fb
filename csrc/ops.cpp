// The `opd` operator library: schemas declared once here, CPU kernels registered here, CUDA kernels
// registered by csrc/cuda/glue.cpp when the extension is built against a CUDA torch.
//
// Python side: opd_kernels/backends/cpp.py registers each op's fake (meta) implementation and, beside it,
// its autograd formula (torch.library.register_fake / register_autograd), and packs the call's Options
// into the scalar arguments below. The convention for every op of the namespace: docs/internals.md, "Ops".
#include <torch/library.h>

#include <Python.h>

#include "driver.h"

// `import opd_kernels._C` needs a module init symbol; the module itself is empty - everything it
// provides lives in torch.ops.opd once the shared library is loaded.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "opd_kernels C++ ops (torch.ops.opd)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(opd, m) {
  // Scalar loss sum_n weights_n * divergence_n and, for grad_mask = (hidden, weight, bias), its gradients
  // computed in the same pass (empty tensors for the ones not requested).
  m.def(
      "linear_divergence(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor weights, str divergence, "
      "float beta, float temperature, float? student_softcap, float? teacher_softcap, float student_scale, "
      "float teacher_scale, int vocab_size, bool[3] grad_mask, int chunk_rows) "
      "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // Per-token divergences (N,), 0 where weights == 0 (reduction "none").
  m.def(
      "linear_divergence_values(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor teacher_hidden, Tensor teacher_weight, Tensor? teacher_bias, Tensor weights, str divergence, "
      "float beta, float temperature, float? student_softcap, float? teacher_softcap, float student_scale, "
      "float teacher_scale, int vocab_size, int chunk_rows) -> Tensor");
  // lse (N,), logits gathered at ids (N, k), entropy (N,) or (0,) when not requested.
  m.def(
      "lse_gather(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, float temperature, float? softcap, "
      "float scale, int vocab_size, bool return_entropy, int chunk_rows) "
      "-> (Tensor lse, Tensor gathered, Tensor entropy)");
  m.def(
      "lse_gather_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor lse, Tensor entropy, "
      "Tensor? grad_lse, Tensor? grad_gathered, Tensor? grad_entropy, float temperature, float? softcap, "
      "float scale, int vocab_size, bool[3] grad_mask, int chunk_rows) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // Divergence of caller-held logits: loss, per-token values, and (compute_grad) d loss / d student_logits.
  m.def(
      "logits_divergence(Tensor student_logits, Tensor teacher_logits, Tensor weights, str divergence, "
      "float beta, float temperature, int vocab_size, bool compute_grad) "
      "-> (Tensor loss, Tensor values, Tensor grad)");
  // Same, writing d loss / d student_logits over student_logits itself (nothing N x V allocated).
  m.def(
      "logits_divergence_inplace_(Tensor(a!) student_logits, Tensor teacher_logits, Tensor weights, "
      "str divergence, float beta, float temperature, int vocab_size) -> (Tensor loss, Tensor values)");
  // The fused row loss: loss = sum_n weights_n values_n, values (N,) the per-row losses; for grad_mask =
  // (hidden, weight, bias) d loss / d input formed in the same pass (empty tensors for the ones not
  // requested). kind "sampled_token" (ids and teacher (N, 1); estimator "is" | "k1" | "k3"; sampler (N,) or
  // None) or "topk" (ids and teacher (N, k); divergence "reverse_kl" | "forward_kl"; tail_bucket).
  m.def(
      "lse_gather_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor ids, Tensor teacher, "
      "Tensor? sampler, Tensor weights, str kind, str estimator, str divergence, bool tail_bucket, "
      "float kl_coef, float entropy_coef, float temperature, float? softcap, float scale, int vocab_size, "
      "bool[3] grad_mask, int chunk_rows) "
      "-> (Tensor loss, Tensor values, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(opd, CPU, m) {
  m.impl("linear_divergence", &opd::linear_divergence);
  m.impl("linear_divergence_values", &opd::linear_divergence_values);
  m.impl("lse_gather", &opd::lse_gather);
  m.impl("lse_gather_backward", &opd::lse_gather_backward);
  m.impl("logits_divergence", &opd::logits_divergence);
  m.impl("logits_divergence_inplace_", &opd::logits_divergence_inplace_);
  m.impl("lse_gather_loss", &opd::lse_gather_loss);
}
