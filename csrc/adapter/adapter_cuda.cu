// Bottleneck adapter on CUDA: the op bodies of adapter_host.h (GEMMs by cuBLAS through ATen)
// with our epilogue kernels below, on the current stream, each launch checked.
#include "../common/cuda_launch.h"
#include <torch/library.h>

#include <algorithm>

#include <ATen/OpMathType.h>
#include "adapter_host.h"
#include "../common/cuda_guard.h"

namespace peftkern {
namespace adapter {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU several times over; the kernels grid-stride over the rest.
unsigned int grid_for(int64_t n) {
  const int64_t wanted = ceil_div(n, kThreads);
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, cap)));
}

// s = scaling · scale[0], read on the device (no host sync for a learned scale).
template <typename T, typename A = at::opmath_type<T>>
__device__ __forceinline__ A scale_value(A scaling, const T* scale) {
  return scale ? scaling * static_cast<A>(*scale) : scaling;
}

// All arithmetic in A = at::opmath_type<T> (float for float/half/bfloat16, double for double).
// Assumes pre and act are contiguous [rows, cols], bias contiguous [cols]; 1-D grid-stride over
// rows·cols elements with int64 indices (no size limit), element (i, j) at i·cols + j.
// pre[e] += bias[j] (rounded to T, the value backward recomputes from); act[e] = f(pre[e]).
template <typename T, int Kind>
__global__ void down_epilogue_kernel(T* __restrict__ pre,         // [rows, cols]
                                     const T* __restrict__ bias,  // [cols]
                                     T* __restrict__ act,         // [rows, cols]
                                     int64_t total, int64_t cols) {
  using F = act::Activation<Kind>;
  using A = at::opmath_type<T>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T v = static_cast<T>(static_cast<A>(pre[e]) + static_cast<A>(bias[e % cols]));
    pre[e] = v;
    act[e] = static_cast<T>(F::value(static_cast<A>(v)));
  }
}

// Assumes out contiguous [rows, cols], bias contiguous [cols]; residual [rows, cols] at any
// strides (rs0, rs1 in elements). out[e] = residual[i, j] + s·(out[e] + bias[j]).
template <typename T>
__global__ void up_epilogue_kernel(T* __restrict__ out,              // [rows, cols]
                                   const T* __restrict__ residual,   // [rows, cols], strided
                                   const T* __restrict__ bias,       // [cols]
                                   const T* __restrict__ scale,      // [1] or nullptr
                                   at::opmath_type<T> scaling, int64_t total, int64_t cols, int64_t rs0, int64_t rs1) {
  using A = at::opmath_type<T>;
  const A s = scale_value<T>(scaling, scale);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, j = e - i * cols;
    out[e] = static_cast<T>(static_cast<A>(residual[i * rs0 + j * rs1]) +
                            s * (static_cast<A>(out[e]) + static_cast<A>(bias[j])));
  }
}

// Assumes grad, pre, act contiguous [rows, cols] (total elements). act[e] = f(pre[e]);
// grad[e] = s·grad[e]·f'(pre[e]), act and act' from one evaluation.
template <typename T, int Kind>
__global__ void backward_epilogue_kernel(T* __restrict__ grad,       // [rows, cols]
                                         const T* __restrict__ pre,  // [rows, cols]
                                         T* __restrict__ act,        // [rows, cols]
                                         const T* __restrict__ scale, at::opmath_type<T> scaling, int64_t total) {
  using F = act::Activation<Kind>;
  using A = at::opmath_type<T>;
  const A s = scale_value<T>(scaling, scale);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A y, dy;
    F::value_and_derivative(static_cast<A>(pre[e]), y, dy);
    act[e] = static_cast<T>(y);
    grad[e] = static_cast<T>(s * static_cast<A>(grad[e]) * dy);
  }
}

template <typename T>
const T* scale_ptr(const std::optional<at::Tensor>& scale) {
  return scale ? scale->const_data_ptr<T>() : nullptr;
}

struct CudaEpilogues {
  static void down(at::Tensor& pre, const at::Tensor& bias, at::Tensor& act_out, int64_t activation) {
    const int64_t total = pre.numel(), cols = pre.size(1);
    if (total == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "adapter_down_epilogue", [&] {
      act::dispatch(activation, [&](auto kind) {
        PK_LAUNCH(grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream(), down_epilogue_kernel<scalar_t, decltype(kind)::value>)(
                pre.mutable_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                act_out.mutable_data_ptr<scalar_t>(), total, cols);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void up(at::Tensor& out, const at::Tensor& residual, const at::Tensor& bias, double scaling,
                 const std::optional<at::Tensor>& scale) {
    const int64_t total = out.numel(), cols = out.size(1);
    if (total == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "adapter_up_epilogue", [&] {
      PK_LAUNCH(grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream(), up_epilogue_kernel<scalar_t>)(
          out.mutable_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
          scale_ptr<scalar_t>(scale), static_cast<at::opmath_type<scalar_t>>(scaling), total, cols, residual.stride(0),
          residual.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward(at::Tensor& grad, const at::Tensor& pre, at::Tensor& act_out, double scaling,
                       const std::optional<at::Tensor>& scale, int64_t activation) {
    const int64_t total = grad.numel();
    if (total == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "adapter_backward_epilogue", [&] {
      act::dispatch(activation, [&](auto kind) {
        PK_LAUNCH(grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream(), backward_epilogue_kernel<scalar_t, decltype(kind)::value>)(
                grad.mutable_data_ptr<scalar_t>(), pre.const_data_ptr<scalar_t>(),
                act_out.mutable_data_ptr<scalar_t>(), scale_ptr<scalar_t>(scale), static_cast<at::opmath_type<scalar_t>>(scaling),
                total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor> adapter_bottleneck_fwd_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                               const at::Tensor& w_down, const at::Tensor& b_down,
                                                               const at::Tensor& w_up, const at::Tensor& b_up,
                                                               double scaling, const std::optional<at::Tensor>& scale,
                                                               int64_t activation) {
  const CudaDeviceGuard guard(x);
  return bottleneck_fwd<CudaEpilogues>(x, residual, w_down, b_down, w_up, b_up, scaling, scale, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bottleneck_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre, const at::Tensor& w_down,
    const at::Tensor& w_up, const at::Tensor& b_up, double scaling, const std::optional<at::Tensor>& scale,
    int64_t activation) {
  const CudaDeviceGuard guard(x);
  return bottleneck_bwd<CudaEpilogues>(grad_out, x, pre, w_down, w_up, b_up, scaling, scale, activation);
}

}  // namespace
}  // namespace adapter
}  // namespace peftkern

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("adapter_bottleneck_fwd", &peftkern::adapter::adapter_bottleneck_fwd_cuda);
  m.impl("adapter_bottleneck_bwd", &peftkern::adapter::adapter_bottleneck_bwd_cuda);
}
