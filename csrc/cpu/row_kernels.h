// Vectorizable single-row loops shared by the CPU epilogues. Each loop is one pass over a row held in
// a per-thread fp32 scratch buffer (4 x V floats: 512 KiB at V = 32000, resident in L2), compiled in
// AVX-512 / AVX2 / baseline clones (OPD_CPU_CLONES).
//
// Internal linkage on purpose: every translation unit that includes this header gets its own clones
// and ifunc resolvers, so the multiversioned templates never collide at link time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "vec_math.h"
#include "../include/opd_math.h"

namespace opd {
namespace cpu {
namespace {

using M = CpuMath;

// Row sums run in fp32 SIMD lanes over blocks of kSumBlock entries and add the block sums in double.
// One fp32 accumulator per lane over a whole row (2000 terms per lane at V = 32000) cost JSD gradients
// up to 8e-5 relative error (its KL(p_s || M) is a sum of terms of both signs); with blocks the row sums
// are as accurate as torch's cascade summation and the loop still runs at full vector width (accumulating
// in double inside the loop instead made the statistics pass 3x slower).
constexpr int64_t kSumBlock = 256;

// Element conversions that vectorize: c10's BFloat16 constructor branches on NaN, which stops GCC's
// vectorizer; bf16 <-> fp32 is a 16-bit shift with round-to-nearest-even on the way down. (NaN inputs
// stay NaN unless the rounding carries them into inf, which cannot happen for quiet NaNs.)
template <class F, class T>
OPD_HD F load_elem(const T& x) { return static_cast<F>(x); }
template <>
OPD_HD float load_elem<float, c10::BFloat16>(const c10::BFloat16& x) {
  return bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(x.x) << 16));
}
// out[v] = x in T. bf16 is written as its 16 bits through a uint16_t pointer: constructing the c10 struct
// in the loop keeps GCC from vectorizing the store.
template <class T, class F>
OPD_HD void store_elem(T* out, int64_t v, F x) { out[v] = static_cast<T>(x); }
template <>
OPD_HD void store_elem<c10::BFloat16, float>(c10::BFloat16* out, int64_t v, float x) {
  uint32_t b = static_cast<uint32_t>(float_to_bits(x));
  b += 0x7fffu + ((b >> 16) & 1u);  // round to nearest even
  reinterpret_cast<uint16_t*>(out)[v] = static_cast<uint16_t>(b >> 16);
}

// Raw logits -> z = softcap(scale * raw) / T into `z`; returns max_v z_v.
template <class T, class F>
OPD_CPU_CLONES F load_transform(const T* __restrict src, F* __restrict z, int64_t V, Transform t) {
  F m = -INFINITY;
  if (t.has_softcap) {
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) {
      F x = transform<M>(load_elem<F>(src[v]), t);
      z[v] = x;
      m = x > m ? x : m;
    }
  } else {
    const F f = F(t.scale) * F(t.inv_temp);  // softcap-free transform is one multiply
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) {
      F x = load_elem<F>(src[v]) * f;
      z[v] = x;
      m = x > m ? x : m;
    }
  }
  return m;
}

// sum_v exp(z_v - m), keeping e_v = exp(z_v - m) in `e` so that the entropy and gradient passes of the
// lse/gather epilogues need no exp of their own (p_v = e_v / d): one exp per logit instead of two or three.
template <class F>
OPD_CPU_CLONES F sum_exp(const F* __restrict z, F* __restrict e, int64_t V, F m) {
  double total = 0;
  for (int64_t b = 0; b < V; b += kSumBlock) {
    const int64_t end = b + kSumBlock < V ? b + kSumBlock : V;
    F d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t v = b; v < end; ++v) {
      const F ev = M::exp(z[v] - m);
      e[v] = ev;
      d += ev;
    }
    total += d;
  }
  return static_cast<F>(total);
}

// Statistics pass of the two-model divergences: d_s, d_t and (DIV = reverse/forward KL) the shifted
// cross term a or b of opd_math.h, in one sweep. The exponentials are kept in es / et so the gradient
// pass needs no exp: p_v = e_v / d.
template <int DIV, class F>
OPD_CPU_CLONES void divergence_sums(const F* __restrict zs, const F* __restrict zt, int64_t V, F ms,
                                    F mt, F* __restrict es_out, F* __restrict et_out, F* out_ds,
                                    F* out_dt, F* out_acc) {
  double total_ds = 0, total_dt = 0, total_acc = 0;
  for (int64_t b = 0; b < V; b += kSumBlock) {
    const int64_t end = b + kSumBlock < V ? b + kSumBlock : V;
    F ds = 0, dt = 0, acc = 0;
#pragma omp simd reduction(+ : ds, dt, acc)
    for (int64_t v = b; v < end; ++v) {
      F ys = zs[v] - ms, yt = zt[v] - mt;
      F es = M::exp(ys), et = M::exp(yt);
      es_out[v] = es;
      et_out[v] = et;
      ds += es;
      dt += et;
      if (DIV == kReverseKL) acc += reverse_kl_term(es, ys, yt);
      if (DIV == kForwardKL) acc += forward_kl_term(et, ys, yt);
    }
    total_ds += ds;
    total_dt += dt;
    total_acc += acc;
  }
  *out_ds = static_cast<F>(total_ds);
  *out_dt = static_cast<F>(total_dt);
  *out_acc = static_cast<F>(total_acc);
}

