// Runtime choice of the CPU instruction set for the kernels that have SIMD paths (the NF4 decode
// and the QLoRA decode GEMV). The build never uses -march: SIMD functions carry a per-function
// `target` attribute (PK_TARGET_AVX2 / PK_TARGET_AVX512) so one binary runs on any x86-64, and
// they are only called after cpuid said the CPU has the instructions.
//
// Chosen once, on the first call of active_isa(): PEFTKERN_CPU_ISA=scalar|avx2|avx512 if set (an
// ISA the CPU lacks is an error that names what it has), else the best the CPU supports.
// set_isa() switches at runtime (tests run every supported path in one process).
#pragma once

#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define PK_X86 1
// AVX2 + FMA (+ F16C, which every AVX2 CPU has): Haswell, Zen 1 and later.
#define PK_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX-512 F/BW/VL (Skylake-SP, Zen 4 and later); vpermw needs BW, the ymm/xmm forms VL.
#define PK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#endif

namespace peftkern {
namespace cpu {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The path the SIMD kernels take now. Throws (a clear message) if PEFTKERN_CPU_ISA is invalid.
Isa active_isa();
// Forces a path; throws if `name` is unknown or the CPU lacks it.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);
// Every path this CPU (and this build) can run, scalar first.
std::vector<std::string> supported_isas();

}  // namespace cpu
}  // namespace peftkern
