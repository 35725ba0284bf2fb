// CPU epilogue of the full-vocabulary divergences (reverse KL, forward KL, JSD) on one chunk of rows.
//
// Per row (PyTorch equivalent, z_* the transformed logits of the row, w its token weight):
//     ls, lt  = z_s.logsumexp(-1), z_t.logsumexp(-1)
//     lps, lpt = z_s - ls, z_t - lt
//     value    = (lps.exp() * (lps - lpt)).sum()                 # reverse KL (others: opd_math.h)
//     grad_raw = w * d value / d z_s * dz_s / draw              # written over the student logits
// Passes over the row: load+transform (max), statistics (exp sums + cross term, exponentials kept),
// [JSD: KL to the mixture], gradient (no exp for the KLs). The row lives in a per-thread fp32 scratch between passes, so each logit is
// converted and transformed once (tanh for softcaps is the expensive part).
#include <omp.h>

#include <memory>
#include <stdexcept>
#include <type_traits>

#include "dtype_dispatch.h"
#include "epilogues.h"
#include "row_kernels.h"

namespace opd {
namespace cpu {
namespace {

template <int DIV, class TS, class TT, class F>
void divergence_row(const DivergenceArgsT<F>& a, int64_t r, F* zs, F* zt, F* es, F* et) {
  const int64_t V = a.vocab;
  const F w = static_cast<F>(a.weights[r]);
  TS* grad = a.grad ? static_cast<TS*>(a.grad) + r * a.ld_grad : nullptr;
  if (w == F(0)) {  // masked (or zero upstream gradient): nothing to compute, zero gradient row
    a.values[r] = F(0);
    if (grad) zero_row(grad, V);
    return;
  }
  // the row maxima, used only as shifts (finite_shift: 0 for a row of -inf logits)
  const F ms = finite_shift(load_transform(static_cast<const TS*>(a.student) + r * a.ld_student, zs, V, a.ts));
  const F mt = finite_shift(load_transform(static_cast<const TT*>(a.teacher) + r * a.ld_teacher, zt, V, a.tt));
  F ds, dt, acc;
  divergence_sums<DIV>(zs, zt, V, ms, mt, es, et, &ds, &dt, &acc);
  const F log_ds = M::log(ds), log_dt = M::log(dt);
  F value, stat = 0;
  if (DIV == kReverseKL) {
    value = reverse_kl_value<M>(acc, ds, dt);
    stat = acc / ds;
  } else if (DIV == kForwardKL) {
    value = forward_kl_value<M>(acc, ds, dt);
  } else {
    F sum_a, sum_b;
    jsd_sums(zs, zt, es, et, V, ms, mt, log_ds, log_dt, F(1) / ds, F(1) / dt, a.jsd, &sum_a, &sum_b);
    value = jsd_value(sum_b, sum_a, a.jsd);
    stat = sum_a;
  }
  a.values[r] = value;
  if (!grad) return;
  if (has_gradient(value)) {
    divergence_grad<DIV>(zs, zt, es, et, V, ms, mt, log_ds, log_dt, F(1) / ds, F(1) / dt, stat, w, a.jsd, a.ts,
                         grad);
  } else {
    zero_row(grad, V);
  }
}

// The row scalars (weights, values) are of type R, which must be the accumulation type F: double when
// either model's logits are fp64 (DivergenceArgs64), float otherwise.
template <int DIV, class TS, class TT, class R>
void divergence_rows(const DivergenceArgsT<R>& a) {
  using F = std::conditional_t<std::is_same<TS, double>::value || std::is_same<TT, double>::value,
                               double, float>;
  if constexpr (!std::is_same<F, R>::value) {
    throw std::invalid_argument("opd: float64 logits need float64 weights and values, and the reverse");
  } else {
    const int64_t V = a.vocab;
#pragma omp parallel num_threads(a.num_threads)
    {
      std::unique_ptr<F[]> scratch(new F[4 * V]);  // z_s | z_t | e_s | e_t of the current row
      F* buf = scratch.get();
#pragma omp for schedule(dynamic, 1)
      for (int64_t r = 0; r < a.rows; ++r) {
        divergence_row<DIV, TS, TT, F>(a, r, buf, buf + V, buf + 2 * V, buf + 3 * V);
      }
    }
  }
}

template <class R>
void divergence_dispatch(const DivergenceArgsT<R>& a) {
  if (a.rows == 0) return;
  OPD_CPU_DISPATCH(a.student_dtype, TS, [&] {
    OPD_CPU_DISPATCH(a.teacher_dtype, TT, [&] {
      switch (a.divergence) {
        case kReverseKL: return divergence_rows<kReverseKL, TS, TT>(a);
        case kForwardKL: return divergence_rows<kForwardKL, TS, TT>(a);
        default: return divergence_rows<kJSD, TS, TT>(a);
      }
    });
  });
}

}  // namespace

void divergence_epilogue(const DivergenceArgs& a) { divergence_dispatch(a); }
void divergence_epilogue(const DivergenceArgs64& a) { divergence_dispatch(a); }

}  // namespace cpu
}  // namespace opd
