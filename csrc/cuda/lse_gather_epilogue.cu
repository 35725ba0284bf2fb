// CUDA epilogue of the log-prob / gather primitive, forward and backward: one 256-thread block per row,
// math from csrc/include/opd_math.h, fp32 accumulation.
//
// Forward per row:  lse = m + log sum e^(z - m);  gathered_j = z[ids_j];  entropy = log d - sum e y / d.
// Backward per row, in place over the raw logits:
//   G_v = dz/draw_v * ( p_v (g_lse - g_H (log p_v + H)) + sum_j g_j [v == ids_j] )
// The gathered part is staged in `scratch` (rows x k, fp32) before the row is overwritten, and added by
// one thread afterwards so duplicate ids accumulate without atomics.
#include "epilogues.h"
#include "row_access.cuh"

namespace opd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
using M = CudaMath;

template <class T>
__global__ void __launch_bounds__(kThreads) lse_gather_kernel(const LseGatherArgs a, bool vec) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const int64_t V = a.vocab, k = a.k;
  const T* row = static_cast<const T*>(a.logits) + r * a.ld;
  const Transform tr = a.t;
  float m = -INFINITY;
  row_foreach1(row, V, vec, [&](float x) { m = fmaxf(m, transform<M>(x, tr)); });
  m = finite_shift(block_reduce<true>(m, smem));  // 0 for a row of -inf logits: lse = -inf, no NaN
  float d = 0.0f, ey = 0.0f;
  row_foreach1(row, V, vec, [&](float x) {
    const float y = transform<M>(x, tr) - m;
    const float e = M::exp(y);
    d += e;
    ey += entropy_term(e, y);
  });
  d = block_reduce<false>(d, smem);
  if (a.entropy) ey = block_reduce<false>(ey, smem);
  if (threadIdx.x == 0) {
    a.lse[r] = m + M::log(d);
    if (a.entropy) a.entropy[r] = entropy_value<M>(ey, d);
  }
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    // ids are range-checked on the host unless OPD_CHECK_IDS=0: never read outside the row, mark it NaN
    const int64_t v = a.ids[r * k + j];
    a.gathered[r * k + j] = id_in_range(v, V) ? transform<M>(to_float(row[v]), tr) : NAN;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) lse_gather_backward_kernel(const LseGatherBackwardArgs a, bool vec) {
  const int64_t r = blockIdx.x;
  const int64_t V = a.vocab, k = a.k;
  T* row = static_cast<T*>(a.logits) + r * a.ld;
  const Transform tr = a.t;
  const int64_t* ids = a.ids + r * k;
  float* staged = a.scratch + r * k;
  const float g_lse = a.g_lse ? a.g_lse[r] : 0.0f;
  const float g_ent = a.g_entropy ? a.g_entropy[r] : 0.0f;
  bool live = g_lse != 0.0f || g_ent != 0.0f;  // the same decision in every thread of the block
  for (int64_t j = 0; a.g_gathered && !live && j < k; ++j) live = a.g_gathered[r * k + j] != 0.0f;
  if (!live) {  // zero upstream gradient (a masked token): exact zeros, whatever NaN its logits hold
    row_map1(row, V, vec, [](float) { return 0.0f; });
    return;
  }
  if (a.g_gathered) {
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const int64_t v = ids[j];  // an out-of-range id (OPD_CHECK_IDS=0) is neither read nor written
      staged[j] = id_in_range(v, V)
                      ? a.g_gathered[r * k + j] * transform_grad(transform<M>(to_float(row[v]), tr), tr) : 0.0f;
    }
  }
  __syncthreads();  // every raw logit at ids is read before the row is overwritten
  const float lse = a.lse[r];
  const float H = a.g_entropy ? a.entropy[r] : 0.0f;
  row_map1(row, V, vec, [&](float x) {
    const float z = transform<M>(x, tr);
    const float lp = z - lse;
    return lse_entropy_grad(M::exp(lp), lp, H, g_lse, g_ent) * transform_grad(z, tr);
  });
  __syncthreads();  // the row's writes are visible to thread 0
  if (a.g_gathered && threadIdx.x == 0) {
    for (int64_t j = 0; j < k; ++j) {
      if (id_in_range(ids[j], V)) row[ids[j]] = from_float<T>(to_float(row[ids[j]]) + staged[j]);
    }
  }
}

template <class T>
void launch_forward(const LseGatherArgs& a) {
  const bool vec = vector_aligned<T>(a.logits, a.ld);
  lse_gather_kernel<T><<<static_cast<unsigned>(a.rows), kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(a, vec);
  check_launch("lse_gather epilogue launch");
}

template <class T>
void launch_backward(const LseGatherBackwardArgs& a) {
  const bool vec = vector_aligned<T>(a.logits, a.ld);
  lse_gather_backward_kernel<T>
      <<<static_cast<unsigned>(a.rows), kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(a, vec);
  check_launch("lse_gather backward epilogue launch");
}

}  // namespace

void lse_gather_epilogue(const LseGatherArgs& a) {
  if (a.rows == 0) return;
  switch (a.dtype) {
    case DType::kFloat32: return launch_forward<float>(a);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(a);
    case DType::kFloat16: return launch_forward<__half>(a);
    default: throw std::invalid_argument("opd: CUDA epilogues take float32, bfloat16 or float16 logits");
  }
}

void lse_gather_backward_epilogue(const LseGatherBackwardArgs& a) {
  if (a.rows == 0) return;
  switch (a.dtype) {
    case DType::kFloat32: return launch_backward<float>(a);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(a);
    case DType::kFloat16: return launch_backward<__half>(a);
    default: throw std::invalid_argument("opd: CUDA epilogues take float32, bfloat16 or float16 logits");
  }
}

}  // namespace cuda
}  // namespace opd
