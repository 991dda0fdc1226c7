// DoRA's weight norm on CUDA: one thread block per output row i. The block stages B[i, :] (r
// values) in shared memory; thread t handles columns j = t, t + blockDim, ... computing
// W[i, j] + scaling * sum_q B[i, q] * A[q, j] in float32 (double for double) and accumulating
// its square; a block reduction gives the row's norm. Reads of W and A are coalesced across
// threads; A (r x K, small) is re-read per row from L2. Never materialises W + scaling * B @ A.
// Assumes: inputs contiguous (the host makes them so), r * sizeof(acc) bytes of dynamic shared
// memory, which with the static `partial` must fit CUDA's default 48 KiB (checked on the host:
// r <= 8192 for float accumulation, r <= 6136 for double; the CUDA emulation found the double
// case launching past the limit).
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>

#include "dora_host.h"
#include "../common/cuda_guard.h"

namespace peftkern {
namespace dora {
namespace {

constexpr int kThreads = 256;

template <typename T, typename Acc>
__global__ void weight_norm_kernel(const T* __restrict__ w,  // [n, k]
                                   const T* __restrict__ a,  // [r, k]
                                   const T* __restrict__ b,  // [n, r]
                                   Acc scaling, int64_t k, int64_t r,
                                   T* __restrict__ out) {  // [n]
  extern __shared__ unsigned char shared_bytes[];
  Acc* coef = reinterpret_cast<Acc*>(shared_bytes);  // [r]: scaling * B[i, :]
  __shared__ Acc partial[kThreads / 32];
  const int64_t i = blockIdx.x;
  for (int64_t q = threadIdx.x; q < r; q += blockDim.x) {
    coef[q] = scaling * static_cast<Acc>(b[i * r + q]);
  }
  __syncthreads();

  Acc sum = 0;
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    Acc v = static_cast<Acc>(w[i * k + j]);
    for (int64_t q = 0; q < r; ++q) v += coef[q] * static_cast<Acc>(a[q * k + j]);
    sum += v * v;
  }
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    Acc total = 0;
    for (int warp = 0; warp < kThreads / 32; ++warp) total += partial[warp];
    out[i] = static_cast<T>(sqrt(total));
  }
}

at::Tensor dora_weight_norm_cuda(const at::Tensor& weight, const at::Tensor& lora_a,
                                 const at::Tensor& lora_b, double scaling) {
  const CudaDeviceGuard guard(weight);
  at::Tensor out = check_and_allocate_weight_norm(weight, lora_a, lora_b);
  const at::Tensor w = weight.contiguous(), a = lora_a.contiguous(), b = lora_b.contiguous();
  const int64_t n = w.size(0), k = w.size(1), r = a.size(0);
  TORCH_CHECK(n <= 0x7fffffff, "dora_weight_norm: too many rows for a 1-D grid");
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "dora_weight_norm", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int64_t kSharedLimit = 48 * 1024, kStaticBytes = kThreads / 32 * sizeof(acc_t);
    constexpr int64_t kMaxRank = std::min<int64_t>(8192, (kSharedLimit - kStaticBytes) / sizeof(acc_t));
    TORCH_CHECK(r <= kMaxRank, "dora_weight_norm: rank ", r, " is larger than this kernel supports for ",
                w.scalar_type(), " (", kMaxRank, ": B's row is staged in 48 KiB of shared memory)");
    PK_LAUNCH(static_cast<unsigned int>(n), kThreads, r * sizeof(acc_t), at::cuda::getCurrentCUDAStream(), weight_norm_kernel<scalar_t, acc_t>)(
            w.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
            static_cast<acc_t>(scaling), k, r, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace dora
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("dora_weight_norm", &peftkern::dora::dora_weight_norm_cuda);
}
