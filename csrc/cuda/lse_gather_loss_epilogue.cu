// CUDA epilogue of the fused lse/gather loss (csrc/include/lse_gather_loss.h): one 256-thread block per
// row, the row-loss math shared with the CPU epilogue (csrc/cpu/lse_gather_loss_epilogue.cpp), fp32.
//
// Per row r (z the transformed logits, I = ids[r], w = weights[r]):
//   1. m = max z; d = sum e^(z - m) (and sum e y for the entropy): block reductions;
//   2. thread 0: L = m + log d, q_j = z_{I_j} - L, loss and dq_j = d loss / d q_j (sampled_token_loss or
//      topk_loss), values[r] = loss - entropy_coef H; stages g_j dz/draw(z_{I_j}) with g_j = w dq_j in
//      `scratch` (rows x k) and broadcasts g_lse = -sum_j g_j, g_H = -w entropy_coef through shared memory;
//   3. every thread overwrites the row with the gradient
//        G_v = dz/draw_v * p_v (g_lse - g_H (log p_v + H))         (zero when w = 0 or the loss is not finite)
//   4. thread 0 adds the staged g_j at v = I_j one by one (duplicate ids accumulate, no atomics).
// Derivation of d/dz_v: q_j = z_{I_j} - L gives d q_j / d z_v = [v = I_j] - p_v, and dH/dz_v =
// -p_v (log p_v + H); the upstream of q_j is w dq_j and that of H is -w entropy_coef.
//
// NOTE: compile-checked by tests/test_cuda_compile.py (nvcc, sm_80 / sm_90, no spills); never run on a GPU.
#include "../include/lse_gather_loss.h"
#include "epilogues.h"
#include "lse_rows.cuh"

namespace opd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
using M = CudaMath;

template <class T>
__global__ void __launch_bounds__(kThreads) lse_gather_loss_kernel(const LseGatherLossArgs a, bool vec) {
  __shared__ float smem[32];
  __shared__ float bcast[4];  // L, H, g_lse, g_H
  const int64_t r = blockIdx.x;
  const int64_t V = a.vocab, k = a.k;
  T* row = static_cast<T*>(a.logits) + r * a.ld;
  const Transform tr = a.t;
  const bool entropy = a.spec.entropy_coef != 0.0;
  const RowLse s = row_lse(row, V, vec, tr, entropy, smem);
  if (threadIdx.x == 0) {
    const int64_t* ids = a.ids + r * k;
    float* q = a.scratch + r * k;  // q_j, then dq_j, then the staged g_j dz/draw
    const float w = a.weights[r];
    const float L = s.m + M::log(s.d);
    const float H = entropy ? entropy_value<M>(s.ey, s.d) : 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      // an id outside [0, V) (OPD_CHECK_IDS=0) is never read: a NaN log-prob, so a NaN row
      q[j] = id_in_range(ids[j], V) ? transform<M>(to_float(row[ids[j]]), tr) - L : NAN;
      if (a.logprobs) a.logprobs[r * k + j] = q[j];
    }
    float loss;
    if (a.spec.kind == kSampledToken) {
      float ds = 0.0f;
      loss = sampled_token_loss<M>(a.spec, q[0], a.teacher[r], a.sampler ? a.sampler[r] : q[0], &ds);
      q[0] = ds;
    } else {
      loss = topk_loss<M>(a.spec, q, a.teacher + r * k, k, q);  // dq_j overwrites q_j after its last read
    }
    loss -= static_cast<float>(a.spec.entropy_coef) * H;
    a.values[r] = w != 0.0f ? loss : 0.0f;
    const bool live = a.grad && w != 0.0f && has_gradient(loss);
    float g_lse = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const float g = live ? w * q[j] : 0.0f;
      g_lse -= g;
      // g == 0 (masked row): exactly 0, even where the logit is NaN (its softcap factor is NaN)
      q[j] = g != 0.0f && id_in_range(ids[j], V) ? g * transform_grad(transform<M>(to_float(row[ids[j]]), tr), tr)
                                                  : 0.0f;
    }
    bcast[0] = L;
    bcast[1] = H;
    bcast[2] = g_lse;
    bcast[3] = live ? -w * static_cast<float>(a.spec.entropy_coef) : 0.0f;
  }
  __syncthreads();  // the staged values and the broadcast are visible; the raw logits at ids were read
  if (!a.grad) return;
  const float L = bcast[0], H = bcast[1], g_lse = bcast[2], g_ent = bcast[3];
  if (g_lse != 0.0f || g_ent != 0.0f) {
    write_lse_entropy_grad(row, V, vec, tr, L, H, g_lse, g_ent);
  } else {  // a masked row (or a non-finite loss): exact zeros, whatever NaN it holds
    row_map1(row, V, vec, [](float) { return 0.0f; });
  }
  __syncthreads();  // the row's writes are visible to thread 0
  if (threadIdx.x == 0) add_staged_at_ids(row, V, a.ids + r * k, a.scratch + r * k, k);
}

template <class T>
void launch(const LseGatherLossArgs& a) {
  const bool vec = vector_aligned<T>(a.logits, a.ld);
  lse_gather_loss_kernel<T>
      <<<static_cast<unsigned>(a.rows), kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(a, vec);
  check_launch("lse_gather_loss epilogue launch");
}

}  // namespace

void lse_gather_loss_epilogue(const LseGatherLossArgs& a) {
  if (a.rows == 0) return;
  switch (a.dtype) {
    case DType::kFloat32: return launch<float>(a);
    case DType::kBFloat16: return launch<__nv_bfloat16>(a);
    case DType::kFloat16: return launch<__half>(a);
    default: throw std::invalid_argument("opd: CUDA epilogues take float32, bfloat16 or float16 logits");
  }
}

}  // namespace cuda
}  // namespace opd
