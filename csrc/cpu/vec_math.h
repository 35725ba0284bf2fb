// CPU math policy for opd_math.h: branch-free Cephes-style float polynomials that GCC/Clang
// auto-vectorize inside `#pragma omp simd` loops (libm's expf/logf calls would block vectorization),
// plus the multiversioning attribute used on the hot row loops.
//
// Accuracy (float): exp and log within ~2 ulp of libm over the ranges used here; tanh within ~3 ulp.
// exp(x) returns exactly 0 for x < -87.3 (so exp(-inf) == 0, which the -inf teacher logits rely on).
// NaN in gives NaN out, for exp, log, log1p and tanh: the clamps and the exponent-bit
// arithmetic would otherwise turn a NaN into a finite number (exp(NaN) read as 2^-2^31 times p, log(NaN)
// as 89.9), and a NaN logit into a plausible finite log-prob. One select per call; still vectorizes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../include/opd_math.h"  // OPD_HD

// Row loops are compiled three times (AVX-512, AVX2, baseline) and picked at load time by the ifunc
// resolver, so one build runs at full width on any x86-64 CPU. Elsewhere: one baseline build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(OPD_NO_CLONES)
#define OPD_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define OPD_CPU_CLONES
#endif

namespace opd {
namespace cpu {

OPD_HD float bits_to_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }
OPD_HD int32_t float_to_bits(float f) { int32_t i; std::memcpy(&i, &f, 4); return i; }

struct CpuMath {
  // exp: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n through the exponent bits.
  static OPD_HD float exp(float x) {
    const bool under = x < -87.3f;  // also catches -inf
    float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    // round-to-nearest through the 1.5 * 2^23 trick (no libm call, vectorizes)
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    float s = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
    return x != x ? x : (under ? 0.0f : p * s);
  }
  // log: x = 2^e * f, f in [sqrt(1/2), sqrt(2)), log(f) by the Cephes logf polynomial.
  // log(0) = -inf, log(inf) = inf; inputs below FLT_MIN are treated as FLT_MIN (never needed here).
  static OPD_HD float log(float x) {
    const bool zero = x <= 0.0f;
    const bool inf = x > 3.4e38f;
    float xc = x < 1.17549435e-38f ? 1.17549435e-38f : (inf ? 3.4e38f : x);
    int32_t i = float_to_bits(xc);
    float e = static_cast<float>((i >> 23) - 126);
    float f = bits_to_float((i & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
    const bool small = f < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    f = small ? f + f - 1.0f : f - 1.0f;
    float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    float r = f + y + 0.693359375f * e;
    return x != x ? x : (zero ? -INFINITY : (inf ? INFINITY : r));
  }
  // log1p(x) = log(u) * x / (u - 1) with u = 1 + x (Goldberg): the quotient corrects the rounding of u.
  // The division is made safe (never by 0) rather than skipped, so both arms of the select can run on every
  // SIMD lane: with -fno-trapping-math (setup.py) this lets GCC if-convert it. The JSD passes, which call
  // log1p per element, ran scalar and 20x slower than the KL passes before (tests/test_cpu_vectorization.py).
  static OPD_HD float log1p(float x) {
    float u = 1.0f + x;
    float d = u - 1.0f;
    float safe_d = d == 0.0f ? 1.0f : d;
    float l = log(u);
    return d == 0.0f ? x : l * (x / safe_d);
  }
  // tanh: odd polynomial for |x| < 0.625 (where 1 - 2/(e^2x + 1) would cancel), else through exp.
  static OPD_HD float tanh(float x) {
    float ax = x < 0.0f ? -x : x;
    float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    float small = p * z * x + x;
    float big = 1.0f - 2.0f / (exp(2.0f * (ax > 44.0f ? 44.0f : ax)) + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax < 0.625f ? small : big;
  }
  // float64 inputs (tests, oracles) take libm: exactness matters more than speed there.
  static OPD_HD double exp(double x) { return std::exp(x); }
  static OPD_HD double log(double x) { return std::log(x); }
  static OPD_HD double log1p(double x) { return std::log1p(x); }
  static OPD_HD double tanh(double x) { return std::tanh(x); }
};

}  // namespace cpu
}  // namespace opd
