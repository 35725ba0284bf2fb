// CPU epilogue of the fused lse/gather loss (csrc/include/lse_gather_loss.h) on one chunk of rows.
//
// Per row r (PyTorch equivalent; z the transformed logits, I = ids[r], w = weights[r]):
//     L = z.logsumexp(-1);  q = z[I] - L;  H = L - (z.softmax(-1) * z).sum()        (H only if entropy_coef)
//     loss_r, dq = row_loss(q, teacher[r], sampler[r])           (sampled_token_loss / topk_loss)
//     values[r] = loss_r - entropy_coef * H
// Gradient, written over the raw logits of the row when a.grad (the upstream of q_j is w dq_j, of H is
// -w entropy_coef, and q_j = z_{I_j} - L):
//     d/dz_v [w values_r] = sum_j w dq_j ([v = I_j] - p_v) + w entropy_coef p_v (log p_v + H)
//                         = p_v (g_lse - g_H (log p_v + H)) + sum_j g_j [v = I_j]
//     with g_j = w dq_j, g_lse = -sum_j g_j, g_H = -w entropy_coef
// then chained through dz/draw (write_lse_gather_grad of lse_rows.h: the lse/gather backward's row step).
// Rows with w = 0 get value 0 and a zero gradient; a non-finite value a zero gradient row.
// Passes over the row, in the per-thread copies z and e = exp(z - max) (L2-resident): the statistics
// (max; sum of exponentials, kept in e; the entropy sum from e) and the gradient (p = e / d): one exp per
// logit in all. Per-row scalars (teacher, sampler,
// weights, values, d loss / d q) are of type R: float, or double for fp64 logits.
#include <omp.h>

#include <memory>
#include <stdexcept>
#include <type_traits>

#include "../include/lse_gather_loss.h"
#include "dtype_dispatch.h"
#include "epilogues.h"
#include "lse_rows.h"

namespace opd {
namespace cpu {
namespace {

template <class T, class R>
void lse_gather_loss_rows(const LseGatherLossArgsT<R>& a) {
  using F = typename AccType<T>::type;
  if constexpr (!std::is_same<F, R>::value) {
    throw std::invalid_argument("opd: float64 logits need float64 row scalars and the reverse");
  } else {
    const int64_t V = a.vocab, k = a.k;
    const bool entropy = a.spec.entropy_coef != 0.0;
#pragma omp parallel num_threads(a.num_threads)
    {
      std::unique_ptr<F[]> z(new F[V]), e(new F[V]);  // the row's transformed logits and exp(z - max)
      std::unique_ptr<double[]> q(new double[k]);
      std::unique_ptr<R[]> g(new R[k]);  // d loss / d q_j, then g_j = w d loss / d q_j
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < a.rows; ++r) {
        T* row = static_cast<T*>(a.logits) + r * a.ld;
        const int64_t* ids = a.ids + r * k;
        const double w = a.weights[r];
        const RowLse<F> s = row_lse(row, z.get(), e.get(), V, a.t);
        const double H = entropy ? row_entropy(z.get(), e.get(), V, s) : 0.0;
        for (int64_t j = 0; j < k; ++j) {
          // an id outside [0, V) (OPD_CHECK_IDS=0) is never read: a NaN log-prob, so a NaN row
          q[j] = id_in_range(ids[j], V) ? double(z[ids[j]]) - s.L : NAN;
          if (a.logprobs) a.logprobs[r * k + j] = static_cast<R>(q[j]);
        }
        double loss;
        if (a.spec.kind == kSampledToken) {
          const double t = a.teacher[r], sq = q[0];
          const double sampler = a.sampler ? double(a.sampler[r]) : sq;
          double ds = 0;
          loss = sampled_token_loss<M>(a.spec, sq, t, sampler, &ds);
          g[0] = static_cast<R>(ds);
        } else {
          loss = topk_loss<M>(a.spec, q.get(), a.teacher + r * k, k, g.get());
        }
        loss -= a.spec.entropy_coef * H;
        a.values[r] = w != 0.0 ? static_cast<R>(loss) : R(0);
        if (!a.grad) continue;
        if (w == 0.0 || !has_gradient(loss)) {
          zero_row(row, V);
          continue;
        }
        double g_lse = 0;
        for (int64_t j = 0; j < k; ++j) {
          g[j] = static_cast<R>(w * g[j]);
          g_lse -= g[j];
        }
        write_lse_gather_grad(z.get(), e.get(), F(1) / s.d, V, F(s.L), F(H), F(g_lse), F(-w * a.spec.entropy_coef),
                              a.t, ids, g.get(), k, row);
      }
    }
  }
}

template <class R>
void lse_gather_loss_dispatch(const LseGatherLossArgsT<R>& a) {
  if (a.rows > 0) OPD_CPU_DISPATCH(a.dtype, T, [&] { lse_gather_loss_rows<T>(a); });
}

}  // namespace

void lse_gather_loss_epilogue(const LseGatherLossArgs& a) { lse_gather_loss_dispatch(a); }
void lse_gather_loss_epilogue(const LseGatherLossArgs64& a) { lse_gather_loss_dispatch(a); }

}  // namespace cpu
}  // namespace opd
