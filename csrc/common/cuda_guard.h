// The device guard of every CUDA op entry point (CUDA sources only): launches, cuBLAS calls and
// scratch allocations go to the device of the op's first tensor, on its current stream.
#pragma once

#include <ATen/core/Tensor.h>

#if !defined(PEFTKERN_CUDA_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#endif

#include <optional>

namespace peftkern {

#if defined(PEFTKERN_CUDA_EMULATION)
// Under the CPU emulation of the CUDA kernels (csrc/emu/) the tensors are CPU tensors: no device.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const at::Tensor&) {}
};
#else

// Set only for a CUDA tensor: a CPU tensor among CUDA ones reaches a CUDA kernel by dispatch,
// and must then be refused by the op's checks with a message naming it, not by the guard's own
// "expected a CUDA device" error.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(const at::Tensor& t)
      : guard_(t.is_cuda() ? std::optional<c10::Device>(t.device()) : std::nullopt) {}

 private:
  c10::cuda::OptionalCUDAGuard guard_;
};
#endif

}  // namespace peftkern