// JSD's second statistics pass: the shifted sums sum p_s a and sum p_t b of opd_math.h (KL(p_s || M)
// and KL(p_t || M) up to constants), with p and log p formed exactly as the gradient pass forms them (p = e / d, log p = y - log d), so the
// gradient's bracket log p_s - log M - KL(p_s || M) sums to zero under p_s up to rounding instead of up
// to the difference of two exp implementations.
template <class F>
OPD_CPU_CLONES void jsd_sums(const F* __restrict zs, const F* __restrict zt, const F* __restrict es,
                             const F* __restrict et, int64_t V, F ms, F mt, F log_ds, F log_dt, F inv_ds,
                             F inv_dt, JsdCoefficients c, F* out_sum_a, F* out_sum_b) {
  double total_a = 0, total_b = 0;
  for (int64_t b = 0; b < V; b += kSumBlock) {
    const int64_t end = b + kSumBlock < V ? b + kSumBlock : V;
    F sum_a = 0, sum_b = 0;
#pragma omp simd reduction(+ : sum_a, sum_b)
    for (int64_t v = b; v < end; ++v) {
      F delta = ((zt[v] - mt) - log_dt) - ((zs[v] - ms) - log_ds);  // log p_t - log p_s
      sum_a += kl_term(es[v] * inv_ds, jsd_student_ratio<M>(delta, c));
      sum_b += kl_term(et[v] * inv_dt, jsd_teacher_ratio<M>(delta, c));
    }
    total_a += sum_a;
    total_b += sum_b;
  }
  *out_sum_a = static_cast<F>(total_a);
  *out_sum_b = static_cast<F>(total_b);
}

// Gradient pass: out_v = w * d value / d z_s,v * dz/draw, stored in the output dtype. es / et are the
// exponentials of the statistics pass (p = e / d), ms / mt the row maxima, log_ds / log_dt the logs of
// the sums. `stat` is E = a / d_s (reverse KL) or sum p_s a (JSD, opd_math.h); unused for forward KL.
template <int DIV, class TO, class F>
OPD_CPU_CLONES void divergence_grad(const F* __restrict zs, const F* __restrict zt, const F* __restrict es,
                                    const F* __restrict et, int64_t V, F ms, F mt, F log_ds, F log_dt,
                                    F inv_ds, F inv_dt, F stat, F w, JsdCoefficients c, Transform t,
                                    TO* out) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    F ys = zs[v] - ms, yt = zt[v] - mt;
    F ps = es[v] * inv_ds;
    F g;
    if (DIV == kReverseKL) {
      g = reverse_kl_grad(ps, ys, yt, stat);
    } else if (DIV == kForwardKL) {
      g = forward_kl_grad(ps, et[v] * inv_dt);
    } else {
      F delta = (yt - log_dt) - (ys - log_ds);  // log p_t - log p_s, formed as in jsd_sums
      g = jsd_grad(ps, jsd_student_ratio<M>(delta, c), stat, c);
    }
    store_elem(out, v, w * g * transform_grad(zs[v], t));
  }
}

// Entropy pass of the lse/gather primitive: sum_v e_v y_v with y = z - m and the e_v kept by sum_exp.
template <class F>
OPD_CPU_CLONES F entropy_sum(const F* __restrict z, const F* __restrict e, int64_t V, F m) {
  double total = 0;
  for (int64_t b = 0; b < V; b += kSumBlock) {
    const int64_t end = b + kSumBlock < V ? b + kSumBlock : V;
    F ey = 0;
#pragma omp simd reduction(+ : ey)
    for (int64_t v = b; v < end; ++v) ey += entropy_term(e[v], z[v] - m);
    total += ey;
  }
  return static_cast<F>(total);
}

// Backward of the lse/gather primitive (without the gathered part, which the caller scatters):
// out_v = (g_lse p_v - g_H p_v (log p_v + H)) * dz/draw, with log p_v = z_v - lse and p_v = e_v * inv_d
// from the exponentials of sum_exp (STORED_EXP, the fused loss: the row's statistics were just formed) or
// exp(log p_v) (the lse/gather backward, which has only the forward's lse; e and inv_d are unused).
template <bool STORED_EXP, class TO, class F>
OPD_CPU_CLONES void lse_entropy_grad_row(const F* __restrict z, const F* __restrict e, int64_t V, F lse,
                                         F inv_d, F H, F g_lse, F g_ent, Transform t, TO* out) {
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) {
    F lp = z[v] - lse;
    F p = STORED_EXP ? e[v] * inv_d : M::exp(lp);
    store_elem(out, v, lse_entropy_grad(p, lp, H, g_lse, g_ent) * transform_grad(z[v], t));
  }
}

template <class TO>
void zero_row(TO* out, int64_t V) {
  for (int64_t v = 0; v < V; ++v) out[v] = static_cast<TO>(0.0f);
}

}  // namespace
}  // namespace cpu
}  // namespace opd
