// CPU epilogues: OpenMP over the rows of one chunk, fp32 accumulation (fp64 for fp64 inputs).
#pragma once

#include "../include/epilogue_args.h"

namespace opd {
namespace cpu {

// Each for fp32 / bf16 / fp16 logits (float row scalars) and for fp64 logits (the ...Args64: double ones).
void divergence_epilogue(const DivergenceArgs& a);
void divergence_epilogue(const DivergenceArgs64& a);
void lse_gather_epilogue(const LseGatherArgs& a);
void lse_gather_epilogue(const LseGatherArgs64& a);
void lse_gather_backward_epilogue(const LseGatherBackwardArgs& a);
void lse_gather_backward_epilogue(const LseGatherBackwardArgs64& a);

}  // namespace cpu
}  // namespace opd
