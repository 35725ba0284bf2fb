// CUDA helpers of the epilogues: the math policy for opd_math.h, 16-byte vector loads/stores of
// fp32 / bf16 / fp16 rows converted to fp32, and block-wide reductions. CUDA headers only (no torch):
// these files compile with nvcc even where torch is a CPU build.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../include/epilogue_args.h"
#include "../include/opd_math.h"

namespace opd {
namespace cuda {

// Full-precision libdevice functions: the epilogues are memory-bound, so the fast intrinsics
// (__expf: error growing with |x|) would buy nothing and cost accuracy.
struct CudaMath {
  static __device__ __forceinline__ float exp(float x) { return expf(x); }
  static __device__ __forceinline__ float log(float x) { return logf(x); }
  static __device__ __forceinline__ float log1p(float x) { return log1pf(x); }
  static __device__ __forceinline__ float tanh(float x) { return tanhf(x); }
  // float64: the top-k tails (1 - sum of k probabilities, see topk_loss), k values per row.
  static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ double log(double x) { return ::log(x); }
};

template <class T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Elements of T per 16-byte vector.
template <class T> struct Vec { static constexpr int N = 16 / sizeof(T); };

// Load N consecutive elements (16 bytes, aligned) as fp32.
template <class T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::N]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_float(e[i]);
}

template <class T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::N]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Block-wide sum / max over blockDim.x threads (a multiple of 32, at most 1024); every thread gets the
// result. `smem` holds 32 floats; the leading __syncthreads makes back-to-back calls safe.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <bool MAX>
__device__ __forceinline__ float block_reduce(float x, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = MAX ? warp_max(x) : warp_sum(x);
  __syncthreads();
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  x = lane < warps ? smem[lane] : (MAX ? -INFINITY : 0.0f);
  return MAX ? warp_max(x) : warp_sum(x);
}

inline void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("opd: ") + what + ": " + cudaGetErrorString(e));
}

// Whether rows of `ld` elements starting at `p` can be read with aligned 16-byte vectors.
template <class T>
inline bool vector_aligned(const void* p, int64_t ld) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % Vec<T>::N == 0;
}

}  // namespace cuda
}  // namespace opd
