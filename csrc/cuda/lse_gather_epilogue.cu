// CUDA epilogue of the log-prob / gather primitive, forward and backward: one 256-thread block per row,
// math from csrc/include/opd_math.h, fp32 accumulation.
//
// Forward per row:  lse = m + log sum e^(z - m);  gathered_j = z[ids_j];  entropy = log d - sum e y / d.
// Backward per row, in place over the raw logits:
//   G_v = dz/draw_v * ( p_v (g_lse - g_H (log p_v + H)) + sum_j g_j [v == ids_j] )
// The gathered part is staged in `scratch` (rows x k, fp32) before the row is overwritten, and added by
// one thread afterwards so duplicate ids accumulate without atomics.
#include "epilogues.h"
#include "lse_rows.cuh"

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
  const RowLse s = row_lse(row, V, vec, tr, a.entropy != nullptr, smem);
  if (threadIdx.x == 0) {
    a.lse[r] = s.m + M::log(s.d);
    if (a.entropy) a.entropy[r] = entropy_value<M>(s.ey, s.d);
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
  write_lse_entropy_grad(row, V, vec, tr, lse, H, g_lse, g_ent);
  __syncthreads();  // the row's writes are visible to thread 0
  if (a.g_gathered && threadIdx.x == 0) add_staged_at_ids(row, V, ids, staged, k);
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
