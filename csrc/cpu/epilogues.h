// CPU epilogues: OpenMP over the rows of one chunk, fp32 accumulation (fp64 for fp64 inputs).
#pragma once

#include "../include/epilogue_args.h"

namespace opd {
namespace cpu {

void divergence_epilogue(const DivergenceArgs& a);
void lse_gather_epilogue(const LseGatherArgs& a);
void lse_gather_backward_epilogue(const LseGatherBackwardArgs& a);

}  // namespace cpu
}  // namespace opd
