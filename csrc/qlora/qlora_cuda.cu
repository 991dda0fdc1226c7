// CUDA implementation of nf4_lora_gemv (see qlora_host.h): QLoRA at decode sizes, where the
// layer is bandwidth-bound. The 4-bit weight is read exactly once, 16 bytes per lane per load,
// decoded in registers (never written to memory as a dequantized tile), dotted in fp32 with up
// to kMaxTokens tokens; bias and the LoRA-B product are added in the same pass. Same checks
// (qlora_host.h) and per-element math (common/blockwise_quant.h) as qlora_cpu.cpp.
//
// Layout of the work: one warp per output row o (kWarpsPerCta rows per CTA); blockIdx.y picks a
// chunk of kMaxTokens tokens, so more tokens re-read the weight (callers use this op for <= 8).
//
// Vector path, taken when (checked on the host) K % 32 == 0, `packed` is 16-B aligned, x is
// 16-B aligned with a row stride that is a multiple of 8 elements:
//   lane l reads 16-byte chunks c = l, l + 32, ... of row o (coalesced: a warp reads 512
//   contiguous bytes). Chunk c holds the 32 codes of elements [32c, 32c + 32) of the row, flat
//   elements o·K + 32c ... which all lie in ONE quantization block, because blocksize is a
//   multiple of 32 and o·K + 32c is a multiple of 32. So the absmax is read once per chunk and
//   applied to the chunk's partial sum. x is read 8 elements per vector load.
// Scalar path (any K, any alignment): lane l takes elements i = l, l + 32, ..., one code and one
// block scale per element. Correct for every shape; used for odd K (rows that start mid-byte).
// Epilogue: lanes split the rank dimension of scaling · xa[t]·lora_b[o], the warp reduces each
// token's sum with shuffles, lane 0 adds the bias and stores out[t, o] in x's dtype.
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <cstdint>

#include "../common/dispatch.h"
#include "../common/cuda_guard.h"
#include "qlora_host.h"

namespace peftkern {
namespace qlora {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerCta = 4;
constexpr int kMaxTokens = 8;

// 8 consecutive elements of x as float; p is 16-B aligned (vector path only).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
  } else {
    static_assert(sizeof(T) == 2, "x is float32, float16 or bfloat16");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // element j = the (j % 2)-th half of word j / 2 (little-endian)
      const uint16_t bits = static_cast<uint16_t>(words[j / 2] >> (16 * (j % 2)));
      f[j] = static_cast<float>(T(bits, T::from_bits()));
    }
  }
}

template <typename T, int kTokens>
__global__ void __launch_bounds__(kWarpsPerCta* kWarp)
    nf4_lora_gemv_kernel(const T* __restrict__ x, int64_t x_stride,      // [tokens, K]
                         const uint8_t* __restrict__ packed,              // [ceil(N·K / 2)]
                         quant::BlockScales scales,                       // per block of W
                         const T* __restrict__ bias,                      // [N] or null
                         const T* __restrict__ xa,                        // [tokens, rank]
                         const T* __restrict__ lora_b,                    // [N, rank]
                         float scaling, T* __restrict__ out,              // [tokens, N]
                         int64_t tokens, int64_t K, int64_t N, int64_t rank, int64_t blocksize,
                         bool vector_path) {
  __shared__ float table[quant::kNf4Codes];
  if (threadIdx.x < quant::kNf4Codes) table[threadIdx.x] = quant::nf4_value(threadIdx.x);
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  if (o >= N) return;  // a whole warp leaves together: the shuffles below stay full-warp
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kMaxTokens;
  const int nt = static_cast<int>(min(static_cast<int64_t>(kTokens), tokens - t0));  // 1..kTokens
  const T* xc = x + t0 * x_stride;

  float acc[kTokens];
#pragma unroll
  for (int t = 0; t < kTokens; ++t) acc[t] = 0.0f;

  if (vector_path) {
    const uint4* row = reinterpret_cast<const uint4*>(packed + o * (K / 2));
    for (int64_t c = lane; c < K / 32; c += kWarp) {
      const uint4 q = row[c];
      const float scale = scales((o * K + c * 32) / blocksize);
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};  // byte 4w + b of the chunk = bits 8b of word w
      float part[kTokens];
#pragma unroll
      for (int t = 0; t < kTokens; ++t) part[t] = 0.0f;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        float wv[8];  // elements 32c + 8w ... + 7
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t byte = (words[w] >> (8 * b)) & 0xFFu;
          wv[2 * b] = table[byte >> 4];
          wv[2 * b + 1] = table[byte & 15u];
        }
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          if (t < nt) {
            float xv[8];
            load8(xc + t * x_stride + c * 32 + 8 * w, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) part[t] = fmaf(xv[j], wv[j], part[t]);
          }
        }
      }
