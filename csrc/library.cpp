// Library-level ops: build information and the debug switch that poisons fresh outputs (the CPU
// ISA ops live in common/cpu_isa.cpp).
#include <torch/library.h>

#include <atomic>
#include <sstream>
#include <string>

#include "common/cpu_gemm.h"
#include "common/cpu_isa.h"
#include "common/outputs.h"

#if defined(PEFTKERN_WITH_CUDA)
#include <cuda_runtime_api.h>  // CUDART_VERSION: the toolkit this binary was compiled with
#endif

#include "build_config.h"  // generated: PEFTKERN_CUDA_ARCHS, PEFTKERN_TORCH_VERSION

namespace peftkern {
namespace {

std::atomic<bool> g_poison_outputs{false};

std::string compiler_name() {
  std::ostringstream s;
#if defined(__clang__)
  s << "clang " << __clang_major__ << "." << __clang_minor__;
#elif defined(__GNUC__)
  s << "gcc " << __GNUC__ << "." << __GNUC_MINOR__ << "." << __GNUC_PATCHLEVEL__;
#else
  s << "unknown";
#endif
  return s.str();
}

std::string build_info() {
  std::ostringstream s;
  s << "{\"cuda\": ";
#if defined(PEFTKERN_WITH_CUDA)
  s << "\"" << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10 << "\"";
#else
  s << "null";
#endif
  s << ", \"cuda_archs\": \"" << PEFTKERN_CUDA_ARCHS << "\"";
  s << ", \"torch\": \"" << PEFTKERN_TORCH_VERSION << "\"";
  s << ", \"compiler\": \"" << compiler_name() << "\"";
  // The CPU SIMD path in use (a bad PEFTKERN_CPU_ISA is reported here rather than thrown) and
  // every path this CPU supports.
  s << ", \"cpu_isa\": \"";
  try {
    s << cpu::isa_name(cpu::active_isa());
  } catch (const std::exception&) {
    s << "error: invalid PEFTKERN_CPU_ISA";
  }
  s << "\", \"cpu_isas_supported\": [";
  const auto isas = cpu::supported_isas();
  for (size_t i = 0; i < isas.size(); ++i) s << (i ? ", " : "") << "\"" << isas[i] << "\"";
  // The library of the layers' float32 CPU base GEMMs (common/cpu_gemm.h)
  s << "], \"cpu_gemm\": \"";
  try {
    s << cpu::gemm_name(cpu::active_gemm());
  } catch (const std::exception&) {
    s << "error: invalid PEFTKERN_CPU_GEMM";
  }
  s << "\"}";
  return s.str();
}

void set_poison_outputs(bool enabled) { g_poison_outputs.store(enabled); }

}  // namespace

bool poison_outputs_enabled() { return g_poison_outputs.load(std::memory_order_relaxed); }

}  // namespace peftkern

// No tensor arguments means no dispatch key: impl() in a fragment registers a catch-all kernel.
TORCH_LIBRARY_FRAGMENT(peftkern, m) {
  m.impl("build_info", &peftkern::build_info);
  m.impl("set_poison_outputs", &peftkern::set_poison_outputs);
}
