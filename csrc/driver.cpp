// Chunk drivers of the `opd` ops (strategy "chunked", docs/design.md section 3).
//
// linear_divergence, per chunk of C token rows (PyTorch equivalent; W_*[:V] views, no copies):
//     S = h_s[c] @ W_s[:V].T + b_s[:V]             # into the reused (C, V) student workspace
//     T = h_t[c] @ W_t[:V].T + b_t[:V]             # into the reused (C, V) teacher workspace
//     values[c], S = epilogue(S, T, w[c])          # S now holds G = w * d value / d raw_s
//     dh_s[c] = G @ W_s[:V];  dW_s[:V] += G.T @ h_s[c];  db_s[:V] += G.sum(0)
// FLOPs: 2 N V (H_s + H_t) forward + 4 N V H_s for the gradient - the minimum, nothing recomputed.
// Extra memory: the two workspaces plus the gradients themselves (dW accumulates in fp32 for
// bf16/fp16 weights, through one (V, H_s) temporary of the weight's dtype).
#include "driver.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/epilogues.h"
#include "include/lse_gather_loss.h"

namespace opd {
namespace {

// ---- large CPU buffers on transparent huge pages --------------------------------------------------------
// The workspace and the gradients are fresh allocations of tens to hundreds of MiB on every call, and a
// fresh allocation is paid for at its first touch, one 4 KiB page fault at a time: 39 ms for a 128 MiB dW
// (V = 32000, H = 1024) on the 2-core dev machine, 16 ms with 2 MiB pages. Linux's default THP mode
// ("madvise") gives huge pages only to memory that asks, so the buffers ask, before their first touch,
// for the 2 MiB-aligned pages wholly inside them (advice only: nothing changes if the kernel declines).
// OPD_HUGEPAGES=0 turns it off (e.g. where compaction stalls on a fragmented machine).
constexpr int64_t kHugePage = int64_t{2} << 20;

bool hugepages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("OPD_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (t.is_cpu() && bytes >= 2 * kHugePage && hugepages_enabled()) {
    const auto start = reinterpret_cast<std::uintptr_t>(t.data_ptr());
    const std::uintptr_t first = (start + kHugePage - 1) / kHugePage * kHugePage;
    const std::uintptr_t last = (start + bytes) / kHugePage * kHugePage;
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

const EpilogueTable kCpuEpilogues{&cpu::divergence_epilogue, &cpu::lse_gather_epilogue,
                                  &cpu::lse_gather_backward_epilogue, &cpu::lse_gather_loss_epilogue};
const EpilogueTable* g_cuda_epilogues = nullptr;

const EpilogueTable& epilogues_for(const Tensor& t) {
  if (t.device().is_cpu()) return kCpuEpilogues;
  TORCH_CHECK(t.is_cuda() && g_cuda_epilogues != nullptr, "opd: no epilogue for device ", t.device(),
              " (CUDA epilogues exist only when the extension is built against a CUDA torch)");
  return *g_cuda_epilogues;
}

DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "opd: unsupported dtype ", s, " (expected float32, bfloat16, float16 or float64)");
  }
}

// jsd at beta = 0 and beta = 1 is forward and reverse KL exactly (TRL's generalized_jsd_loss special
// cases; the mixture formula degenerates there). That rule is applied once, by the Python validation
// (_validation.resolve_divergence): "jsd" reaches an op only with 0 < beta < 1, and is rejected otherwise.
int parse_divergence(c10::string_view name, double beta) {
  if (name == "reverse_kl") return kReverseKL;
  if (name == "forward_kl") return kForwardKL;
  if (name == "jsd") {
    TORCH_CHECK(beta > 0.0 && beta < 1.0, "opd: jsd needs 0 < beta < 1, got beta = ", beta,
                " (beta = 0 is forward_kl and beta = 1 reverse_kl: pass that divergence)");
    return kJSD;
  }
  TORCH_CHECK(false, "opd: divergence must be 'reverse_kl', 'forward_kl' or 'jsd', got '", name, "'");
}

Transform transform_of(double scale, double temperature, c10::optional<double> softcap) {
  return make_transform(scale, temperature, softcap.has_value(), softcap.value_or(1.0));
}

int64_t rows_per_chunk(int64_t chunk_rows, int64_t n) {
  n = std::max<int64_t>(n, 1);
  return chunk_rows <= 0 ? n : std::min(chunk_rows, n);
}

// Row stride of a workspace: padded to 8 elements on CUDA so every row starts 16-byte aligned for the
// vector loads of the CUDA epilogues; dense on CPU.
int64_t workspace_ld(const Tensor& like, int64_t V) { return like.is_cuda() ? (V + 7) / 8 * 8 : V; }

OptTensor narrow_bias(const OptTensor& bias, int64_t V) {
  if (!bias.has_value() || !bias->defined()) return c10::nullopt;
  return bias->narrow(0, 0, V);
}

