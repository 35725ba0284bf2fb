// Torch-facing glue of the CUDA epilogues, compiled only when the extension is built against a CUDA
// torch (setup.py): it hands the chunk driver an epilogue table whose entries fill in the current
// stream, and registers the drivers for the CUDA dispatch key behind a device guard.
//
// NOTE: this file has not been compiled on the development machine (CPU-only torch lacks the c10 CUDA
// headers); csrc/cuda/*.cu are compile-checked by tests/test_cuda_compile.py. See docs/cpp.md.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "epilogues.h"
#include "../driver.h"

namespace opd {
namespace {

template <class Args, void (*Fn)(const Args&)>
void on_current_stream(const Args& a) {
  Args b = a;
  b.stream = c10::cuda::getCurrentCUDAStream().stream();
  b.num_threads = 1;
  Fn(b);
}

const EpilogueTable kCudaEpilogues{
    &on_current_stream<DivergenceArgs, &cuda::divergence_epilogue>,
    &on_current_stream<LseGatherArgs, &cuda::lse_gather_epilogue>,
    &on_current_stream<LseGatherBackwardArgs, &cuda::lse_gather_backward_epilogue>,
    &on_current_stream<LseGatherLossArgs, &cuda::lse_gather_loss_epilogue>,
};

// Runs an op with the first tensor's device current (kernels and ATen calls go to that GPU).
template <auto F>
struct Guarded;
template <class R, class First, class... Rest, R (*F)(First, Rest...)>
struct Guarded<F> {
  static R call(First first, Rest... rest) {
    const c10::cuda::CUDAGuard guard(first.device());
    return F(first, rest...);
  }
};

const bool kRegistered = [] {
  register_epilogues(c10::DeviceType::CUDA, &kCudaEpilogues);
  return true;
}();

}  // namespace
}  // namespace opd

TORCH_LIBRARY_IMPL(opd, CUDA, m) {
  m.impl("linear_divergence", &opd::Guarded<&opd::linear_divergence>::call);
  m.impl("linear_divergence_values", &opd::Guarded<&opd::linear_divergence_values>::call);
  m.impl("lse_gather", &opd::Guarded<&opd::lse_gather>::call);
  m.impl("lse_gather_backward", &opd::Guarded<&opd::lse_gather_backward>::call);
  m.impl("logits_divergence", &opd::Guarded<&opd::logits_divergence>::call);
  m.impl("logits_divergence_inplace_", &opd::Guarded<&opd::logits_divergence_inplace_>::call);
  m.impl("lse_gather_loss", &opd::Guarded<&opd::lse_gather_loss>::call);
}
