// CPU epilogue of the log-prob / gather primitive on one chunk of rows (forward and backward).
//
// Forward per row (PyTorch equivalent, z the transformed logits):
//     lse = z.logsumexp(-1);  gathered = z[ids];  entropy = lse - (z.softmax(-1) * z).sum()
// Backward per row, overwriting the raw logits with
//     d/d raw [ g_lse * lse + (g_gathered * z[ids]).sum() + g_ent * entropy ]
//   = dz/draw * ( p * (g_lse - g_ent * (log p + H)) + scatter_add(ids, g_gathered) )
#include <omp.h>

#include <memory>

#include "dtype_dispatch.h"
#include "epilogues.h"
#include "row_kernels.h"

namespace opd {
namespace cpu {
namespace {

template <class T>
void lse_gather_rows(const LseGatherArgs& a) {
  using F = typename AccType<T>::type;
  const int64_t V = a.vocab;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::unique_ptr<F[]> z(new F[V]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < a.rows; ++r) {
      // shift: the row max, 0 for a row of -inf logits (whose lse is then -inf, as torch.logsumexp's)
      const F m = finite_shift(load_transform(static_cast<const T*>(a.logits) + r * a.ld, z.get(), V, a.t));
      const F d = sum_exp(z.get(), V, m);
      a.lse[r] = static_cast<float>(m + M::log(d));
      for (int64_t j = 0; j < a.k; ++j) {
        // ids are range-checked on the host unless OPD_CHECK_IDS=0: never read outside the row, mark it NaN
        const int64_t v = a.ids[r * a.k + j];
        a.gathered[r * a.k + j] = id_in_range(v, V) ? static_cast<float>(z[v]) : NAN;
      }
      if (a.entropy) a.entropy[r] = static_cast<float>(entropy_value<M>(entropy_sum(z.get(), V, m), d));
    }
  }
}

template <class T>
void lse_gather_backward_rows(const LseGatherBackwardArgs& a) {
  using F = typename AccType<T>::type;
  const int64_t V = a.vocab;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::unique_ptr<F[]> z(new F[V]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < a.rows; ++r) {
      T* row = static_cast<T*>(a.logits) + r * a.ld;
      const F g_lse = a.g_lse ? F(a.g_lse[r]) : F(0);
      const F g_ent = a.g_entropy ? F(a.g_entropy[r]) : F(0);
      bool live = g_lse != F(0) || g_ent != F(0);
      for (int64_t j = 0; a.g_gathered && !live && j < a.k; ++j) live = a.g_gathered[r * a.k + j] != 0.0f;
      if (!live) {  // zero upstream gradient (a masked token): exact zeros, whatever NaN its logits hold
        zero_row(row, V);
        continue;
      }
      load_transform(row, z.get(), V, a.t);
      const F H = a.g_entropy ? F(a.entropy[r]) : F(0);
      lse_entropy_grad_row(z.get(), V, F(a.lse[r]), H, g_lse, g_ent, a.t, row);
      if (a.g_gathered) {
        // d z_{ids_j} / d raw_{ids_j} * g_j, added one by one so duplicate ids accumulate
        for (int64_t j = 0; j < a.k; ++j) {
          const int64_t v = a.ids[r * a.k + j];
          if (!id_in_range(v, V)) continue;  // its gathered value was NaN: nothing to write, never out of the row
          const F add = F(a.g_gathered[r * a.k + j]) * transform_grad(z[v], a.t);
          row[v] = static_cast<T>(static_cast<F>(row[v]) + add);
        }
      }
    }
  }
}

}  // namespace

void lse_gather_epilogue(const LseGatherArgs& a) {
  if (a.rows == 0) return;
  OPD_CPU_DISPATCH(a.dtype, T, [&] { lse_gather_rows<T>(a); });
}

void lse_gather_backward_epilogue(const LseGatherBackwardArgs& a) {
  if (a.rows == 0) return;
  OPD_CPU_DISPATCH(a.dtype, T, [&] { lse_gather_backward_rows<T>(a); });
}

}  // namespace cpu
}  // namespace opd