// ---- vocabulary slabs (CPU) ---------------------------------------------------------------------------
// A chunk's products have few rows (C ~ 250) and a long vocabulary side. Left to itself, a multi-threaded
// BLAS parallelizes such a product poorly: with MKL on the 2-core dev machine, h[:256] @ W.T (H = 512 or
// 1024, V = 32000) ran 25% slower per FLOP than at 2048 rows on two threads, but only 7% slower on one
// (benchmarks/cpu_logits_gemm.py). So on CPU the driver cuts every vocabulary-sized product into one slab of
// vocabulary per thread and runs each slab as a single-threaded GEMM (a BLAS called inside a parallel
// region runs sequentially): every thread packs only its own part of the weight. On CUDA one call per
// product is already a single well-parallelized kernel.
struct VocabSlabs {
  int64_t count = 1, V = 0;
  int64_t begin(int64_t p) const {  // slab edges on 16-element (64-byte) boundaries
    return p == count ? V : std::min(V, (V * p / count) / 16 * 16);
  }
  int64_t size(int64_t p) const { return begin(p + 1) - begin(p); }

  // fn(p, v0, n) for every slab p, in parallel (one thread each) on CPU.
  template <class Fn>
  void run(Fn&& fn) const {
    if (count == 1) return fn(int64_t{0}, int64_t{0}, V);
    // Worker threads start with default thread-local state (grad mode, dispatch-key exclusions): give
    // them the caller's, so ATen calls inside behave as they do on this thread (below autograd).
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, count, 1, [&](int64_t p0, int64_t p1) {
      at::ThreadLocalStateGuard guard(caller_state);
      for (int64_t p = p0; p < p1; ++p) fn(p, begin(p), size(p));
    });
  }
};

// Below this many vocabulary entries per slab a single multi-threaded call is as good (small V).
constexpr int64_t kMinSlabVocab = 2048;

VocabSlabs vocab_slabs(const Tensor& like, int64_t V) {
  VocabSlabs s;
  s.V = V;
  if (like.is_cpu()) s.count = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), V / kMinSlabVocab));
  return s;
}

// Within its slab a thread computes the logits kLogitsBlock vocabulary columns at a time: the (C, 512)
// output block stays in L2 while the BLAS kernel fills it. At C = 256 (H = 512 and 1024) this measured
// 10-17% faster than one call per slab, and no slower than one 2-thread call over all 2048 rows
// (benchmarks/cpu_logits_gemm.py). Blocks are used only where each call runs on one thread.
constexpr int64_t kLogitsBlock = 512;

// out = h @ W.T (+ b), written into the workspace view `out` (C, V).
void logits_into(Tensor& out, const Tensor& h, const Tensor& w, const OptTensor& b) {
  const VocabSlabs slabs = vocab_slabs(h, out.size(1));
  const bool one_thread_per_call = h.is_cpu() && (slabs.count > 1 || at::get_num_threads() == 1);
  slabs.run([&](int64_t, int64_t slab_begin, int64_t slab_size) {
    const int64_t block = one_thread_per_call ? kLogitsBlock : std::max<int64_t>(slab_size, 1);
    for (int64_t v0 = slab_begin; v0 < slab_begin + slab_size; v0 += block) {
      const int64_t n = std::min(block, slab_begin + slab_size - v0);
      Tensor o = out.narrow(1, v0, n);
      const Tensor ws = w.narrow(0, v0, n);
      if (b.has_value()) {
        at::addmm_out(o, b->narrow(0, v0, n), h, ws.t());
      } else {
        at::mm_out(o, h, ws.t());
      }
    }
  });
}

