// The one spelling of everything CUDA-specific that a .cu file's host code uses, so the same
// source compiles under nvcc (the shipped kernels) and as plain C++ under the CPU emulation of
// CUDA's execution model (csrc/emu/, tests only; see DESIGN.md "CUDA kernels on the CPU"):
//
//   PK_LAUNCH(grid, block, shared_bytes, stream, kernel<T...>)(args...)
//       a kernel launch (the kernel last: template arguments may contain commas). Under the
//       emulation `stream` is dropped unevaluated (at::cuda::getCurrentCUDAStream() would ask
//       the driver for a device) and the launch runs the whole grid before it returns.
//   PK_DYNAMIC_SHARED(type, name)       extern __shared__ type name[] (dynamic shared memory)
//   PK_GRID_STRIDE_CAP(n)               a cap on a grid dimension that a grid-stride loop covers:
//                                       n on a GPU, a few blocks under the emulation, so small
//                                       test shapes take the striding path too
//   PK_CUDA_LIBRARY_IMPL(m)             TORCH_LIBRARY_IMPL(peftkern, CUDA, m); under the
//                                       emulation the same kernels register as CPU kernels of
//                                       the test-only namespace peftkern_emu
#pragma once

#if defined(PEFTKERN_CUDA_EMULATION)

#include "../emu/cuda_emulation.h"

#else

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#define PK_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define PK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define PK_GRID_STRIDE_CAP(n) (n)
#define PK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(peftkern, CUDA, m)

#endif
