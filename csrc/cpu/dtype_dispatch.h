// Map opd::DType to the C++ element type for the CPU epilogues.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdexcept>

#include "../include/epilogue_args.h"

// OPD_CPU_DISPATCH(dtype, T, body): runs `body` with `T` aliased to the element type of `dtype`.
#define OPD_CPU_DISPATCH(dtype, T, ...)                                          \
  [&] {                                                                          \
    switch (dtype) {                                                             \
      case ::opd::DType::kFloat32: { using T = float; return __VA_ARGS__(); }    \
      case ::opd::DType::kBFloat16: { using T = c10::BFloat16; return __VA_ARGS__(); } \
      case ::opd::DType::kFloat16: { using T = c10::Half; return __VA_ARGS__(); } \
      case ::opd::DType::kFloat64: { using T = double; return __VA_ARGS__(); }   \
    }                                                                            \
    throw std::invalid_argument("opd: unsupported dtype");                       \
  }()

namespace opd {
namespace cpu {
// Accumulation type: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs.
template <class T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
}  // namespace cpu
}  // namespace opd