#pragma unroll
      for (int t = 0; t < kTokens; ++t) acc[t] = fmaf(part[t], scale, acc[t]);
    }
  } else {
    for (int64_t i = lane; i < K; i += kWarp) {
      const int64_t e = o * K + i;
      const float w = table[quant::nf4_code_at(packed, e)] * scales(e / blocksize);
#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
        if (t < nt) acc[t] = fmaf(static_cast<float>(xc[t * x_stride + i]), w, acc[t]);
      }
    }
  }

  for (int64_t r = lane; r < rank; r += kWarp) {  // rank == 0: no adapter
    const float b = scaling * static_cast<float>(lora_b[o * rank + r]);
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (t < nt) acc[t] = fmaf(static_cast<float>(xa[(t0 + t) * rank + r]), b, acc[t]);
    }
  }

#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], offset);
    }
  }
  if (lane == 0) {
    const float b = bias != nullptr ? static_cast<float>(bias[o]) : 0.0f;
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {  // constant bounds keep acc[] in registers
      if (t < nt) out[(t0 + t) * N + o] = static_cast<T>(acc[t] + b);
    }
  }
}

template <typename T, int kTokens>
void launch(const at::Tensor& x, const at::Tensor& packed, const GemvArgs& a, const T* bias,
            const T* xa, const T* lora_b, float scaling, at::Tensor& out, bool vector_path) {
  const dim3 grid(static_cast<unsigned>(ceil_div(a.out_features, kWarpsPerCta)),
                  static_cast<unsigned>(ceil_div(a.tokens, kMaxTokens)));
  PK_LAUNCH(grid, kWarpsPerCta * kWarp, 0, at::cuda::getCurrentCUDAStream(), nf4_lora_gemv_kernel<T, kTokens>)(
      x.const_data_ptr<T>(), x.stride(0), packed.const_data_ptr<uint8_t>(), a.scales, bias, xa,
      lora_b, scaling, out.mutable_data_ptr<T>(), a.tokens, a.in_features, a.out_features, a.rank,
      a.blocksize, vector_path);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nf4_lora_gemv_cuda(const at::Tensor& x, const at::Tensor& packed,
                              const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code,
                              const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                              int64_t nested_blocksize, int64_t out_features,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& xa,
                              const std::optional<at::Tensor>& lora_b, double scaling) {
  const CudaDeviceGuard guard(x);
  const GemvArgs args = check_nf4_lora_gemv(x, packed, absmax, nested_absmax, nested_code,
                                      nested_offset, blocksize, nested_blocksize, out_features,
                                      bias, xa, lora_b);
  at::Tensor out = new_output({args.tokens, out_features}, x.options());
  if (out.numel() == 0) return out;
  TORCH_CHECK(ceil_div(args.tokens, kMaxTokens) <= 65535, "nf4_lora_gemv: at most ",
              65535 * kMaxTokens, " tokens (it is the decode path), got ", args.tokens);
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool vector_path = args.in_features % 32 == 0 && aligned16(packed.const_data_ptr()) &&
                           aligned16(x.const_data_ptr()) && x.stride(0) % 8 == 0;
  const int64_t per_chunk = std::min<int64_t>(args.tokens, kMaxTokens);
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(x.scalar_type(), "nf4_lora_gemv_cuda", [&] {
    const scalar_t* bias_ptr = optional_data<scalar_t>(bias);
    const scalar_t* xa_ptr = optional_data<scalar_t>(xa);
    const scalar_t* b_ptr = optional_data<scalar_t>(lora_b);
    const float s = static_cast<float>(scaling);
    if (per_chunk == 1) {
      launch<scalar_t, 1>(x, packed, args, bias_ptr, xa_ptr, b_ptr, s, out, vector_path);
    } else if (per_chunk == 2) {
      launch<scalar_t, 2>(x, packed, args, bias_ptr, xa_ptr, b_ptr, s, out, vector_path);
    } else if (per_chunk <= 4) {
      launch<scalar_t, 4>(x, packed, args, bias_ptr, xa_ptr, b_ptr, s, out, vector_path);
    } else {
      launch<scalar_t, 8>(x, packed, args, bias_ptr, xa_ptr, b_ptr, s, out, vector_path);
    }
  });
  return out;
}

}  // namespace
}  // namespace qlora
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("nf4_lora_gemv", &peftkern::qlora::nf4_lora_gemv_cuda);
}
