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
// then chained through dz/draw (lse_entropy_grad_row + a scatter, the two halves of the lse/gather
// backward). Rows with w = 0 get value 0 and a zero gradient; a non-finite value a zero gradient row.
// Two passes over the row, both in the per-thread fp32 copy z (L2-resident): the statistics pass
// (max, sum of exponentials, the entropy sum) and the gradient pass.
#include <omp.h>

#include <memory>

#include "../include/lse_gather_loss.h"
#include "dtype_dispatch.h"
#include "epilogues.h"
#include "row_kernels.h"

namespace opd {
namespace cpu {
namespace {

template <class T>
void lse_gather_loss_rows(const LseGatherLossArgs& a) {
  using F = typename AccType<T>::type;
  const int64_t V = a.vocab, k = a.k;
  const bool entropy = a.spec.entropy_coef != 0.0;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::unique_ptr<F[]> z(new F[V]);
    std::unique_ptr<double[]> q(new double[k]);
    std::unique_ptr<float[]> dq(new float[k]);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < a.rows; ++r) {
      T* row = static_cast<T*>(a.logits) + r * a.ld;
      const int64_t* ids = a.ids + r * k;
      const double w = a.weights[r];
      const F m = finite_shift(load_transform(row, z.get(), V, a.t));  // 0 for a row of -inf logits
      const F d = sum_exp(z.get(), V, m);
      const double L = double(m) + std::log(double(d));
      const double H = entropy ? double(entropy_value<M>(entropy_sum(z.get(), V, m), d)) : 0.0;
      for (int64_t j = 0; j < k; ++j) {
        // an id outside [0, V) (OPD_CHECK_IDS=0) is never read: a NaN log-prob, so a NaN row (issue 16)
        q[j] = id_in_range(ids[j], V) ? double(z[ids[j]]) - L : NAN;
        if (a.logprobs) a.logprobs[r * k + j] = static_cast<float>(q[j]);
      }
      double loss;
      if (a.spec.kind == kSampledToken) {
        const double t = a.teacher[r], s = q[0];
        const double sampler = a.sampler ? double(a.sampler[r]) : s;
        double ds = 0;
        loss = sampled_token_loss<M>(a.spec, s, t, sampler, &ds);
        dq[0] = static_cast<float>(ds);
      } else {
        loss = topk_loss<M>(a.spec, q.get(), a.teacher + r * k, k, dq.get());
      }
      loss -= a.spec.entropy_coef * H;
      a.values[r] = w != 0.0 ? static_cast<float>(loss) : 0.0f;
      if (!a.grad) continue;
      if (w == 0.0 || !has_gradient(loss)) {
        zero_row(row, V);
        continue;
      }
      double g_lse = 0;
      for (int64_t j = 0; j < k; ++j) g_lse -= w * dq[j];
      const F g_ent = F(-w * a.spec.entropy_coef);
      lse_entropy_grad_row(z.get(), V, F(L), F(H), F(g_lse), g_ent, a.t, row);
      for (int64_t j = 0; j < k; ++j) {  // one by one: duplicate ids accumulate
        const int64_t v = ids[j];
        if (!id_in_range(v, V)) continue;
        const F add = F(w * dq[j]) * transform_grad(z[v], a.t);
        row[v] = static_cast<T>(static_cast<F>(row[v]) + add);
      }
    }
  }
}

}  // namespace

void lse_gather_loss_epilogue(const LseGatherLossArgs& a) {
  if (a.rows == 0) return;
  OPD_CPU_DISPATCH(a.dtype, T, [&] { lse_gather_loss_rows<T>(a); });
}

}  // namespace cpu
}  // namespace opd
