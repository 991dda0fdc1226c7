// The CPU ISA dispatch state (cpu_isa.h) and its two library ops, cpu_isa / set_cpu_isa.
#include "cpu_isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

namespace peftkern {
namespace cpu {
namespace {

constexpr int kUnresolved = -1;
std::atomic<int> g_isa{kUnresolved};

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return true;
#if defined(PK_X86)
    // libgcc's cpuid probe also checks (xgetbv) that the OS saves the ymm / zmm state.
    case Isa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && cpu_has(Isa::kAvx2);
#endif
    default:
      return false;
  }
}

std::string supported_list() {
  std::string s;
  for (const auto& name : supported_isas()) s += (s.empty() ? "" : ", ") + name;
  return s;
}

Isa parse_supported(const std::string& name, const char* origin) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (name != isa_name(isa)) continue;
    TORCH_CHECK(cpu_has(isa), origin, ": this CPU (or this non-x86 build) cannot run the '", name,
                "' path; it supports: ", supported_list());
    return isa;
  }
  TORCH_CHECK(false, origin, ": unknown CPU ISA '", name, "'; expected scalar, avx2 or avx512 (this CPU supports: ",
              supported_list(), ")");
}

Isa resolve_at_first_use() {
  const char* forced = std::getenv("PEFTKERN_CPU_ISA");
  if (forced != nullptr && *forced != '\0') return parse_supported(forced, "PEFTKERN_CPU_ISA");
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_has(isa)) return isa;
  }
  return Isa::kScalar;
}

}  // namespace

Isa active_isa() {
  const int isa = g_isa.load(std::memory_order_relaxed);
  if (isa != kUnresolved) return static_cast<Isa>(isa);
  // A bad PEFTKERN_CPU_ISA throws here and stays unresolved, so every op reports it.
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (g_isa.load() == kUnresolved) g_isa.store(static_cast<int>(resolve_at_first_use()));
  return static_cast<Isa>(g_isa.load());
}

void set_isa(const std::string& name) { g_isa.store(static_cast<int>(parse_supported(name, "set_cpu_isa"))); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    default: return "scalar";
  }
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (cpu_has(isa)) names.emplace_back(isa_name(isa));
  }
  return names;
}

std::string cpu_isa_op() { return isa_name(active_isa()); }
void set_cpu_isa_op(const std::string& isa) { set_isa(isa); }
std::vector<std::string> cpu_isas_supported_op() { return supported_isas(); }

}  // namespace cpu
}  // namespace peftkern

// No tensor arguments: catch-all kernels.
TORCH_LIBRARY_FRAGMENT(peftkern, m) {
  m.impl("cpu_isa", &peftkern::cpu::cpu_isa_op);
  m.impl("set_cpu_isa", &peftkern::cpu::set_cpu_isa_op);
  m.impl("cpu_isas_supported", &peftkern::cpu::cpu_isas_supported_op);
}