// ---- per-row scalars ----------------------------------------------------------------------------------
// Token weights, values, losses, lse, gathered logits and entropies are fp64 when an input's logits are
// fp64 (the accumulation type of the epilogues then), fp32 otherwise - as the torch backend returns them.
at::ScalarType real_dtype(const Tensor& a, const Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// fn(R{}) with R = double or float for the per-row scalar dtype `real`.
template <class Fn>
auto with_real(at::ScalarType real, Fn&& fn) {
  return real == at::kDouble ? fn(double{}) : fn(float{});
}

// t's data from element `offset`, or null for an undefined tensor.
template <class R>
R* data_or_null(const Tensor& t, int64_t offset = 0) {
  return t.defined() ? t.data_ptr<R>() + offset : nullptr;
}

// One chunk's epilogue: the device's table for float row scalars; fp64 inputs (double row scalars) run on
// CPU only - the CUDA epilogues take fp32 / bf16 / fp16 logits.
void check_fp64_device(const Tensor& like) {
  TORCH_CHECK(like.device().is_cpu(), "opd: float64 inputs run on CPU only (got ", like.device(),
              "; the CUDA epilogues take float32, bfloat16 or float16)");
}
void run_epilogue(const Tensor& like, const DivergenceArgs& a) { epilogues_for(like).divergence(a); }
void run_epilogue(const Tensor& like, const DivergenceArgs64& a) {
  check_fp64_device(like);
  cpu::divergence_epilogue(a);
}
void run_epilogue(const Tensor& like, const LseGatherArgs& a) { epilogues_for(like).lse_gather(a); }
void run_epilogue(const Tensor& like, const LseGatherArgs64& a) {
  check_fp64_device(like);
  cpu::lse_gather_epilogue(a);
}
void run_epilogue(const Tensor& like, const LseGatherBackwardArgs& a) { epilogues_for(like).lse_gather_backward(a); }
void run_epilogue(const Tensor& like, const LseGatherBackwardArgs64& a) {
  check_fp64_device(like);
  cpu::lse_gather_backward_epilogue(a);
}
void run_epilogue(const Tensor& like, const LseGatherLossArgs& a) {
  const EpilogueTable& ep = epilogues_for(like);
  TORCH_CHECK(ep.lse_gather_loss != nullptr, "opd: no lse_gather_loss epilogue for device ", like.device());
  ep.lse_gather_loss(a);
}
void run_epilogue(const Tensor& like, const LseGatherLossArgs64& a) {
  check_fp64_device(like);
  cpu::lse_gather_loss_epilogue(a);
}

void check_2d(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, "opd: ", name, " must be 2-D with unit inner stride, got sizes ",
              t.sizes(), " strides ", t.strides());
}

