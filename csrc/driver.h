// Device-agnostic chunk drivers of the `opd` ops: matmuls through ATen into a reused workspace, then a
// per-device epilogue looked up by the tensors' device type (CPU always; CUDA when glue registered it).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "include/epilogue_args.h"
#include "include/lse_gather_loss.h"

namespace opd {

struct EpilogueTable {
  void (*divergence)(const DivergenceArgs&);
  void (*lse_gather)(const LseGatherArgs&);
  void (*lse_gather_backward)(const LseGatherBackwardArgs&);
  void (*lse_gather_loss)(const LseGatherLossArgs&) = nullptr;  // csrc/include/lse_gather_loss.h
};

// Called once at load time by the CUDA glue (csrc/cuda/glue.cpp) when the extension has CUDA kernels.
void register_epilogues(c10::DeviceType device_type, const EpilogueTable* table);

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_divergence(
    const Tensor& student_hidden, const Tensor& student_weight, const OptTensor& student_bias,
    const Tensor& teacher_hidden, const Tensor& teacher_weight, const OptTensor& teacher_bias,
    const Tensor& weights, c10::string_view divergence, double beta, double temperature,
    c10::optional<double> student_softcap, c10::optional<double> teacher_softcap, double student_scale,
    double teacher_scale, int64_t vocab_size, std::array<bool, 3> grad_mask, int64_t chunk_rows);

Tensor linear_divergence_values(
    const Tensor& student_hidden, const Tensor& student_weight, const OptTensor& student_bias,
    const Tensor& teacher_hidden, const Tensor& teacher_weight, const OptTensor& teacher_bias,
    const Tensor& weights, c10::string_view divergence, double beta, double temperature,
    c10::optional<double> student_softcap, c10::optional<double> teacher_softcap, double student_scale,
    double teacher_scale, int64_t vocab_size, int64_t chunk_rows);

std::tuple<Tensor, Tensor, Tensor> lse_gather(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& ids,
    double temperature, c10::optional<double> softcap, double scale, int64_t vocab_size,
    bool return_entropy, int64_t chunk_rows);

std::tuple<Tensor, Tensor, Tensor> lse_gather_backward(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& ids,
    const Tensor& lse, const Tensor& entropy, const OptTensor& grad_lse, const OptTensor& grad_gathered,
    const OptTensor& grad_entropy, double temperature, c10::optional<double> softcap, double scale,
    int64_t vocab_size, std::array<bool, 3> grad_mask, int64_t chunk_rows);

std::tuple<Tensor, Tensor, Tensor> logits_divergence(
    const Tensor& student_logits, const Tensor& teacher_logits, const Tensor& weights,
    c10::string_view divergence, double beta, double temperature, int64_t vocab_size, bool compute_grad);

std::tuple<Tensor, Tensor> logits_divergence_inplace_(
    Tensor& student_logits, const Tensor& teacher_logits, const Tensor& weights,
    c10::string_view divergence, double beta, double temperature, int64_t vocab_size);

// Fused lse/gather loss (sampled-token OPD, top-k teacher): loss = sum_n weights_n values_n, per-row values
// (N,), and the gradients for grad_mask = (hidden, weight, bias) formed in the same pass.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lse_gather_loss(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& ids, const Tensor& teacher,
    const OptTensor& sampler, const Tensor& weights, c10::string_view kind, c10::string_view estimator,
    c10::string_view divergence, bool tail_bucket, double kl_coef, double entropy_coef, double temperature,
    c10::optional<double> softcap, double scale, int64_t vocab_size, std::array<bool, 3> grad_mask,
    int64_t chunk_rows);

}  // namespace opd
