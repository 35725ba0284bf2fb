// Row traversal of the CUDA epilogues: one thread block per row; each thread walks chunks of 8
// consecutive elements with 16-byte loads (two per chunk for fp32, one for bf16/fp16), so a warp reads
// 512 contiguous bytes per step (fully coalesced), then a scalar tail. `vec` is false when a row pointer
// or row stride breaks 16-byte alignment (caller-held logits), and everything takes the scalar path.
#pragma once

#include "cuda_common.cuh"

namespace opd {
namespace cuda {

constexpr int kChunk = 8;

template <class T>
__device__ __forceinline__ void load8(const T* p, float (&out)[kChunk]) {
  constexpr int N = Vec<T>::N;  // 4 (fp32) or 8 (bf16/fp16)
#pragma unroll
  for (int h = 0; h < kChunk / N; ++h) {
    float part[N];
    load_vec(p + h * N, part);
#pragma unroll
    for (int i = 0; i < N; ++i) out[h * N + i] = part[i];
  }
}

template <class T>
__device__ __forceinline__ void store8(T* p, const float (&in)[kChunk]) {
  constexpr int N = Vec<T>::N;
#pragma unroll
  for (int h = 0; h < kChunk / N; ++h) {
    float part[N];
#pragma unroll
    for (int i = 0; i < N; ++i) part[i] = in[h * N + i];
    store_vec(p + h * N, part);
  }
}

// f(raw_s, raw_t) for every element of the row pair (order unspecified).
template <class TS, class TT, class F>
__device__ __forceinline__ void row_foreach(const TS* s, const TT* t, int64_t V, bool vec, F&& f) {
  const int64_t nvec = vec ? V / kChunk : 0;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float xs[kChunk], xt[kChunk];
    load8(s + i * kChunk, xs);
    load8(t + i * kChunk, xt);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) f(xs[j], xt[j]);
  }
  for (int64_t v = nvec * kChunk + threadIdx.x; v < V; v += blockDim.x) f(to_float(s[v]), to_float(t[v]));
}

// out[v] = f(raw_s[v], raw_t[v]) for every element; `out` may alias `s` (each element is read before it
// is written, by the same thread).
template <class TS, class TT, class F>
__device__ __forceinline__ void row_map(const TS* s, const TT* t, TS* out, int64_t V, bool vec, F&& f) {
  const int64_t nvec = vec ? V / kChunk : 0;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float xs[kChunk], xt[kChunk];
    load8(s + i * kChunk, xs);
    load8(t + i * kChunk, xt);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) xs[j] = f(xs[j], xt[j]);
    store8(out + i * kChunk, xs);
  }
  for (int64_t v = nvec * kChunk + threadIdx.x; v < V; v += blockDim.x) {
    out[v] = from_float<TS>(f(to_float(s[v]), to_float(t[v])));
  }
}

// Single-row versions (lse / gather primitive).
template <class T, class F>
__device__ __forceinline__ void row_foreach1(const T* s, int64_t V, bool vec, F&& f) {
  const int64_t nvec = vec ? V / kChunk : 0;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float xs[kChunk];
    load8(s + i * kChunk, xs);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) f(xs[j]);
  }
  for (int64_t v = nvec * kChunk + threadIdx.x; v < V; v += blockDim.x) f(to_float(s[v]));
}

template <class T, class F>
__device__ __forceinline__ void row_map1(T* s, int64_t V, bool vec, F&& f) {
  const int64_t nvec = vec ? V / kChunk : 0;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    float xs[kChunk];
    load8(s + i * kChunk, xs);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) xs[j] = f(xs[j]);
    store8(s + i * kChunk, xs);
  }
  for (int64_t v = nvec * kChunk + threadIdx.x; v < V; v += blockDim.x) s[v] = from_float<T>(f(to_float(s[v])));
}

}  // namespace cuda
}  // namespace opd
