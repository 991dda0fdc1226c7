// CPU implementation of nf4_lora_gemv (see qlora_host.h): the 4-bit weight is read once, decoded
// in registers a block-segment at a time, and dotted with every token; bias and the LoRA-B
// product are added in the same pass over the output. Parallel over output rows.
// Two kinds of row kernel, chosen by the ISA dispatch (common/cpu_isa.h): the portable one below
// (the spec of the summation, 8 partial sums), or the AVX-512 / AVX2 ones (qlora_cpu_x86.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/cpu_isa.h"
#include "../common/dispatch.h"
#include "qlora_cpu_x86.h"
#include "qlora_host.h"

namespace peftkern {
namespace qlora {
namespace {

// sum_j x[j]·w[j] in float32 with 8 independent partial sums, so the compiler can vectorise it
// without reassociating (we build with -ffp-contract=off and no -ffast-math).
template <typename T>
inline float dot(const T* x, const float* w, int64_t len) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    for (int l = 0; l < 8; ++l) partial[l] += static_cast<float>(x[j + l]) * w[j + l];
  }
  float sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
              ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  for (; j < len; ++j) sum += static_cast<float>(x[j]) * w[j];
  return sum;
}

// The epilogue of out[t, o]: the weight's dot product plus bias plus the LoRA term, rounded once.
// `lora_term`: sum_r xa[t, r] * B[o, r] already computed (the AVX-512 path), or nullptr to sum it
// here in order.
template <typename T>
inline void finish(float dot, int64_t t, int64_t o, const GemvArgs& a, const T* bias, const T* xa,
                   const T* lora_b, float scaling, T* out, const float* lora_term = nullptr) {
  float y = dot;
  if (bias != nullptr) y += static_cast<float>(bias[o]);
  if (a.rank > 0) {
    float lora = 0.0f;
    if (lora_term != nullptr) {
      lora = *lora_term;
    } else {
      for (int64_t r = 0; r < a.rank; ++r) {
        lora += static_cast<float>(xa[t * a.rank + r]) * static_cast<float>(lora_b[o * a.rank + r]);
      }
    }
    y += scaling * lora;
  }
  out[t * a.out_features + o] = static_cast<T>(y);
}

template <typename T>
void gemv_rows(const T* x, const uint8_t* packed, const GemvArgs& a, const T* bias, const T* xa,
               const T* lora_b, float scaling, T* out, int64_t row_begin, int64_t row_end) {
  const int64_t K = a.in_features, tokens = a.tokens;
  float table[quant::kNf4Codes];
  for (int c = 0; c < quant::kNf4Codes; ++c) table[c] = quant::nf4_value(c);
  std::vector<float> acc(tokens), part(tokens), w(std::min<int64_t>(K, a.blocksize));
  for (int64_t o = row_begin; o < row_end; ++o) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    // A row is cut into segments that each lie in one quantization block: decode the segment's
    // codes once, dot it with every token, scale the partial sums by the block's absmax.
    for (int64_t i = 0; i < K;) {
      const int64_t e = o * K + i;
      const int64_t block = e / a.blocksize;
      const int64_t end = std::min(K, (block + 1) * a.blocksize - o * K);
      const int64_t len = end - i;
      for (int64_t j = 0; j < len; ++j) w[j] = table[quant::nf4_code_at(packed, e + j)];
      const float scale = a.scales(block);
      for (int64_t t = 0; t < tokens; ++t) {
        acc[t] += dot(x + t * K + i, w.data(), len) * scale;
      }
      i = end;
    }
    for (int64_t t = 0; t < tokens; ++t) finish(acc[t], t, o, a, bias, xa, lora_b, scaling, out);
  }
}

at::Tensor nf4_lora_gemv_cpu(const at::Tensor& x_in, const at::Tensor& packed,
                             const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code,
                             const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                             int64_t nested_blocksize, int64_t out_features,
                             const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& xa,
                             const std::optional<at::Tensor>& lora_b, double scaling) {
  const GemvArgs args = check_nf4_lora_gemv(x_in, packed, absmax, nested_absmax, nested_code,
                                      nested_offset, blocksize, nested_blocksize, out_features,
                                      bias, xa, lora_b);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = new_output({args.tokens, out_features}, x.options());
  if (out.numel() == 0) return out;
  [[maybe_unused]] const cpu::Isa isa = cpu::active_isa();
#if defined(PK_X86)
  if (isa != cpu::Isa::kScalar) {
    // The SIMD kernels read x as float32 (T x K values: nothing next to the weight's N x K / 2 B).
    at::Tensor xf = x.to(at::kFloat).contiguous();
    if (isa == cpu::Isa::kAvx512 && x86::avx512_chunked_layout(args)) {
      at::Tensor chunked = at::empty({args.tokens, x86::chunked_x_row(args)}, xf.options());
      x86::prepare_x_avx512(xf.const_data_ptr<float>(), args, chunked.mutable_data_ptr<float>());
      xf = chunked;
    }
    std::vector<float> dots(args.tokens * out_features);
    // AVX-512: the LoRA terms xa·Bᵀ in vectors (r lanes at a time, B read in its dtype), not the
    // scalar loop: that took ~40 µs of a 5632-row bf16 GEMV (15 µs in float32).
    const bool vector_lora = isa == cpu::Isa::kAvx512 && args.rank > 0;
    const at::Tensor xa_f = vector_lora ? xa->to(at::kFloat).contiguous() : at::Tensor();
    std::vector<float> lora_terms(vector_lora ? args.tokens * out_features : 0);
    PK_DISPATCH_FLOAT_HALF_BFLOAT16(x.scalar_type(), "nf4_lora_gemv_cpu", [&] {
      const scalar_t* bias_ptr = optional_data<scalar_t>(bias);
      const scalar_t* xa_ptr = optional_data<scalar_t>(xa);
      const scalar_t* b_ptr = optional_data<scalar_t>(lora_b);
      scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
        const auto rows = isa == cpu::Isa::kAvx512 ? x86::gemv_dots_avx512 : x86::gemv_dots_avx2;
        rows(xf.const_data_ptr<float>(), packed.const_data_ptr<uint8_t>(), args, begin, end, dots.data());
        if (vector_lora) {
          x86::lora_terms_avx512(xa_f.const_data_ptr<float>(), args.tokens, args.rank, b_ptr, begin, end,
                                 out_features, lora_terms.data());
        }
        for (int64_t o = begin; o < end; ++o) {
          for (int64_t t = 0; t < args.tokens; ++t) {
            finish(dots[t * out_features + o], t, o, args, bias_ptr, xa_ptr, b_ptr, static_cast<float>(scaling),
                   out_ptr, vector_lora ? &lora_terms[t * out_features + o] : nullptr);
          }
        }
      });
    });
    return out;
  }
#endif
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(x.scalar_type(), "nf4_lora_gemv_cpu", [&] {
    const scalar_t* bias_ptr = optional_data<scalar_t>(bias);
    const scalar_t* xa_ptr = optional_data<scalar_t>(xa);
    const scalar_t* b_ptr = optional_data<scalar_t>(lora_b);
    at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
      gemv_rows<scalar_t>(x.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(), args,
                          bias_ptr, xa_ptr, b_ptr, static_cast<float>(scaling),
                          out.mutable_data_ptr<scalar_t>(), begin, end);
    });
  });
  return out;
}

}  // namespace
}  // namespace qlora
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("nf4_lora_gemv", &peftkern::qlora::nf4_lora_gemv_cpu);
}
