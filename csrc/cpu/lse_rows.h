// The per-row steps that the lse/gather epilogues (csrc/cpu/lse_gather_epilogue.cpp: forward and backward)
// and the fused lse/gather loss (csrc/cpu/lse_gather_loss_epilogue.cpp) share, on one row held in a
// per-thread scratch z of the accumulation type F (float, or double for fp64 logits).
#pragma once

#include <cmath>
#include <cstdint>

#include "row_kernels.h"

namespace opd {
namespace cpu {
namespace {

// Statistics of a row: z = transform(raw) into the scratch, the shift m = max z (finite_shift: 0 for a
// row of -inf logits, whose L is then -inf as torch.logsumexp's), e = exp(z - m) into the second scratch,
// d = sum_v e_v, L = m + log d.
template <class F>
struct RowLse {
  F m, d;
  double L;
};

template <class T, class F>
RowLse<F> row_lse(const T* raw, F* z, F* e, int64_t V, Transform t) {
  const F m = finite_shift(load_transform(raw, z, V, t));
  const F d = sum_exp(z, e, V, m);
  return {m, d, double(m) + std::log(double(d))};
}

// H = L - sum_v p_v z_v, from the statistics and exponentials of row_lse.
template <class F>
double row_entropy(const F* z, const F* e, int64_t V, const RowLse<F>& s) {
  return double(entropy_value<M>(entropy_sum(z, e, V, s.m), s.d));
}

// The gradient of g_lse L + sum_j g_j z_{ids_j} + g_ent H with respect to the raw logits, written over the
// row (the forward's z must still be in the scratch):
//     row_v = dz_v/draw_v * ( p_v (g_lse - g_ent (log p_v + H)) + sum_j g_j [v = ids_j] )
// p_v = e_v * inv_d from row_lse's exponentials when `e` is given (inv_d = 1 / d of the same row), else
// exp(z_v - L). g may be null (no gathered part). The ids are added one by one, so duplicate ids
// accumulate; an id outside [0, V) (its gathered value was NaN) is never written.
template <class T, class F, class G>
void write_lse_gather_grad(const F* z, const F* e, F inv_d, int64_t V, F L, F H, F g_lse, F g_ent, Transform t,
                           const int64_t* ids, const G* g, int64_t k, T* row) {
  if (e != nullptr) {
    lse_entropy_grad_row<true>(z, e, V, L, inv_d, H, g_lse, g_ent, t, row);
  } else {
    lse_entropy_grad_row<false>(z, e, V, L, inv_d, H, g_lse, g_ent, t, row);
  }
  for (int64_t j = 0; g != nullptr && j < k; ++j) {
    const int64_t v = ids[j];
    if (!id_in_range(v, V)) continue;
    row[v] = static_cast<T>(static_cast<F>(row[v]) + F(g[j]) * transform_grad(z[v], t));
  }
}

}  // namespace
}  // namespace cpu
}  // namespace opd
