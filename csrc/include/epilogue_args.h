// Arguments of the per-device epilogues: raw pointers and sizes only (no torch, no CUDA types), so the
// same structs cross from the device-agnostic chunk driver (csrc/driver.cpp) into csrc/cpu/*.cpp and
// csrc/cuda/*.cu. Every 2-D buffer is row-major with an explicit row stride (`ld*`, in elements).
//
// Per-row scalars (token weights, values, lse, gathered logits, entropies, their upstream gradients) are of
// type R: float for fp32 / bf16 / fp16 inputs (the `...Args` names, what the CUDA epilogues take), double for
// fp64 inputs (the `...Args64` names, CPU only), so fp64 inputs keep fp64 losses end to end.
#pragma once

#include <cstdint>

#include "opd_math.h"

namespace opd {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// One chunk of rows of the full-vocabulary divergence.
//   in : student / teacher raw logits (rows, vocab), row strides ld_student / ld_teacher
//   out: values[r] = divergence of row r (R; 0 where weights[r] == 0)
//        grad (optional, may alias student): weights[r] * d value_r / d raw_student[r, :],
//        in grad_dtype; rows with weights[r] == 0 are written as zeros.
template <class R>
struct DivergenceArgsT {
  int64_t rows = 0;
  int64_t vocab = 0;
  const void* student = nullptr;
  int64_t ld_student = 0;
  DType student_dtype = DType::kFloat32;
  const void* teacher = nullptr;
  int64_t ld_teacher = 0;
  DType teacher_dtype = DType::kFloat32;
  void* grad = nullptr;
  int64_t ld_grad = 0;
  DType grad_dtype = DType::kFloat32;
  const R* weights = nullptr;
  R* values = nullptr;
  int divergence = kReverseKL;
  JsdCoefficients jsd = make_jsd_coefficients(0.5);  // beta and its logs (JSD only)
  Transform ts{};
  Transform tt{};
  int num_threads = 1;    // CPU: OpenMP threads
  void* stream = nullptr; // CUDA: cudaStream_t
};
using DivergenceArgs = DivergenceArgsT<float>;
using DivergenceArgs64 = DivergenceArgsT<double>;

// Forward of the lse/gather primitive on one chunk: lse[r], gathered[r, j] = z[r, ids[r, j]],
// entropy[r] (optional).
template <class R>
struct LseGatherArgsT {
  int64_t rows = 0;
  int64_t vocab = 0;
  const void* logits = nullptr;
  int64_t ld = 0;
  DType dtype = DType::kFloat32;
  Transform t{};
  const int64_t* ids = nullptr;  // (rows, k), 0 <= id < vocab
  int64_t k = 0;
  R* lse = nullptr;
  R* gathered = nullptr;         // (rows, k)
  R* entropy = nullptr;          // (rows,) or null
  int num_threads = 1;
  void* stream = nullptr;
};
using LseGatherArgs = LseGatherArgsT<float>;
using LseGatherArgs64 = LseGatherArgsT<double>;

// Backward of the lse/gather primitive on one chunk: overwrites the raw logits in place with
//   d/d raw [ g_lse L + sum_j g_gathered_j z_{ids_j} + g_entropy H ]
// Any of the three upstream gradients may be null (treated as zero).
template <class R>
struct LseGatherBackwardArgsT {
  int64_t rows = 0;
  int64_t vocab = 0;
  void* logits = nullptr;        // in: raw logits, out: gradient (same dtype)
  int64_t ld = 0;
  DType dtype = DType::kFloat32;
  Transform t{};
  const int64_t* ids = nullptr;
  int64_t k = 0;
  const R* lse = nullptr;
  const R* entropy = nullptr;          // needed when g_entropy is given
  const R* g_lse = nullptr;
  const R* g_gathered = nullptr;       // (rows, k)
  const R* g_entropy = nullptr;
  float* scratch = nullptr;            // (rows, k) fp32, used by the CUDA epilogue
  int num_threads = 1;
  void* stream = nullptr;
};
using LseGatherBackwardArgs = LseGatherBackwardArgsT<float>;
using LseGatherBackwardArgs64 = LseGatherBackwardArgsT<double>;

}  // namespace opd
