// CUDA epilogue of the full-vocabulary divergences: one 256-thread block per token row, the math of
// csrc/include/opd_math.h (the same functions the CPU epilogue calls), fp32 accumulation.
//
// Per row: pass 1 maxima of z_s, z_t; pass 2 exp sums and the shifted cross term; [JSD: pass 3 KL of
// each model to the mixture]; pass 4 (when a gradient is wanted) w * d value / d raw_s written over the
// student logits. Rows are re-read from global memory by each pass (they sit in L2 between passes).
#include "epilogues.h"
#include "row_access.cuh"

namespace opd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
using M = CudaMath;

template <class TS, class TT, int DIV>
__global__ void __launch_bounds__(kThreads) divergence_kernel(const DivergenceArgs a, bool vec) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const int64_t V = a.vocab;
  const TS* s = static_cast<const TS*>(a.student) + r * a.ld_student;
  const TT* t = static_cast<const TT*>(a.teacher) + r * a.ld_teacher;
  TS* grad = a.grad ? static_cast<TS*>(a.grad) + r * a.ld_grad : nullptr;
  const float w = a.weights[r];
  const Transform ts = a.ts, tt = a.tt;
  if (w == 0.0f) {  // masked (or zero upstream gradient): value 0, zero gradient row
    if (threadIdx.x == 0) a.values[r] = 0.0f;
    if (grad) row_map(s, t, grad, V, vec, [](float, float) { return 0.0f; });
    return;
  }

  float ms = -INFINITY, mt = -INFINITY;
  row_foreach(s, t, V, vec, [&](float rs, float rt) {
    ms = fmaxf(ms, transform<M>(rs, ts));
    mt = fmaxf(mt, transform<M>(rt, tt));
  });
  ms = finite_shift(block_reduce<true>(ms, smem));  // shifts only: 0 for a row of -inf logits
  mt = finite_shift(block_reduce<true>(mt, smem));

  float ds = 0.0f, dt = 0.0f, acc = 0.0f;
  row_foreach(s, t, V, vec, [&](float rs, float rt) {
    const float ys = transform<M>(rs, ts) - ms, yt = transform<M>(rt, tt) - mt;
    const float es = M::exp(ys), et = M::exp(yt);
    ds += es;
    dt += et;
    if (DIV == kReverseKL) acc += reverse_kl_term(es, ys, yt);
    if (DIV == kForwardKL) acc += forward_kl_term(et, ys, yt);
  });
  ds = block_reduce<false>(ds, smem);
  dt = block_reduce<false>(dt, smem);
  if (DIV != kJSD) acc = block_reduce<false>(acc, smem);
  const float ls = ms + M::log(ds), lt = mt + M::log(dt);

  float value, stat = 0.0f;
  if (DIV == kReverseKL) {
    value = reverse_kl_value<M>(acc, ds, dt);
    stat = acc / ds;
  } else if (DIV == kForwardKL) {
    value = forward_kl_value<M>(acc, ds, dt);
  } else {
    float sum_a = 0.0f, sum_b = 0.0f;
    row_foreach(s, t, V, vec, [&](float rs, float rt) {
      const float lps = transform<M>(rs, ts) - ls, lpt = transform<M>(rt, tt) - lt;
      const float delta = lpt - lps;
      sum_a += kl_term(M::exp(lps), jsd_student_ratio<M>(delta, a.jsd));
      sum_b += kl_term(M::exp(lpt), jsd_teacher_ratio<M>(delta, a.jsd));
    });
    sum_a = block_reduce<false>(sum_a, smem);
    sum_b = block_reduce<false>(sum_b, smem);
    value = jsd_value(sum_b, sum_a, a.jsd);
    stat = sum_a;
  }
  if (threadIdx.x == 0) a.values[r] = value;
  if (!grad) return;
  if (!has_gradient(value)) {
    row_map(s, t, grad, V, vec, [](float, float) { return 0.0f; });
    return;
  }

  row_map(s, t, grad, V, vec, [&](float rs, float rt) {
    const float zs = transform<M>(rs, ts), zt = transform<M>(rt, tt);
    const float lps = zs - ls, lpt = zt - lt;
    const float ps = M::exp(lps);
    float g;
    if (DIV == kReverseKL) {
      g = reverse_kl_grad(ps, zs - ms, zt - mt, stat);
    } else if (DIV == kForwardKL) {
      g = forward_kl_grad(ps, M::exp(lpt));
    } else {
      g = jsd_grad(ps, jsd_student_ratio<M>(lpt - lps, a.jsd), stat, a.jsd);
    }
    return w * g * transform_grad(zs, ts);
  });
}

template <class TS, class TT>
void launch(const DivergenceArgs& a) {
  const bool vec = vector_aligned<TS>(a.student, a.ld_student) && vector_aligned<TT>(a.teacher, a.ld_teacher) &&
                   (a.grad == nullptr || vector_aligned<TS>(a.grad, a.ld_grad));
  auto stream = static_cast<cudaStream_t>(a.stream);
  const dim3 grid(static_cast<unsigned>(a.rows)), block(kThreads);
  switch (a.divergence) {
    case kReverseKL: divergence_kernel<TS, TT, kReverseKL><<<grid, block, 0, stream>>>(a, vec); break;
    case kForwardKL: divergence_kernel<TS, TT, kForwardKL><<<grid, block, 0, stream>>>(a, vec); break;
    default: divergence_kernel<TS, TT, kJSD><<<grid, block, 0, stream>>>(a, vec); break;
  }
  check_launch("divergence epilogue launch");
}

template <class TS>
void launch_teacher(const DivergenceArgs& a) {
  switch (a.teacher_dtype) {
    case DType::kFloat32: return launch<TS, float>(a);
    case DType::kBFloat16: return launch<TS, __nv_bfloat16>(a);
    case DType::kFloat16: return launch<TS, __half>(a);
    default: throw std::invalid_argument("opd: CUDA epilogues take float32, bfloat16 or float16 teacher logits");
  }
}

}  // namespace

void divergence_epilogue(const DivergenceArgs& a) {
  if (a.rows == 0) return;
  switch (a.student_dtype) {
    case DType::kFloat32: return launch_teacher<float>(a);
    case DType::kBFloat16: return launch_teacher<__nv_bfloat16>(a);
    case DType::kFloat16: return launch_teacher<__half>(a);
    default: throw std::invalid_argument("opd: CUDA epilogues take float32, bfloat16 or float16 student logits");
  }
}

}  // namespace cuda
}  // namespace opd
