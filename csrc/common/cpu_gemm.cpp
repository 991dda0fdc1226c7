// The CPU GEMM library choice (cpu_gemm.h) and its two library ops, cpu_gemm / set_cpu_gemm.
#include "cpu_gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#include "cpu_isa.h"

namespace peftkern {
namespace cpu {
namespace {

constexpr int kUnresolved = -1;
std::atomic<int> g_gemm{kUnresolved};

// PyTorch's oneDNN linear, when this build of PyTorch has it (x86 builds with MKL-DNN do).
const c10::OperatorHandle* onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> handle =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return handle.has_value() ? &*handle : nullptr;
}

GemmLibrary parse(const std::string& name, const char* origin) {
  if (name == "aten") return GemmLibrary::kAten;
  if (name == "onednn") {
    TORCH_CHECK(onednn_linear_op() != nullptr, origin,
                ": 'onednn' needs PyTorch's mkldnn::_linear_pointwise, which this PyTorch build lacks");
    return GemmLibrary::kOneDnn;
  }
  TORCH_CHECK(false, origin, ": unknown CPU GEMM library '", name, "'; expected aten or onednn");
}

GemmLibrary resolve_at_first_use() {
  const char* forced = std::getenv("PEFTKERN_CPU_GEMM");
  if (forced != nullptr && *forced != '\0') return parse(forced, "PEFTKERN_CPU_GEMM");
#if defined(PK_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_is("amd") && onednn_linear_op() != nullptr) return GemmLibrary::kOneDnn;
#endif
  return GemmLibrary::kAten;
}

bool onednn_applies(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  // oneDNN refuses an empty reduction (K = 0); empty outputs need no GEMM either
  return x.is_cpu() && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
         (!bias.has_value() || bias->scalar_type() == at::kFloat) && x.dim() == 2 && w.dim() == 2 &&
         x.numel() > 0 && w.numel() > 0 && active_gemm() == GemmLibrary::kOneDnn;
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  // Boxed: the op's C++ signature is PyTorch-internal; its schema is what is stable.
  std::vector<c10::IValue> stack{x, w, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), c10::IValue("none"),
                                 c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue("")};
  onednn_linear_op()->callBoxed(stack);
  return stack.front().toTensor();
}

}  // namespace

GemmLibrary active_gemm() {
  const int library = g_gemm.load(std::memory_order_relaxed);
  if (library != kUnresolved) return static_cast<GemmLibrary>(library);
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (g_gemm.load() == kUnresolved) g_gemm.store(static_cast<int>(resolve_at_first_use()));
  return static_cast<GemmLibrary>(g_gemm.load());
}

void set_gemm(const std::string& name) { g_gemm.store(static_cast<int>(parse(name, "set_cpu_gemm"))); }

const char* gemm_name(GemmLibrary library) { return library == GemmLibrary::kOneDnn ? "onednn" : "aten"; }

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  if (onednn_applies(x, w, bias)) return onednn_linear(x, w, bias);
  return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

void linear_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  if (onednn_applies(x, w, bias)) {
    out.copy_(onednn_linear(x, w, bias));  // oneDNN writes a fresh [M, N]; a band of `out` takes a copy
  } else if (bias.has_value()) {
    at::addmm_out(out, *bias, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

std::string cpu_gemm_op() { return gemm_name(active_gemm()); }
void set_cpu_gemm_op(const std::string& name) { set_gemm(name); }

}  // namespace cpu
}  // namespace peftkern

// No tensor arguments: catch-all kernels.
TORCH_LIBRARY_FRAGMENT(peftkern, m) {
  m.impl("cpu_gemm", &peftkern::cpu::cpu_gemm_op);
  m.impl("set_cpu_gemm", &peftkern::cpu::set_cpu_gemm_op);
}
