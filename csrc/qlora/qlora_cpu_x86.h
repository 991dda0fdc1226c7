// The SIMD row kernels of the CPU nf4_lora_gemv (qlora_cpu_x86.cpp), one per ISA:
//   dots[t, o] = sum_i x[t, i] * deq(W)[o, i]   for o in [row_begin, row_end), t < tokens
// x: float32 [tokens, K] contiguous; dots: float32 [tokens, N]. qlora_cpu.cpp adds the epilogue.
#pragma once

#include "../common/cpu_isa.h"
#include "qlora_host.h"

#if defined(PK_X86)
namespace peftkern {
namespace qlora {
namespace x86 {

// The AVX-512 kernel reads x in its own order where the layout allows (avx512_chunked_layout):
// gemv_dots_avx512 then takes x_chunked, which prepare_x_avx512 writes ([tokens, K] float32).
bool avx512_chunked_layout(const GemvArgs& a);
void prepare_x_avx512(const float* x, const GemvArgs& a, float* x_chunked);
void gemv_dots_avx512(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                      int64_t row_end, float* dots);
void gemv_dots_avx2(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                    int64_t row_end, float* dots);

}  // namespace x86
}  // namespace qlora
}  // namespace peftkern
#endif
