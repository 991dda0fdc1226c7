// The SIMD implementations of nf4::cpu::decode_range (nf4_cpu_decode_x86.cpp), one per ISA. Only
// nf4_cpu_decode.cpp calls them, after the ISA dispatch (common/cpu_isa.h) chose the path.
#pragma once

#include "../common/cpu_isa.h"
#include "nf4_cpu_decode.h"

#if defined(PK_X86)
namespace peftkern {
namespace nf4 {
namespace cpu {
namespace x86 {

#define PK_DECLARE_DECODE(name)                                                                        \
  void name(const uint8_t*, const quant::BlockScales&, int64_t, int64_t, int64_t, float*);           \
  void name(const uint8_t*, const quant::BlockScales&, int64_t, int64_t, int64_t, c10::Half*);       \
  void name(const uint8_t*, const quant::BlockScales&, int64_t, int64_t, int64_t, c10::BFloat16*);
PK_DECLARE_DECODE(decode_range_avx512)
PK_DECLARE_DECODE(decode_range_avx2)
#undef PK_DECLARE_DECODE

}  // namespace x86
}  // namespace cpu
}  // namespace nf4
}  // namespace peftkern
#endif