// Gradient accumulators of a weight (and bias): fp32 for half-precision parameters so the sum over
// chunks does not round at every step; the parameter's own dtype otherwise.
at::ScalarType accumulation_dtype(const Tensor& param) {
  return param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The gradients of a linear layer y = h W[:V].T + b[:V] from G = d loss / d y, accumulated chunk by chunk:
//     dh[rows] = G @ W[:V];   dW[:V] += G.T @ h[rows];   db[:V] += G.sum(0)
// dW and db accumulate in fp32 for half-precision parameters (through one (V, H) temporary in the
// weight's dtype, as CPU matmuls cannot write another dtype), in the parameter's dtype otherwise.
struct LinearGrads {
  Tensor dh, dw_acc, dw_tmp, db_acc, dh_partial;
  bool need_h = false, need_w = false, need_b = false;
  bool dw_written = false;  // dW[:V] holds a first chunk's product (before that: uninitialized)

  LinearGrads(const Tensor& h, const Tensor& w, const OptTensor& b, int64_t V, bool want_h, bool want_w,
              bool want_b)
      : need_h(want_h), need_w(want_w), need_b(want_b && b.has_value() && b->defined()) {
    if (need_h) dh = empty_buffer(h.sizes(), h.options());  // every row is written by exactly one chunk
    if (need_w) {
      // rows [0, V) are written (not accumulated) by the first chunk, so only the rows past the vocabulary
      // are zeroed here: a zero fill of the whole (V, H) dW would be one more pass over it
      dw_acc = empty_buffer(w.sizes(), w.options().dtype(accumulation_dtype(w)));
      if (w.size(0) > V) dw_acc.narrow(0, V, w.size(0) - V).zero_();
      if (dw_acc.scalar_type() != w.scalar_type()) dw_tmp = empty_buffer({V, h.size(1)}, w.options());
    }
    if (need_b) db_acc = at::zeros({b->size(0)}, b->options().dtype(accumulation_dtype(*b)));
  }
  bool any() const { return need_h || need_w || need_b; }

  // Per vocabulary slab p (one thread each on CPU, see VocabSlabs):
  //     dW[slab] += G[:, slab].T @ h      db[slab] += G[:, slab].sum(0)     dh_p = G[:, slab] @ W[slab]
  // and dh[rows] = sum_p dh_p, the partial products of slabs p > 0 going through a (P - 1, C, H) scratch.
  void accumulate(const Tensor& G, const Tensor& h_rows, const Tensor& w_v, int64_t r0) {
    const int64_t C = G.size(0);
    const VocabSlabs slabs = vocab_slabs(G, G.size(1));
    Tensor dh_rows = need_h ? dh.narrow(0, r0, C) : Tensor();
    if (need_h && slabs.count > 1 && (!dh_partial.defined() || dh_partial.size(0) < C * (slabs.count - 1))) {
      dh_partial = at::empty({(slabs.count - 1) * C, dh.size(1)}, dh.options());
    }
    slabs.run([&](int64_t p, int64_t v0, int64_t n) {
      const Tensor g = G.narrow(1, v0, n);
      if (need_h) {
        Tensor out = p == 0 ? dh_rows : dh_partial.narrow(0, (p - 1) * C, C);
        at::mm_out(out, g, w_v.narrow(0, v0, n));
      }
      if (need_w) {
        Tensor acc = dw_acc.narrow(0, v0, n);
        if (dw_tmp.defined()) {
          Tensor tmp = dw_tmp.narrow(0, v0, n);
          at::mm_out(tmp, g.t(), h_rows);
          dw_written ? acc.add_(tmp) : acc.copy_(tmp);
        } else if (dw_written) {
          acc.addmm_(g.t(), h_rows);
        } else {
          at::mm_out(acc, g.t(), h_rows);
        }
      }
      if (need_b) db_acc.narrow(0, v0, n).add_(g.sum(0, /*keepdim=*/false, db_acc.scalar_type()));
    });
    for (int64_t p = 1; need_h && p < slabs.count; ++p) dh_rows.add_(dh_partial.narrow(0, (p - 1) * C, C));
    dw_written = dw_written || need_w;
  }

  // (dh, dW, db) in the inputs' dtypes; empty (0,) tensors for the ones not requested. A half-precision
  // dW is rounded into the (V, H) temporary when that is the whole weight (no third dW-sized buffer), else
  // the temporary is released before the cast allocates the result.
  std::tuple<Tensor, Tensor, Tensor> finish(const Tensor& h, const Tensor& w, const OptTensor& b) {
    Tensor none = at::empty({0}, w.options());
    Tensor gw = none;
    if (need_w && !dw_written) dw_acc.zero_();  // no chunk ran (N = 0)
    if (need_w && dw_tmp.defined() && dw_tmp.size(0) == w.size(0)) {
      gw = dw_tmp.copy_(dw_acc);
    } else if (need_w) {
      dw_tmp = Tensor();
      gw = dw_acc.to(w.scalar_type());
    }
    dw_tmp = Tensor();
    return {need_h ? dh : at::empty({0}, h.options()), gw, need_b ? db_acc.to(b->scalar_type()) : none};
  }
};

// Rows whose token weight (or whole upstream gradient) is 0 have G == 0, but 0 * NaN = NaN inside G^T h:
// a masked token's NaN/inf hidden state must not reach dW. For the dW product such rows of h
// are replaced by zeros (a C x H select, next to the C x V x H products).
Tensor zero_dead_rows(const Tensor& h, const Tensor& live) {
  return at::where(live.unsqueeze(1), h, at::zeros({}, h.options()));
}

struct DivergenceResult {
  Tensor values, grad_hidden, grad_weight, grad_bias;
};

DivergenceResult run_linear_divergence(
    const Tensor& hs, const Tensor& ws, const OptTensor& bs_full, const Tensor& ht, const Tensor& wt,
    const OptTensor& bt_full, const Tensor& weights_in, c10::string_view divergence, double beta,
    double temperature, c10::optional<double> s_cap, c10::optional<double> t_cap, double s_scale,
    double t_scale, int64_t V, bool need_h, bool need_w, bool need_b, int64_t chunk_rows) {
  check_2d(hs, "student_hidden");
  check_2d(ht, "teacher_hidden");
  TORCH_CHECK(ws.dim() == 2 && wt.dim() == 2, "opd: weights must be 2-D");
  TORCH_CHECK(hs.size(0) == ht.size(0), "opd: student_hidden and teacher_hidden need the same rows");
  TORCH_CHECK(V >= 1 && V <= ws.size(0) && V <= wt.size(0), "opd: vocab_size ", V, " out of range");
  const int64_t N = hs.size(0);
  const int div = parse_divergence(divergence, beta);
  const Transform ts = transform_of(s_scale, temperature, s_cap);
  const Transform tt = transform_of(t_scale, temperature, t_cap);
  const Tensor ws_v = ws.narrow(0, 0, V).contiguous();
  const Tensor wt_v = wt.narrow(0, 0, V).contiguous();
  const OptTensor bs = narrow_bias(bs_full, V), bt = narrow_bias(bt_full, V);
  const at::ScalarType real = real_dtype(hs, ht);
  const Tensor weights = weights_in.to(real).contiguous();

  DivergenceResult res;
  res.values = at::zeros({N}, hs.options().dtype(real));
  LinearGrads grads(hs, ws, bs_full, V, need_h, need_w, need_b);

  if (N > 0) {
    const int64_t C = rows_per_chunk(chunk_rows, N);
    const int64_t ld_s = workspace_ld(hs, V), ld_t = workspace_ld(ht, V);
    Tensor S = empty_buffer({C, ld_s}, hs.options());
    Tensor T = empty_buffer({C, ld_t}, ht.options());
    for (int64_t r0 = 0; r0 < N; r0 += C) {
      const int64_t c = std::min(C, N - r0);
      Tensor Sc = S.narrow(0, 0, c).narrow(1, 0, V);
      Tensor Tc = T.narrow(0, 0, c).narrow(1, 0, V);
      const Tensor h_s = hs.narrow(0, r0, c);
      logits_into(Sc, h_s, ws_v, bs);
      logits_into(Tc, ht.narrow(0, r0, c), wt_v, bt);

      with_real(real, [&](auto zero) {
      using R = decltype(zero);
      DivergenceArgsT<R> a;
      a.rows = c;
      a.vocab = V;
      a.student = Sc.data_ptr();
      a.ld_student = Sc.stride(0);
      a.student_dtype = to_dtype(hs.scalar_type());
      a.teacher = Tc.data_ptr();
      a.ld_teacher = Tc.stride(0);
      a.teacher_dtype = to_dtype(ht.scalar_type());
      a.grad = grads.any() ? Sc.data_ptr() : nullptr;  // the gradient overwrites the student logits
      a.ld_grad = Sc.stride(0);
      a.grad_dtype = a.student_dtype;
      a.weights = weights.data_ptr<R>() + r0;
      a.values = res.values.data_ptr<R>() + r0;
      a.divergence = div;
      a.jsd = make_jsd_coefficients(beta);
      a.ts = ts;
      a.tt = tt;
      a.num_threads = at::get_num_threads();
      run_epilogue(hs, a);
      });

      grads.accumulate(Sc, grads.need_w ? zero_dead_rows(h_s, weights.narrow(0, r0, c).ne(0)) : h_s, ws_v, r0);
    }
  }
  std::tie(res.grad_hidden, res.grad_weight, res.grad_bias) = grads.finish(hs, ws, bs_full);
  return res;
}

}  // namespace

