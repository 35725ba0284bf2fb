// The per-row steps that the CUDA lse/gather epilogues (csrc/cuda/lse_gather_epilogue.cu: forward and
// backward) and the fused lse/gather loss (csrc/cuda/lse_gather_loss_epilogue.cu) share, one thread block
// per row - the CUDA counterpart of csrc/cpu/lse_rows.h. The row stays in global memory (raw logits of
// type T) and is read once per pass; the math is opd_math.h's, in fp32.
#pragma once

#include "row_access.cuh"

namespace opd {
namespace cuda {

// Statistics of a row of raw logits, z = transform(raw): the shift m = max z (finite_shift: 0 for a row
// of -inf logits, whose lse is then -inf as torch.logsumexp's), d = sum_v e^(z_v - m) and, with
// `entropy`, ey = sum_v e y (entropy_term, y = z - m). Block reductions: every thread gets m and d, and
// ey when `entropy` (0 otherwise). `smem` holds 32 floats.
struct RowLse {
  float m, d, ey;
};

template <class T>
__device__ __forceinline__ RowLse row_lse(const T* row, int64_t V, bool vec, const Transform& tr, bool entropy,
                                          float* smem) {
  using M = CudaMath;
  float m = -INFINITY;
  row_foreach1(row, V, vec, [&](float x) { m = fmaxf(m, transform<M>(x, tr)); });
  m = finite_shift(block_reduce<true>(m, smem));
  float d = 0.0f, ey = 0.0f;
  row_foreach1(row, V, vec, [&](float x) {
    const float y = transform<M>(x, tr) - m;
    const float e = M::exp(y);
    d += e;
    ey += entropy_term(e, y);
  });
  d = block_reduce<false>(d, smem);
  ey = entropy ? block_reduce<false>(ey, smem) : 0.0f;
  return {m, d, ey};
}

// The dense part of the gradient of g_lse L + g_ent H with respect to the raw logits, written over the
// row (every thread of the block):
//     row_v = dz_v/draw_v * p_v (g_lse - g_ent (log p_v + H)),   log p_v = z_v - L.
// The gathered part (sum_j g_j [v = ids_j]) is added afterwards by add_staged_at_ids.
template <class T>
__device__ __forceinline__ void write_lse_entropy_grad(T* row, int64_t V, bool vec, const Transform& tr, float L,
                                                       float H, float g_lse, float g_ent) {
  using M = CudaMath;
  row_map1(row, V, vec, [&](float x) {
    const float z = transform<M>(x, tr);
    const float lp = z - L;
    return lse_entropy_grad(M::exp(lp), lp, H, g_lse, g_ent) * transform_grad(z, tr);
  });
}

// row[ids_j] += staged_j for j < k, by the calling thread alone (thread 0, after a __syncthreads that
// makes the row's gradient writes visible), one id at a time: duplicate ids accumulate without atomics.
// An id outside [0, V) (OPD_CHECK_IDS=0; its staged value is 0 and its log-prob NaN) is never written.
template <class T>
__device__ __forceinline__ void add_staged_at_ids(T* row, int64_t V, const int64_t* ids, const float* staged,
                                                  int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    if (id_in_range(ids[j], V)) row[ids[j]] = from_float<T>(to_float(row[ids[j]]) + staged[j]);
  }
}

}  // namespace cuda
}  // namespace opd
