// Kernels that exercise the CUDA emulation itself (compiled only by the emulation build, never
// shipped): each case either computes something whose CUDA semantics the test knows, or breaks a
// CUDA rule that the emulation must report. Written as CUDA, spelled as the real .cu files are.
#include "../common/cuda_launch.h"

#include <string>

namespace peftkern {
namespace emu_selftest {
namespace {

constexpr int kWarp = 32;

// out[t, :] = what lane t receives from each shuffle variant; v = t as float.
__global__ void shuffles_kernel(float* __restrict__ out) {
  const int t = threadIdx.x;
  const float v = static_cast<float>(t);
  out[t * 6 + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[t * 6 + 1] = __shfl_up_sync(0xffffffffu, v, 3);
  out[t * 6 + 2] = __shfl_down_sync(0xffffffffu, v, 3);
  out[t * 6 + 3] = __shfl_sync(0xffffffffu, v, 7);
  out[t * 6 + 4] = __shfl_down_sync(0xffffffffu, v, 2, 8);
  out[t * 6 + 5] = __shfl_sync(0xffffffffu, v, 3, 8);
}

// Lanes 0..15 leave; the rest shuffle with a mask naming all 32 lanes: divergent.
__global__ void divergent_shuffle_kernel(float* __restrict__ out) {
  if (threadIdx.x % kWarp < 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Neighbour exchange through shared memory, with or without the barrier between write and read.
__global__ void neighbour_kernel(float* __restrict__ out, bool barrier) {
  __shared__ float slots[64];
  const int t = threadIdx.x;
  slots[t] = static_cast<float>(t);
  if (barrier) __syncthreads();
  out[blockIdx.x * 64 + t] = slots[(t + 1) % 64];
}

__global__ void assert_kernel(float* __restrict__ out) {
  CUDA_KERNEL_ASSERT_MSG(threadIdx.x != 5, "thread 5 is not allowed");
  out[threadIdx.x] = 1.0f;
}

__global__ void dynamic_shared_kernel(float* __restrict__ out) {
  extern __shared__ float dynamic[];
  dynamic[threadIdx.x] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = dynamic[blockDim.x - 1 - threadIdx.x];
}

// A 16-byte vector load from an address that is only 4-byte aligned: UB in C++, a fault on a GPU.
__global__ void misaligned_vector_kernel(const float* __restrict__ in, float* __restrict__ out) {
  const float4 v = *reinterpret_cast<const float4*>(in + 1);
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

at::Tensor run_case(const std::string& name) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::full({64 * 6}, std::numeric_limits<float>::quiet_NaN(), options);
  float* o = out.mutable_data_ptr<float>();
  if (name == "shuffles") {
    PK_LAUNCH(1, 64, 0, 0, shuffles_kernel)(o);
  } else if (name == "divergent_shuffle") {
    PK_LAUNCH(1, 64, 0, 0, divergent_shuffle_kernel)(o);
  } else if (name == "missing_barrier" || name == "with_barrier") {
    PK_LAUNCH(3, 64, 0, 0, neighbour_kernel)(o, name == "with_barrier");
  } else if (name == "device_assert") {
    PK_LAUNCH(1, 32, 0, 0, assert_kernel)(o);
  } else if (name == "dynamic_shared") {
    PK_LAUNCH(1, 64, 64 * sizeof(float), 0, dynamic_shared_kernel)(o);
  } else if (name == "dynamic_shared_too_large") {
    PK_LAUNCH(1, 64, 48 * 1024 + 4, 0, dynamic_shared_kernel)(o);
  } else if (name == "zero_grid") {
    PK_LAUNCH(0, 64, 0, 0, shuffles_kernel)(o);
  } else if (name == "block_too_large") {
    PK_LAUNCH(1, 1025, 0, 0, shuffles_kernel)(o);
  } else if (name == "grid_y_too_large") {
    PK_LAUNCH(dim3(1, 65536), 32, 0, 0, assert_kernel)(o);
  } else if (name == "misaligned_vector") {
    at::Tensor in = at::zeros({64}, options);
    PK_LAUNCH(1, 1, 0, 0, misaligned_vector_kernel)(in.const_data_ptr<float>(), o);
  } else {
    TORCH_CHECK(false, "emu_selftest: unknown case ", name);
  }
  return out;
}

}  // namespace
}  // namespace emu_selftest
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern_emu, CompositeExplicitAutograd, m) {
  m.impl("emu_selftest", &peftkern::emu_selftest::run_case);
}