void register_epilogues(c10::DeviceType device_type, const EpilogueTable* table) {
  TORCH_CHECK(device_type == c10::DeviceType::CUDA, "opd: only CUDA epilogues can be registered");
  g_cuda_epilogues = table;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_divergence(
    const Tensor& student_hidden, const Tensor& student_weight, const OptTensor& student_bias,
    const Tensor& teacher_hidden, const Tensor& teacher_weight, const OptTensor& teacher_bias,
    const Tensor& weights, c10::string_view divergence, double beta, double temperature,
    c10::optional<double> student_softcap, c10::optional<double> teacher_softcap, double student_scale,
    double teacher_scale, int64_t vocab_size, std::array<bool, 3> grad_mask, int64_t chunk_rows) {
  DivergenceResult r = run_linear_divergence(
      student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, weights,
      divergence, beta, temperature, student_softcap, teacher_softcap, student_scale, teacher_scale,
      vocab_size, grad_mask[0], grad_mask[1], grad_mask[2], chunk_rows);
  // sum_n w_n * value_n; values are 0 where w_n == 0, so an inf value never meets a 0 weight.
  Tensor loss = (weights.to(r.values.scalar_type()) * r.values).sum();
  return {loss, r.grad_hidden, r.grad_weight, r.grad_bias};
}

Tensor linear_divergence_values(
    const Tensor& student_hidden, const Tensor& student_weight, const OptTensor& student_bias,
    const Tensor& teacher_hidden, const Tensor& teacher_weight, const OptTensor& teacher_bias,
    const Tensor& weights, c10::string_view divergence, double beta, double temperature,
    c10::optional<double> student_softcap, c10::optional<double> teacher_softcap, double student_scale,
    double teacher_scale, int64_t vocab_size, int64_t chunk_rows) {
  return run_linear_divergence(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                               teacher_bias, weights, divergence, beta, temperature, student_softcap,
                               teacher_softcap, student_scale, teacher_scale, vocab_size, false, false,
                               false, chunk_rows)
      .values;
}

// ---- lse / gather primitive ------------------------------------------------------------------------
namespace {
// The chunk loop of the one-model ops (lse_gather, its backward, lse_gather_loss): per chunk of C rows,
//     Zc = h[r0 : r0 + c] @ W[:V].T + b[:V]          # into one reused (C, V) workspace
// then fn(R{}, Zc, h[r0 : r0 + c], r0) with R the row scalars' type (with_real(real, ...)).
template <class Fn>
void for_each_logits_chunk(const Tensor& hidden, const Tensor& w_v, const OptTensor& b_v, int64_t V,
                           int64_t chunk_rows, at::ScalarType real, Fn&& fn) {
  const int64_t N = hidden.size(0);
  if (N == 0) return;
  const int64_t C = rows_per_chunk(chunk_rows, N);
  Tensor Z = empty_buffer({C, workspace_ld(hidden, V)}, hidden.options());
  for (int64_t r0 = 0; r0 < N; r0 += C) {
    const int64_t c = std::min(C, N - r0);
    Tensor Zc = Z.narrow(0, 0, c).narrow(1, 0, V);
    const Tensor h = hidden.narrow(0, r0, c);
    logits_into(Zc, h, w_v, b_v);
    with_real(real, [&](auto zero) { fn(zero, Zc, h, r0); });
  }
}

// The fields that the arguments of every one-model epilogue share, for the chunk Zc of rows r0 ...
template <class A>
void set_logits_chunk(A& a, const Tensor& Zc, const Tensor& hidden, const Tensor& ids, int64_t r0, Transform t) {
  a.rows = Zc.size(0);
  a.vocab = Zc.size(1);
  a.logits = Zc.data_ptr();
  a.ld = Zc.stride(0);
  a.dtype = to_dtype(hidden.scalar_type());
  a.t = t;
  a.k = ids.size(1);
  a.ids = ids.data_ptr<int64_t>() + r0 * a.k;
  a.num_threads = at::get_num_threads();
}

// A per-row input (upstream gradient, teacher log-probs, ...) in the row scalars' dtype, or undefined.
Tensor real_or_undefined(const OptTensor& t, at::ScalarType real) {
  return (t.has_value() && t->defined()) ? t->to(real).contiguous() : Tensor();
}
}  // namespace

// Forward, per chunk:  Z = h[c] @ W[:V].T + b;  lse, gathered, entropy = epilogue(Z, ids[c]).
// Nothing N x V is allocated; with no gradient required this is the teacher gather.
std::tuple<Tensor, Tensor, Tensor> lse_gather(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& ids_in,
    double temperature, c10::optional<double> softcap, double scale, int64_t V, bool return_entropy,
    int64_t chunk_rows) {
  check_2d(hidden, "hidden");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == hidden.size(0), "opd: ids must be (N, k)");
  TORCH_CHECK(V >= 1 && V <= weight.size(0), "opd: vocab_size ", V, " out of range");
  const int64_t N = hidden.size(0), k = ids_in.size(1);
  const Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::ScalarType real = real_dtype(hidden, weight);
  const auto opts = hidden.options().dtype(real);
  Tensor lse = at::empty({N}, opts);
  Tensor gathered = at::empty({N, k}, opts);
  Tensor entropy = at::empty({return_entropy ? N : 0}, opts);
  const Transform t = transform_of(scale, temperature, softcap);
  for_each_logits_chunk(hidden, weight.narrow(0, 0, V).contiguous(), narrow_bias(bias, V), V, chunk_rows, real,
                        [&](auto zero, const Tensor& Zc, const Tensor&, int64_t r0) {
    using R = decltype(zero);
    LseGatherArgsT<R> a;
    set_logits_chunk(a, Zc, hidden, ids, r0, t);
    a.lse = lse.data_ptr<R>() + r0;
    a.gathered = gathered.data_ptr<R>() + r0 * k;
    a.entropy = return_entropy ? entropy.data_ptr<R>() + r0 : nullptr;
    run_epilogue(hidden, a);
  });
  return {lse, gathered, entropy};
}

