// Shared math of every opd_kernels epilogue (CPU and CUDA): docs/design.md section 4 as scalar
// `__host__ __device__` inline functions, so the CUDA arithmetic is the CPU arithmetic.
//
// Plain C++ only (no torch, no CUDA runtime headers): this header is included by csrc/cpu/*.cpp and by
// csrc/cuda/*.cu. The transcendental functions come from a "math policy" M (a struct with static
// exp/log/log1p/tanh), so the CPU side can plug in branch-free polynomials that auto-vectorize
// (csrc/cpu/vec_math.h) while CUDA uses libdevice (csrc/cuda/cuda_common.cuh).
//
// Notation (per token row): raw logits r_v, transformed z_v = softcap(scale * r_v) / T, the row max m,
// shifted y_v = z_v - m, e_v = exp(y_v), d = sum_v e_v, L = m + log d, log p_v = y_v - log d.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define OPD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU row loops are multiversioned (target_clones), and GCC does not reliably inline
// default-target helpers into the clones on its own - a call left in a loop stops its vectorization.
#define OPD_HD inline __attribute__((always_inline))
#else
#define OPD_HD inline
#endif

namespace opd {

enum Divergence : int { kReverseKL = 0, kForwardKL = 1, kJSD = 2 };

// The logit transform of one model: z = softcap(scale * raw) / T, softcap_c(x) = c * tanh(x / c).
// In double, so fp64 logits see the caller's coefficients unrounded; every use converts to the accumulation
// type F first (F(t.scale), ...), so fp32 arithmetic is what it was with float fields.
struct Transform {
  double scale;
  double inv_temp;      // 1 / T
  double softcap;       // c (unused when has_softcap == 0)
  double inv_softcap;   // 1 / c
  double z_to_tanh;     // T / c: tanh(scale * raw / c) == z * T / c, so dz/draw needs only z
  int has_softcap;
};

inline Transform make_transform(double scale, double temperature, bool has_softcap, double softcap) {
  Transform t;
  t.scale = scale;
  t.inv_temp = 1.0 / temperature;
  t.has_softcap = has_softcap ? 1 : 0;
  t.softcap = has_softcap ? softcap : 1.0;
  t.inv_softcap = has_softcap ? 1.0 / softcap : 1.0;
  t.z_to_tanh = has_softcap ? temperature / softcap : 0.0;
  return t;
}

// z = softcap(scale * raw) / T
template <class M, class F>
OPD_HD F transform(F raw, const Transform& t) {
  F x = raw * F(t.scale);
  if (t.has_softcap) x = F(t.softcap) * M::tanh(x * F(t.inv_softcap));
  return x * F(t.inv_temp);
}

// dz/draw = (scale / T) * (1 - tanh^2(scale * raw / c)), written through z itself
// (tanh(scale * raw / c) = z * T / c) so the raw logits need not be kept once z is known.
template <class F>
OPD_HD F transform_grad(F z, const Transform& t) {
  F g = F(t.scale) * F(t.inv_temp);
  if (t.has_softcap) {
    F th = z * F(t.z_to_tanh);
    g = g * (F(1) - th * th);
  }
  return g;
}

// The shift of a row's sums: its max m, or 0 when every logit is -inf (m = -inf), so that exp(z - m) is
// exp(-inf) = 0 and the row's logsumexp m + log(sum) is -inf, instead of exp(-inf - -inf) = exp(NaN): the
// exponentials keep NaN as NaN, so this case must not form one.
template <class F>
OPD_HD F finite_shift(F m) { return m == F(-INFINITY) ? F(0) : m; }

// ---- statistics pass terms ------------------------------------------------------------------------
// Sums are taken relative to the row maxima (y = z - m), which keeps the value well conditioned:
// reverse KL  R = sum p_s (log p_s - log p_t)
//               = a / d_s - log d_s + log d_t,    a = sum_v e_s,v (y_s,v - y_t,v)
// forward KL  F = b / d_t - log d_t + log d_s,    b = sum_v e_t,v (y_t,v - y_s,v)
// A term with e == 0 contributes exactly 0 (lim p log p = 0): with a -inf teacher logit y_t = -inf,
// so e_t * (y_t - y_s) would be 0 * -inf = NaN without the select.
// Every such select tests `e != 0`, not `e > 0`: a NaN weight (a NaN logit) must stay NaN, so that a NaN
// input gives a non-finite value for its token instead of being dropped.
template <class F>
OPD_HD F reverse_kl_term(F es, F ys, F yt) { return es != F(0) ? es * (ys - yt) : F(0); }
template <class F>
OPD_HD F forward_kl_term(F et, F ys, F yt) { return et != F(0) ? et * (yt - ys) : F(0); }

// log d_t - log d_s as log1p((d_t - d_s) / d_s): no rounding of two large logs when d_s ~ d_t (flat rows,
// where the divergence is tiny).
template <class M, class F>
OPD_HD F reverse_kl_value(F a, F ds, F dt) { return a / ds + M::log1p((dt - ds) / ds); }
template <class M, class F>
OPD_HD F forward_kl_value(F b, F ds, F dt) { return b / dt + M::log1p((ds - dt) / dt); }

// logaddexp(a, b) = log(e^a + e^b) = max + log1p(e^(min - max)); exact for the -inf cases that occur
// (one argument -inf: the other).
template <class M, class F>
OPD_HD F logaddexp(F a, F b) {
  F mx = a > b ? a : b;
  F mn = a > b ? b : a;
  return mx + M::log1p(M::exp(mn - mx));
}

// softplus(x) = log(1 + e^x), without overflow; softplus(-inf) = 0, softplus(inf) = inf.
template <class M, class F>
OPD_HD F softplus(F x) {
  F ax = x < F(0) ? -x : x;
  return (x > F(0) ? x : F(0)) + M::log1p(M::exp(-ax));
}

// JSD's mixture M = (1 - beta) p_s + beta p_t (0 < beta < 1; the ends are plain KLs) enters only through
// the log-ratios log p_s - log M and log p_t - log M. Both depend on delta = log p_t - log p_s alone, and
// are used shifted by a constant:
//     a_v = log p_s,v - log M_v + log(1 - beta) = -softplus(logit(beta) + delta)
//     b_v = log p_t,v - log M_v + log(beta)     = -softplus(-logit(beta) - delta)
//     KL(p_s || M) = sum p_s a - log(1 - beta)     KL(p_t || M) = sum p_t b - log(beta)   (sum p = 1)
//     JSD = beta sum p_t b + (1 - beta) sum p_s a + H(beta),  H(beta) the binary entropy.
// Why this form: (1) log M itself (as large as log p, and rounded like it) is never formed, so near
// beta = 0 or 1, where a log-ratio is O(beta) or O(1 - beta), it keeps full relative precision; (2) where
// p_s and p_t barely overlap, log p_s - log M = -log(1 - beta) + tiny wherever p_s has mass, and the
// gradient's bracket log p_s - log M - KL(p_s || M) = a_v - sum p_s a is then a difference of two small
// numbers instead of two O(1) ones (whose rounding, and that of sum p_s = 1, cost the gradient 8e-5
// relative error in benchmarks/jsd_beta_accuracy.py). The coefficients are computed in double from the
// caller's beta (1 - beta in float would round away most of 1 - beta at beta = 0.99999).
struct JsdCoefficients {
  double beta, one_minus_beta, logit_beta, binary_entropy;
};
inline JsdCoefficients make_jsd_coefficients(double beta) {
  JsdCoefficients c;
  c.beta = beta;
  c.one_minus_beta = 1.0 - beta;
  const bool inside = beta > 0.0 && beta < 1.0;  // the ends are dispatched to the KLs
  c.logit_beta = inside ? std::log(beta) - std::log1p(-beta) : 0.0;
  c.binary_entropy = inside ? -(beta * std::log(beta) + (1.0 - beta) * std::log1p(-beta)) : 0.0;
  return c;
}
template <class M, class F>
OPD_HD F jsd_student_ratio(F delta, const JsdCoefficients& c) { return -softplus<M>(F(c.logit_beta) + delta); }
template <class M, class F>
OPD_HD F jsd_teacher_ratio(F delta, const JsdCoefficients& c) { return -softplus<M>(-F(c.logit_beta) - delta); }
// p * ratio, 0 where p == 0 (the ratio may be -inf or NaN there); NaN where p is NaN
template <class F>
OPD_HD F kl_term(F p, F ratio) { return p != F(0) ? p * ratio : F(0); }

// JSD(beta) = beta KL(p_t || M) + (1 - beta) KL(p_s || M)      (TRL generalized_jsd_loss)
// from the shifted sums sum_a = sum p_s a and sum_b = sum p_t b above.
template <class F>
OPD_HD F jsd_value(F sum_b, F sum_a, const JsdCoefficients& c) {
  return F(c.beta) * sum_b + F(c.one_minus_beta) * sum_a + F(c.binary_entropy);
}

// ---- gradients w.r.t. the student's transformed logits z_s ----------------------------------------
// A row whose value is +inf (reverse KL against a -inf teacher logit where p_s > 0) has no defined
// gradient; it gets a zero gradient row instead of NaN (the convention of every backend).
// `v - v == 0` is false exactly for inf and NaN (no isfinite needed on host or device).
template <class F>
OPD_HD bool has_gradient(F value) { return value - value == F(0); }

// reverse KL: dR/dz_v = p_s,v (log p_s,v - log p_t,v - R)      (softmax Jacobian applied to log(p_s/p_t)+1)
// Written with the shifted logits: log p_s,v - log p_t,v - R = (y_s,v - y_t,v) - E with E = a / d_s the
// p_s-mean of y_s - y_t; the log-normalizers cancel exactly instead of through rounding, which matters for
// peaked rows where the bracket is tiny next to its terms.
template <class F>
OPD_HD F reverse_kl_grad(F ps, F ys, F yt, F E) { return ps != F(0) ? ps * ((ys - yt) - E) : F(0); }
// forward KL: dF/dz_v = p_s,v - p_t,v
template <class F>
OPD_HD F forward_kl_grad(F ps, F pt) { return ps - pt; }
// JSD: dJ/dp_s,u = (1 - beta)(log p_s,u - log M_u) (the beta p_t / M and (1 - beta) p_s / M terms sum
// to 1 and cancel), then through the softmax: dJ/dz_v = (1 - beta) p_s,v (log p_s,v - log M_v - KL(p_s||M))
// = (1 - beta) p_s,v (a_v - sum_a) in the shifted ratios above (the shifts cancel).
template <class F>
OPD_HD F jsd_grad(F ps, F a, F sum_a, const JsdCoefficients& c) {
  return ps != F(0) ? F(c.one_minus_beta) * ps * (a - sum_a) : F(0);
}

// An id the kernels may read: 0 <= id < V. The API checks ids on the host unless OPD_CHECK_IDS=0; every
// kernel checks again (one unsigned compare) and gives an out-of-range id a NaN gathered logit instead of
// reading or writing outside the row.
OPD_HD bool id_in_range(int64_t id, int64_t V) { return static_cast<uint64_t>(id) < static_cast<uint64_t>(V); }

// ---- log-prob / gather / entropy primitive -------------------------------------------------------
// lse L = m + log d; entropy H = L - sum p z = log d - (sum_v e_v y_v) / d.
template <class F>
OPD_HD F entropy_term(F e, F y) { return e != F(0) ? e * y : F(0); }
template <class M, class F>
OPD_HD F entropy_value(F ey, F d) { return M::log(d) - ey / d; }
// d/dz_v of  g_lse * L + g_H * H  (the gathered logits add g_j at v = ids_j separately):
//   dL/dz_v = p_v,   dH/dz_v = -p_v (log p_v + H)
template <class F>
OPD_HD F lse_entropy_grad(F p, F lp, F H, F g_lse, F g_ent) {
  return p != F(0) ? p * (g_lse - g_ent * (lp + H)) : F(0);
}

}  // namespace opd
