// CPU epilogue of the log-prob / gather primitive on one chunk of rows (forward and backward).
//
// Forward per row (PyTorch equivalent, z the transformed logits):
//     lse = z.logsumexp(-1);  gathered = z[ids];  entropy = lse - (z.softmax(-1) * z).sum()
// Backward per row, overwriting the raw logits with
//     d/d raw [ g_lse * lse + (g_gathered * z[ids]).sum() + g_ent * entropy ]
//   = dz/draw * ( p * (g_lse - g_ent * (log p + H)) + scatter_add(ids, g_gathered) )
// The per-row outputs and upstream gradients are of type R (float, or double for fp64 logits).
#include <omp.h>

#include <memory>
#include <stdexcept>
#include <type_traits>

#include "dtype_dispatch.h"
#include "epilogues.h"
#include "lse_rows.h"

namespace opd {
namespace cpu {
namespace {

template <class T, class R>
void lse_gather_rows(const LseGatherArgsT<R>& a) {
  using F = typename AccType<T>::type;
  if constexpr (!std::is_same<F, R>::value) {
    throw std::invalid_argument("opd: float64 logits need float64 outputs and the reverse");
  } else {
    const int64_t V = a.vocab;
#pragma omp parallel num_threads(a.num_threads)
    {
      std::unique_ptr<F[]> z(new F[V]), e(new F[V]);
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < a.rows; ++r) {
        const RowLse<F> s = row_lse(static_cast<const T*>(a.logits) + r * a.ld, z.get(), e.get(), V, a.t);
        a.lse[r] = static_cast<R>(s.L);
        for (int64_t j = 0; j < a.k; ++j) {
          // ids are range-checked on the host unless OPD_CHECK_IDS=0: never read outside the row, mark it NaN
          const int64_t v = a.ids[r * a.k + j];
          a.gathered[r * a.k + j] = id_in_range(v, V) ? static_cast<R>(z[v]) : R(NAN);
        }
        if (a.entropy) a.entropy[r] = static_cast<R>(row_entropy(z.get(), e.get(), V, s));
      }
    }
  }
}

template <class T, class R>
void lse_gather_backward_rows(const LseGatherBackwardArgsT<R>& a) {
  using F = typename AccType<T>::type;
  if constexpr (!std::is_same<F, R>::value) {
    throw std::invalid_argument("opd: float64 logits need float64 upstream gradients and the reverse");
  } else {
    const int64_t V = a.vocab, k = a.k;
#pragma omp parallel num_threads(a.num_threads)
    {
      std::unique_ptr<F[]> z(new F[V]);
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < a.rows; ++r) {
        T* row = static_cast<T*>(a.logits) + r * a.ld;
        const R* g = a.g_gathered ? a.g_gathered + r * k : nullptr;
        const F g_lse = a.g_lse ? F(a.g_lse[r]) : F(0);
        const F g_ent = a.g_entropy ? F(a.g_entropy[r]) : F(0);
        bool live = g_lse != F(0) || g_ent != F(0);
        for (int64_t j = 0; g && !live && j < k; ++j) live = g[j] != R(0);
        if (!live) {  // zero upstream gradient (a masked token): exact zeros, whatever NaN its logits hold
          zero_row(row, V);
          continue;
        }
        load_transform(row, z.get(), V, a.t);
        const F H = a.g_entropy ? F(a.entropy[r]) : F(0);
        write_lse_gather_grad<T, F, R>(z.get(), nullptr, F(0), V, F(a.lse[r]), H, g_lse, g_ent, a.t, a.ids + r * k, g,
                                       k, row);
      }
    }
  }
}

template <class R>
void lse_gather_dispatch(const LseGatherArgsT<R>& a) {
  if (a.rows > 0) OPD_CPU_DISPATCH(a.dtype, T, [&] { lse_gather_rows<T>(a); });
}

template <class R>
void lse_gather_backward_dispatch(const LseGatherBackwardArgsT<R>& a) {
  if (a.rows > 0) OPD_CPU_DISPATCH(a.dtype, T, [&] { lse_gather_backward_rows<T>(a); });
}

}  // namespace

void lse_gather_epilogue(const LseGatherArgs& a) { lse_gather_dispatch(a); }
void lse_gather_epilogue(const LseGatherArgs64& a) { lse_gather_dispatch(a); }
void lse_gather_backward_epilogue(const LseGatherBackwardArgs& a) { lse_gather_backward_dispatch(a); }
void lse_gather_backward_epilogue(const LseGatherBackwardArgs64& a) { lse_gather_backward_dispatch(a); }

}  // namespace cpu
}  // namespace opd