// Backward: the upstream gradients are arbitrary, so the logits are recomputed per chunk (2 N V H more
// FLOPs than a scalar-loss fusion), turned into G = dloss/draw in place, then dh = G W, dW += G^T h.
std::tuple<Tensor, Tensor, Tensor> lse_gather_backward(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& ids_in,
    const Tensor& lse_in, const Tensor& entropy_in, const OptTensor& grad_lse, const OptTensor& grad_gathered,
    const OptTensor& grad_entropy, double temperature, c10::optional<double> softcap, double scale, int64_t V,
    std::array<bool, 3> grad_mask, int64_t chunk_rows) {
  check_2d(hidden, "hidden");
  const int64_t N = hidden.size(0), k = ids_in.size(1);
  const Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::ScalarType real = real_dtype(hidden, weight);
  const Tensor lse = lse_in.to(real).contiguous();
  const Tensor g_lse = real_or_undefined(grad_lse, real), g_gath = real_or_undefined(grad_gathered, real);
  const Tensor g_ent = real_or_undefined(grad_entropy, real);
  const Tensor entropy = g_ent.defined() ? entropy_in.to(real).contiguous() : Tensor();
  TORCH_CHECK(!g_ent.defined() || entropy.numel() == N, "opd: grad_entropy given but entropy was not computed");
  const Tensor w_v = weight.narrow(0, 0, V).contiguous();

  LinearGrads grads(hidden, weight, bias, V, grad_mask[0], grad_mask[1], grad_mask[2]);
  // rows with any nonzero (or NaN) upstream gradient; the epilogue writes zero rows for the others
  Tensor live = at::zeros({N}, hidden.options().dtype(at::kBool));
  if (g_lse.defined()) live.logical_or_(g_lse.ne(0));
  if (g_ent.defined()) live.logical_or_(g_ent.ne(0));
  if (g_gath.defined() && k > 0) live.logical_or_(g_gath.ne(0).any(1));
  if (!grads.any()) return grads.finish(hidden, weight, bias);
  Tensor scratch = at::empty({rows_per_chunk(chunk_rows, N), k}, hidden.options().dtype(at::kFloat));
  for_each_logits_chunk(hidden, w_v, narrow_bias(bias, V), V, chunk_rows, real,
                        [&](auto zero, const Tensor& Zc, const Tensor& h, int64_t r0) {
    using R = decltype(zero);
    LseGatherBackwardArgsT<R> a;
    set_logits_chunk(a, Zc, hidden, ids, r0, transform_of(scale, temperature, softcap));
    a.lse = lse.data_ptr<R>() + r0;
    a.entropy = data_or_null<R>(entropy, r0);
    a.g_lse = data_or_null<R>(g_lse, r0);
    a.g_gathered = data_or_null<R>(g_gath, r0 * k);
    a.g_entropy = data_or_null<R>(g_ent, r0);
    a.scratch = scratch.data_ptr<float>();
    run_epilogue(hidden, a);
    grads.accumulate(Zc, grads.need_w ? zero_dead_rows(h, live.narrow(0, r0, Zc.size(0))) : h, w_v, r0);
  });
  return grads.finish(hidden, weight, bias);
}

