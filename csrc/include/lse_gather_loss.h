// The fused lse/gather *loss* primitive (opd::lse_gather_loss): per row, the student's log-probs at k ids
// and a per-row loss of them whose upstream gradient is known as soon as the row's log-probs are, so the
// gradient d loss / d raw logits is written over the logits in the forward pass (docs/design.md section 4,
// "Sampled-token OPD" and "Top-k teacher"). Two losses use it:
//   - the sampled-token OPD loss (k = 1; estimators "is", "k1", "k3"; an optional entropy bonus);
//   - the top-k teacher divergence (forward / reverse KL, with or without the tail bucket).
// Both live here as __host__ __device__ inline functions: the CPU epilogue (csrc/cpu/
// lse_gather_loss_epilogue.cpp) and the CUDA one (csrc/cuda/lse_gather_loss_epilogue.cu) call the same code.
#pragma once

#include <cstdint>

#include "epilogue_args.h"
#include "opd_math.h"

namespace opd {

enum RowLossKind : int { kSampledToken = 0, kTopK = 1 };
enum Estimator : int { kEstimatorIS = 0, kEstimatorK1 = 1, kEstimatorK3 = 2 };

// What the row loss is. kl_coef / entropy_coef in double: they are the caller's Python floats.
struct RowLossSpec {
  int kind = kSampledToken;
  int estimator = kEstimatorIS;    // sampled token
  int divergence = kReverseKL;     // top-k: kReverseKL or kForwardKL
  int tail_bucket = 1;             // top-k
  double kl_coef = 1.0;            // sampled token
  double entropy_coef = 0.0;       // both: loss_n -= entropy_coef * H_n
};

// One chunk of rows. in: raw logits (rows, vocab) with row stride ld; out: values[r] = w_r-free per-row loss
// (0 where weights[r] == 0) and, when `grad` is set, the logits overwritten with
//     weights[r] * d loss_r / d raw[r, :]                                           (in the logits' dtype)
// R, the per-row scalars' type: float (fp32 / bf16 / fp16 inputs, CPU and CUDA) or double (fp64, CPU).
template <class R>
struct LseGatherLossArgsT {
  int64_t rows = 0;
  int64_t vocab = 0;
  void* logits = nullptr;        // in: raw logits; out (grad != 0): the gradient
  int64_t ld = 0;
  DType dtype = DType::kFloat32;
  Transform t{};
  const int64_t* ids = nullptr;  // (rows, k), 0 <= id < vocab
  int64_t k = 0;
  const R* teacher = nullptr;      // (rows, k): teacher log-probs at ids (sampled token: k = 1)
  const R* sampler = nullptr;      // (rows,) or null: the sampler's log-prob (sampled token only)
  const R* weights = nullptr;      // (rows,) token weights w_r (mask, reduction, normalizer, token_weights)
  R* values = nullptr;             // (rows,) per-row loss
  R* logprobs = nullptr;           // (rows, k) or null: the student log-probs q = z[ids] - lse
  float* scratch = nullptr;        // (rows, k) fp32: d loss / d q (the CUDA epilogue keeps them here)
  RowLossSpec spec{};
  int grad = 1;
  int num_threads = 1;
  void* stream = nullptr;
};
using LseGatherLossArgs = LseGatherLossArgsT<float>;
using LseGatherLossArgs64 = LseGatherLossArgsT<double>;

// ---- the per-row losses, from the student log-probs q (k of them) -----------------------------------
// Sampled token (k = 1), s = log p_s(y), t = log p_t(y), r = log p_sampler(y) (r = s, detached, without a
// sampler), ratio = exp(s - r) (detached where marked), c = kl_coef:
//     "is":  loss = ratio * c (r - t)                      d loss / d s = loss   (d ratio / d s = ratio)
//     "k1":  loss = c ratio.detach() (s - t)               d loss / d s = c ratio
//     "k3":  loss = c ratio.detach() (e^(t-s) - 1 - (t-s)) d loss / d s = c ratio (1 - e^(t-s))
// Without a sampler, "is" is c (s.detach() - t) with gradient c (s - t): the same formulas at ratio = 1.
template <class M, class F>
OPD_HD F sampled_token_loss(const RowLossSpec& spec, F s, F t, F r, F* dloss_ds) {
  const F c = F(spec.kl_coef);
  const F ratio = M::exp(s - r);
  F loss;
  if (spec.estimator == kEstimatorIS) {
    loss = ratio * c * (r - t);
    *dloss_ds = loss;
  } else if (spec.estimator == kEstimatorK1) {
    loss = c * ratio * (s - t);
    *dloss_ds = c * ratio;
  } else {
    const F lr = t - s, e = M::exp(lr);
    loss = c * ratio * (e - F(1) - lr);
    *dloss_ds = c * ratio * (F(1) - e);
  }
  return loss;
}

// Top-k, q_j = log p_s(I_j), l_j = the teacher's log-probs, e_j = exp(q_j), pl_j = exp(l_j); tails
// Q = 1 - sum e_j, P = 1 - sum pl_j, logs of max(., 1e-12) (the clamp guards the log only, like
// reference.topk_divergence_from_logprobs; its gradient is 0 where the clamp is active):
//   reverse: v = sum_j e_j (q_j - l_j) + Q (log Q~ - log P~)
//            dv/dq_j = e_j (q_j - l_j + 1) - e_j (log Q~ - log P~) - e_j [Q >= 1e-12]
//   forward: v = sum_j pl_j (l_j - q_j) + P (log P~ - log Q~)          (pl_j = 0 terms contribute 0)
//            dv/dq_j = -pl_j + P e_j / Q~ [Q >= 1e-12]
// (tail_bucket = 0 drops the tail terms and their derivatives.)
constexpr double kTailClamp = 1e-12;

// q in F, teacher log-probs l in L, dq written in D (the CUDA epilogue passes dq == q: each dq_j is
// written after the last read of q_j).
//
// The tails are formed in float64: when the top-k holds nearly all of a distribution's mass, 1 - sum
// cancels, and in fp32 its absolute error of ~1e-7 becomes a relative error of 1e-7 / P in P, which
// reaches the loss through Q log P (a teacher tail of 1e-5 put 7e-4 relative error on the loss). k
// exps per row in float64 cost nothing next to the row's V-wide pass.
template <class M, class F, class L, class D>
OPD_HD F topk_loss(const RowLossSpec& spec, const F* q, const L* l, int64_t k, D* dq) {
  double sum_e = 0, sum_pl = 0;
  F v = 0;
  for (int64_t j = 0; j < k; ++j) {
    sum_e += M::exp(static_cast<double>(q[j]));
    sum_pl += M::exp(static_cast<double>(l[j]));
    if (spec.divergence == kReverseKL) {
      v += M::exp(q[j]) * (q[j] - F(l[j]));
    } else {
      const F pl = M::exp(F(l[j]));
      if (pl > F(0)) v += pl * (F(l[j]) - q[j]);
    }
  }
  const double Q64 = 1.0 - sum_e, P64 = 1.0 - sum_pl;
  const double Qc64 = Q64 > kTailClamp ? Q64 : kTailClamp, Pc64 = P64 > kTailClamp ? P64 : kTailClamp;
  const F Q = static_cast<F>(Q64), P = static_cast<F>(P64), Qc = static_cast<F>(Qc64);
  const F log_ratio = static_cast<F>(M::log(Qc64) - M::log(Pc64));  // log Q~ - log P~
  const F q_active = Q64 >= kTailClamp ? F(1) : F(0);
  if (spec.tail_bucket) v += spec.divergence == kReverseKL ? Q * log_ratio : -P * log_ratio;
  for (int64_t j = 0; j < k; ++j) {
    const F e = M::exp(q[j]);
    F g;
    if (spec.divergence == kReverseKL) {
      g = e * (q[j] - F(l[j]) + F(1));
      if (spec.tail_bucket) g -= e * (log_ratio + q_active);
    } else {
      g = -M::exp(F(l[j]));
      if (spec.tail_bucket) g += q_active * P * e / Qc;
    }
    dq[j] = static_cast<D>(g);
  }
  return v;
}

// The epilogues (CPU: csrc/cpu/lse_gather_loss_epilogue.cpp; CUDA: csrc/cuda/lse_gather_loss_epilogue.cu).
namespace cpu {
void lse_gather_loss_epilogue(const LseGatherLossArgs& a);
void lse_gather_loss_epilogue(const LseGatherLossArgs64& a);
}  // namespace cpu
namespace cuda {
void lse_gather_loss_epilogue(const LseGatherLossArgs& a);
}  // namespace cuda

}  // namespace opd
