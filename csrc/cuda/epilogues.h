// CUDA epilogues (csrc/cuda/*.cu): raw pointers in, launched on args.stream (a cudaStream_t).
// Same contract as the CPU epilogues (csrc/cpu/epilogues.h); fp32 / bf16 / fp16 inputs.
#pragma once

#include "../include/epilogue_args.h"

namespace opd {
namespace cuda {

void divergence_epilogue(const DivergenceArgs& a);
void lse_gather_epilogue(const LseGatherArgs& a);
void lse_gather_backward_epilogue(const LseGatherBackwardArgs& a);

}  // namespace cuda
}  // namespace opd