// ---- divergence of caller-held logits ------------------------------------------------------------------
// One pass per row through a row-sized fp32 scratch: bf16/fp16 logits are never upcast as a whole.
namespace {
std::tuple<Tensor, Tensor> run_logits_divergence(const Tensor& s, const Tensor& t, const Tensor& weights_in,
                                                 c10::string_view divergence, double beta, double temperature,
                                                 int64_t V, Tensor* grad) {
  check_2d(s, "student_logits");
  check_2d(t, "teacher_logits");
  TORCH_CHECK(s.size(0) == t.size(0), "opd: student_logits and teacher_logits need the same rows");
  TORCH_CHECK(V >= 1 && V <= s.size(1) && V <= t.size(1), "opd: vocab_size ", V, " out of range");
  const int64_t N = s.size(0);
  const at::ScalarType real = real_dtype(s, t);
  const Tensor weights = weights_in.to(real).contiguous();
  Tensor values = at::zeros({N}, s.options().dtype(real));
  if (N > 0) with_real(real, [&](auto zero) {
    using R = decltype(zero);
    DivergenceArgsT<R> a;
    a.rows = N;
    a.vocab = V;
    a.student = s.data_ptr();
    a.ld_student = s.stride(0);
    a.student_dtype = to_dtype(s.scalar_type());
    a.teacher = t.data_ptr();
    a.ld_teacher = t.stride(0);
    a.teacher_dtype = to_dtype(t.scalar_type());
    if (grad != nullptr) {
      a.grad = grad->data_ptr();
      a.ld_grad = grad->stride(0);
      a.grad_dtype = a.student_dtype;
    }
    a.weights = weights.data_ptr<R>();
    a.values = values.data_ptr<R>();
    a.divergence = parse_divergence(divergence, beta);
    a.jsd = make_jsd_coefficients(beta);
    a.ts = transform_of(1.0, temperature, c10::nullopt);
    a.tt = a.ts;
    a.num_threads = at::get_num_threads();
    run_epilogue(s, a);
    // student columns beyond vocab_size do not enter the loss: zero gradient
    if (grad != nullptr && V < grad->size(1)) grad->narrow(1, V, grad->size(1) - V).zero_();
  });
  Tensor loss = (weights * values).sum();
  return {loss, values};
}
}  // namespace

std::tuple<Tensor, Tensor, Tensor> logits_divergence(
    const Tensor& student_logits, const Tensor& teacher_logits, const Tensor& weights,
    c10::string_view divergence, double beta, double temperature, int64_t vocab_size, bool compute_grad) {
  Tensor grad = compute_grad ? empty_buffer(student_logits.sizes(), student_logits.options())
                             : at::empty({0}, student_logits.options());
  auto r = run_logits_divergence(student_logits, teacher_logits, weights, divergence, beta, temperature,
                                 vocab_size, compute_grad ? &grad : nullptr);
  return {std::get<0>(r), std::get<1>(r), grad};
}

std::tuple<Tensor, Tensor> logits_divergence_inplace_(
    Tensor& student_logits, const Tensor& teacher_logits, const Tensor& weights,
    c10::string_view divergence, double beta, double temperature, int64_t vocab_size) {
  // Each row is read completely into the scratch before its gradient is written back, so reading and
  // writing the same buffer is safe.
  return run_logits_divergence(student_logits, teacher_logits, weights, divergence, beta, temperature,
                               vocab_size, &student_logits);
}

