// CUDA kernels of the NF4 family. Same ops, same checks (nf4_host.h) and same per-element math
// (common/blockwise_quant.h) as nf4_cpu.cpp, so the CPU tests prove the arithmetic and this
// file only has to get the indexing right. Every kernel indexes with int64 and runs on the
// current stream of the input's device; every launch is checked.
#include "../common/dispatch.h"
#include "../common/cuda_guard.h"
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include "nf4_host.h"

namespace peftkern {
namespace nf4 {
namespace {

using quant::BlockNormalizer;

constexpr int kWarp = 32;
constexpr int kWarpsPerCta = 8;  // quantize kernels: one warp per quantization block
constexpr int kThreads = 256;
constexpr int kElemsPerThread = 8;  // dequantize: 4 packed bytes -> 8 outputs per thread

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = max_propagating_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// One warp per quantization block; lane l reads elements l, l + 32, ... (coalesced), then
// encodes the byte pairs j = l, l + 32, ... A block's elements are read twice (absmax, then
// codes); the second read hits L1/L2. Quantization runs once per weight, so simplicity wins.
// Assumes: blocksize even (checked on the host), so every block starts on a byte boundary.
template <typename T>
__global__ void nf4_quantize_kernel(const T* __restrict__ weight,  // [n]
                                    uint8_t* __restrict__ packed,  // [ceil(n / 2)]
                                    float* __restrict__ absmax,    // [blocks]
                                    int64_t n, int64_t blocksize, int64_t blocks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  if (b >= blocks) return;  // whole warps exit together: the shuffles below stay full-warp
  const int64_t start = b * blocksize;
  const int64_t len = min(blocksize, n - start);
  const T* x = weight + start;

  float m = 0.0f;
  for (int64_t i = lane; i < len; i += kWarp) m = max_propagating_nan(m, fabsf(static_cast<float>(x[i])));
  const float raw_absmax = warp_max(m);
  const BlockNormalizer normalize(raw_absmax, n % blocksize != 0 && b == blocks - 1);
  if (lane == 0) absmax[b] = normalize.stored_absmax(raw_absmax);

  for (int64_t j = lane; j < (len + 1) / 2; j += kWarp) {
    const int hi = quant::nf4_encode(normalize(static_cast<float>(x[2 * j])));
    // The odd element count's missing partner is encoded as 0.0, as bitsandbytes pads.
    const float partner = 2 * j + 1 < len ? static_cast<float>(x[2 * j + 1]) : 0.0f;
    const int lo = quant::nf4_encode(2 * j + 1 < len ? normalize(partner) : 0.0f);
    packed[start / 2 + j] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

struct PlainAbsmax {
  const float* absmax;  // [blocks]
  __device__ float operator()(int64_t b) const { return absmax[b]; }
};

struct NestedAbsmax {
  const uint8_t* codes;        // [blocks]
  const float* nested_absmax;  // [ceil(blocks / nested_blocksize)]
  const float* code;           // [256]
  const float* offset;         // [1]
  int64_t nested_blocksize;
  __device__ float operator()(int64_t b) const {
    return quant::nested_absmax_value(code[codes[b]], nested_absmax[b / nested_blocksize],
                                      *offset);
  }
};

// Stores 8 consecutive outputs in one vector store (16 B for half types, 2 x 16 B for float).
template <typename T>
struct alignas(sizeof(T) * kElemsPerThread) OutChunk {
  T v[kElemsPerThread];
};

// Thread t expands packed bytes [4t, 4t + 4) into outputs [8t, 8t + 8).
// Assumes: blocksize is a multiple of 8 (>= 32, checked on the host), so the 8 outputs of one
// thread share one absmax; `out` is a fresh allocation (256-B aligned), so a full chunk at
// element 8t is aligned for OutChunk. Chunks that cross the end of the tensor store scalars.
template <typename T, typename ScaleOf>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed,  // [ceil(n / 2)]
                                      ScaleOf scale_of, T* __restrict__ out,  // [n]
                                      int64_t n, int64_t blocksize) {
  __shared__ float table[quant::kNf4Codes];
  if (threadIdx.x < quant::kNf4Codes) table[threadIdx.x] = quant::nf4_value(threadIdx.x);
  __syncthreads();

  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) *
                        kElemsPerThread;
  if (first >= n) return;
  const float scale = scale_of(first / blocksize);
  const uint8_t* src = packed + first / 2;

  if (first + kElemsPerThread <= n) {
    OutChunk<T> chunk;
#pragma unroll
    for (int j = 0; j < kElemsPerThread / 2; ++j) {
      const uint8_t byte = src[j];
      chunk.v[2 * j] = static_cast<T>(mul_rn(table[byte >> 4], scale));
      chunk.v[2 * j + 1] = static_cast<T>(mul_rn(table[byte & 15], scale));
    }
    *reinterpret_cast<OutChunk<T>*>(out + first) = chunk;
  } else {
    for (int64_t i = first; i < n; ++i) {
      const uint8_t byte = src[(i - first) / 2];
      const int code = (i - first) % 2 == 0 ? byte >> 4 : byte & 15;
      out[i] = static_cast<T>(mul_rn(table[code], scale));
    }
  }
}

// One warp per block, as nf4_quantize_kernel; the 256-entry code table is staged in shared
// memory for the binary search.
template <typename T>
__global__ void quantize_8bit_kernel(const T* __restrict__ x,        // [n]
                                     const float* __restrict__ code,  // [256], sorted
                                     uint8_t* __restrict__ codes,     // [n]
                                     float* __restrict__ absmax,      // [blocks]
                                     int64_t n, int64_t blocksize, int64_t blocks) {
  __shared__ float table[quant::kCode8Size];
  for (int i = threadIdx.x; i < quant::kCode8Size; i += blockDim.x) table[i] = code[i];
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + threadIdx.x / kWarp;
  if (b >= blocks) return;
  const int64_t start = b * blocksize;
  const int64_t len = min(blocksize, n - start);

  float m = 0.0f;
  for (int64_t i = lane; i < len; i += kWarp) {
    m = max_propagating_nan(m, fabsf(static_cast<float>(x[start + i])));
  }
  const float raw_absmax = warp_max(m);
  const BlockNormalizer normalize(raw_absmax, n % blocksize != 0 && b == blocks - 1);
  if (lane == 0) absmax[b] = normalize.stored_absmax(raw_absmax);
  for (int64_t i = lane; i < len; i += kWarp) {
    codes[start + i] = static_cast<uint8_t>(
        quant::code8_encode(normalize(static_cast<float>(x[start + i])), table));
  }
}

__global__ void dequantize_8bit_kernel(const uint8_t* __restrict__ codes,  // [n]
                                       const float* __restrict__ absmax,   // [blocks]
                                       const float* __restrict__ code,     // [256]
                                       float* __restrict__ out,            // [n]
                                       int64_t n, int64_t blocksize) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = mul_rn(code[codes[i]], absmax[i / blocksize]);
}

unsigned int grid_for(int64_t work_items, int64_t items_per_cta) {
  const int64_t grid = ceil_div(work_items, items_per_cta);
  TORCH_CHECK(grid <= 0x7fffffff, "peftkern: tensor too large for a 1-D grid (", work_items,
              " work items)");
  return static_cast<unsigned int>(grid);
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& weight, int64_t blocksize) {
  const CudaDeviceGuard guard(weight);
  auto [packed, absmax] = check_and_allocate_quantize(weight, blocksize);
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel();
  if (n == 0) return {packed, absmax};
  const int64_t blocks = ceil_div(n, blocksize);
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(w.scalar_type(), "nf4_quantize", [&] {
    PK_LAUNCH(grid_for(blocks, kWarpsPerCta), kWarpsPerCta * kWarp, 0, at::cuda::getCurrentCUDAStream(), nf4_quantize_kernel<scalar_t>)(w.const_data_ptr<scalar_t>(),
                                               packed.mutable_data_ptr<uint8_t>(),
                                               absmax.mutable_data_ptr<float>(), n, blocksize,
                                               blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

template <typename ScaleOf>
void launch_dequantize(const at::Tensor& packed, const DequantArgs& args, ScaleOf scale_of,
                       at::Tensor& out) {
  if (args.numel == 0) return;
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(out.scalar_type(), "nf4_dequantize",
                                  [&] {
    PK_LAUNCH(grid_for(ceil_div(args.numel, kElemsPerThread), kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream(), nf4_dequantize_kernel<scalar_t, ScaleOf>)(packed.const_data_ptr<uint8_t>(), scale_of,
                                               out.mutable_data_ptr<scalar_t>(), args.numel,
                                               args.blocksize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, at::IntArrayRef shape, at::ScalarType dtype) {
  const CudaDeviceGuard guard(packed);
  const DequantArgs args = check_dequantize(packed, absmax, blocksize, shape, dtype);
  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  launch_dequantize(packed, args, PlainAbsmax{absmax.const_data_ptr<float>()}, out);
  return out;
}

at::Tensor nf4_dequantize_nested_cuda(const at::Tensor& packed, const at::Tensor& absmax_codes,
                                      const at::Tensor& nested_absmax,
                                      const at::Tensor& nested_code,
                                      const at::Tensor& nested_offset, int64_t blocksize,
                                      int64_t nested_blocksize, at::IntArrayRef shape,
                                      at::ScalarType dtype) {
  const CudaDeviceGuard guard(packed);
  const DequantArgs args =
      check_dequantize_nested(packed, absmax_codes, nested_absmax, nested_code, nested_offset,
                              blocksize, nested_blocksize, shape, dtype);
  at::Tensor out = new_output(shape, packed.options().dtype(dtype));
  const NestedAbsmax scale_of{absmax_codes.const_data_ptr<uint8_t>(),
                              nested_absmax.const_data_ptr<float>(),
                              nested_code.const_data_ptr<float>(),
                              nested_offset.const_data_ptr<float>(), nested_blocksize};
  launch_dequantize(packed, args, scale_of, out);
  return out;
}

void nf4_dequantize_into_cuda(at::Tensor& out, const at::Tensor& packed, const at::Tensor& absmax,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code,
                              const std::optional<at::Tensor>& nested_offset, int64_t blocksize,
                              int64_t nested_blocksize) {
  const CudaDeviceGuard guard(packed);
  const DequantArgs args = check_dequantize_into(out, packed, absmax, nested_absmax, nested_code, nested_offset,
                                                 blocksize, nested_blocksize);
  if (!nested_absmax.has_value()) {
    launch_dequantize(packed, args, PlainAbsmax{absmax.const_data_ptr<float>()}, out);
    return;
  }
  const NestedAbsmax scale_of{absmax.const_data_ptr<uint8_t>(), nested_absmax->const_data_ptr<float>(),
                              nested_code->const_data_ptr<float>(), nested_offset->const_data_ptr<float>(),
                              nested_blocksize};
  launch_dequantize(packed, args, scale_of, out);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& x,
                                                                const at::Tensor& code,
                                                                int64_t blocksize) {
  const CudaDeviceGuard guard(x);
  auto [codes, absmax] = check_and_allocate_quantize_8bit(x, code, blocksize);
  const at::Tensor xc = x.contiguous();
  const at::Tensor table = code.contiguous();
  const int64_t n = xc.numel();
  if (n == 0) return {codes, absmax};
  const int64_t blocks = ceil_div(n, blocksize);
  PK_DISPATCH_FLOAT_HALF_BFLOAT16(xc.scalar_type(), "quantize_8bit", [&] {
    PK_LAUNCH(grid_for(blocks, kWarpsPerCta), kWarpsPerCta * kWarp, 0, at::cuda::getCurrentCUDAStream(), quantize_8bit_kernel<scalar_t>)(
            xc.const_data_ptr<scalar_t>(), table.const_data_ptr<float>(),
            codes.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(), n, blocksize,
            blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_8bit_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                                          const at::Tensor& code, int64_t blocksize) {
  const CudaDeviceGuard guard(codes);
  at::Tensor out = check_and_allocate_dequantize_8bit(codes, absmax, code, blocksize);
  const at::Tensor q = codes.contiguous();
  const at::Tensor a = absmax.contiguous();
  const at::Tensor table = code.contiguous();
  const int64_t n = q.numel();
  if (n == 0) return out;
  PK_LAUNCH(grid_for(n, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream(), dequantize_8bit_kernel)(
      q.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(), table.const_data_ptr<float>(),
      out.mutable_data_ptr<float>(), n, blocksize);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace nf4
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("nf4_quantize", &peftkern::nf4::nf4_quantize_cuda);
  m.impl("nf4_dequantize", &peftkern::nf4::nf4_dequantize_cuda);
  m.impl("nf4_dequantize_nested", &peftkern::nf4::nf4_dequantize_nested_cuda);
  m.impl("nf4_dequantize_into", &peftkern::nf4::nf4_dequantize_into_cuda);
  m.impl("quantize_blockwise_8bit", &peftkern::nf4::quantize_blockwise_8bit_cuda);
  m.impl("dequantize_blockwise_8bit", &peftkern::nf4::dequantize_blockwise_8bit_cuda);
}
