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
// gemv_dots_avx512 then takes x_chunked, which prepare_x_avx512 writes ([tokens, chunked_x_row] float32).
bool avx512_chunked_layout(const GemvArgs& a);
int64_t chunked_x_row(const GemvArgs& a);  // the row length of x_chunked (in_features rounded up to 128)
void prepare_x_avx512(const float* x, const GemvArgs& a, float* x_chunked);
void gemv_dots_avx512(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                      int64_t row_end, float* dots);
void gemv_dots_avx2(const float* x, const uint8_t* packed, const GemvArgs& a, int64_t row_begin,
                    int64_t row_end, float* dots);

// The LoRA terms of the epilogue: terms[t, o] = sum_k xa[t, k] * B[o, k] for o in [row_begin,
// row_end), t < tokens; xa float32 [tokens, r], B [N, r] contiguous (float, c10::Half or
// c10::BFloat16, widened exactly). Per (t, o): 16-lane FMAs over r, then a tree reduction.
template <typename T>
PK_TARGET_AVX512 void lora_terms_avx512(const float* xa, int64_t tokens, int64_t r, const T* lora_b, int64_t row_begin,
                                        int64_t row_end, int64_t N, float* terms);

}  // namespace x86
}  // namespace qlora
}  // namespace peftkern
#endif