// ---- fused lse/gather loss (sampled-token OPD, top-k teacher) ---------------------------------------
// The loss of each row is a function of the row's log-probs at k ids whose upstream gradient is known
// once they are (csrc/include/lse_gather_loss.h), so, per chunk (PyTorch equivalent):
//     Z = h[c] @ W[:V].T + b[:V]                        # the reused (C, V) workspace
//     values[c], Z = epilogue(Z, ids[c], teacher[c])     # Z now holds G = w * d loss / d raw
//     dh[c] = G @ W[:V];  dW[:V] += G.T @ h[c];  db[:V] += G.sum(0)
// FLOPs: 2 N V H forward + 4 N V H for the gradient, the minimum (the 3 GEMMs of the floor); nothing is
// recomputed in backward, which only scales by grad_output.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lse_gather_loss(
    const Tensor& hidden, const Tensor& weight, const OptTensor& bias, const Tensor& ids_in,
    const Tensor& teacher_in, const OptTensor& sampler_in, const Tensor& weights_in, c10::string_view kind,
    c10::string_view estimator, c10::string_view divergence, bool tail_bucket, double kl_coef,
    double entropy_coef, double temperature, c10::optional<double> softcap, double scale, int64_t V,
    std::array<bool, 3> grad_mask, int64_t chunk_rows) {
  check_2d(hidden, "hidden");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == hidden.size(0), "opd: ids must be (N, k)");
  TORCH_CHECK(teacher_in.sizes() == ids_in.sizes(), "opd: teacher log-probs must have the shape of ids");
  TORCH_CHECK(V >= 1 && V <= weight.size(0), "opd: vocab_size ", V, " out of range");
  RowLossSpec spec;
  TORCH_CHECK(kind == "sampled_token" || kind == "topk", "opd: kind must be 'sampled_token' or 'topk'");
  spec.kind = kind == "topk" ? kTopK : kSampledToken;
  TORCH_CHECK(estimator == "is" || estimator == "k1" || estimator == "k3", "opd: estimator must be is/k1/k3");
  spec.estimator = estimator == "is" ? kEstimatorIS : (estimator == "k1" ? kEstimatorK1 : kEstimatorK3);
  TORCH_CHECK(divergence == "reverse_kl" || divergence == "forward_kl",
              "opd: top-k divergence must be 'reverse_kl' or 'forward_kl'");
  spec.divergence = divergence == "forward_kl" ? kForwardKL : kReverseKL;
  spec.tail_bucket = tail_bucket ? 1 : 0;
  spec.kl_coef = kl_coef;
  spec.entropy_coef = entropy_coef;
  TORCH_CHECK(spec.kind == kTopK || ids_in.size(1) == 1, "opd: the sampled-token loss takes one id per row");
  const int64_t N = hidden.size(0), k = ids_in.size(1);
  const Tensor ids = ids_in.to(at::kLong).contiguous();
  const at::ScalarType real = real_dtype(hidden, weight);
  const Tensor teacher = teacher_in.to(real).contiguous();
  const Tensor sampler = real_or_undefined(sampler_in, real);
  TORCH_CHECK(!sampler.defined() || sampler.numel() == N, "opd: sampler log-probs must be (N,)");
  const Tensor weights = weights_in.to(real).contiguous();
  const Tensor w_v = weight.narrow(0, 0, V).contiguous();
  Tensor values = at::zeros({N}, hidden.options().dtype(real));
  LinearGrads grads(hidden, weight, bias, V, grad_mask[0], grad_mask[1], grad_mask[2]);
  Tensor scratch = at::empty({rows_per_chunk(chunk_rows, N), k}, hidden.options().dtype(at::kFloat));
  const Transform t = transform_of(scale, temperature, softcap);
  for_each_logits_chunk(hidden, w_v, narrow_bias(bias, V), V, chunk_rows, real,
                        [&](auto zero, const Tensor& Zc, const Tensor& h, int64_t r0) {
    using R = decltype(zero);
    LseGatherLossArgsT<R> a;
    set_logits_chunk(a, Zc, hidden, ids, r0, t);
    a.spec = spec;
    a.grad = grads.any() ? 1 : 0;
    a.teacher = teacher.data_ptr<R>() + r0 * k;
    a.sampler = data_or_null<R>(sampler, r0);
    a.weights = weights.data_ptr<R>() + r0;
    a.values = values.data_ptr<R>() + r0;
    a.scratch = scratch.data_ptr<float>();
    run_epilogue(hidden, a);
    if (grads.any()) {
      grads.accumulate(Zc, grads.need_w ? zero_dead_rows(h, weights.narrow(0, r0, Zc.size(0)).ne(0)) : h, w_v, r0);
    }
  });
  Tensor gh, gw, gb;
  std::tie(gh, gw, gb) = grads.finish(hidden, weight, bias);
  // outputs that were not requested are distinct empty tensors (the schema declares no aliasing)
  if (!grad_mask[1]) gw = at::empty({0}, weight.options());
  if (!grad_mask[2] || !bias.has_value() || !bias->defined()) gb = at::empty({0}, weight.options());
  // sum_n w_n * value_n; values are 0 where w_n == 0, so an inf value never meets a 0 weight.
  Tensor loss = (weights * values).sum();
  return {loss, values, gh, gw, gb};
}

}  // namespace opd
