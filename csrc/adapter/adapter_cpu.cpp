// Bottleneck adapter on CPU: the op bodies of adapter_host.h with our CPU epilogue kernels.
// Each epilogue is one pass over a [tokens, cols] matrix, parallel over rows (at::parallel_for),
// the inner loop over a contiguous row with the activation as a template parameter (no branch
// per element); storage dtype -> float32 (double for float64) -> storage dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <ATen/OpMathType.h>
#include "adapter_host.h"

namespace peftkern {
namespace adapter {
namespace {

int64_t grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

template <typename T, typename A = at::opmath_type<T>>
A scale_value(double scaling, const std::optional<at::Tensor>& scale) {
  return static_cast<A>(scaling) * (scale ? static_cast<A>(*scale->const_data_ptr<T>()) : A(1));
}

struct CpuEpilogues {
  // pre[i, j] += b[j] (rounded to T: backward recomputes from exactly this value); act[i, j] = f(pre).
  static void down(at::Tensor& pre, const at::Tensor& bias, at::Tensor& act_out, int64_t activation) {
    const int64_t rows = pre.size(0), cols = pre.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "adapter_down_epilogue", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* p = pre.mutable_data_ptr<scalar_t>();
      scalar_t* a = act_out.mutable_data_ptr<scalar_t>();
      const scalar_t* b = bias.const_data_ptr<scalar_t>();
      act::dispatch(activation, [&](auto kind) {
        using F = act::Activation<decltype(kind)::value>;
        at::parallel_for(0, rows, grain(cols), [&](int64_t first, int64_t last) {
          for (int64_t i = first; i < last; ++i) {
            scalar_t* p_row = p + i * cols;
            scalar_t* a_row = a + i * cols;
            for (int64_t j = 0; j < cols; ++j) {
              const scalar_t v = static_cast<scalar_t>(static_cast<acc_t>(p_row[j]) + static_cast<acc_t>(b[j]));
              p_row[j] = v;
              a_row[j] = static_cast<scalar_t>(F::value(static_cast<acc_t>(v)));
            }
          }
        });
      });
    });
  }

  // out[i, j] = residual[i, j] + s·(out[i, j] + b[j]); residual may have any strides.
  static void up(at::Tensor& out, const at::Tensor& residual, const at::Tensor& bias, double scaling,
                 const std::optional<at::Tensor>& scale) {
    const int64_t rows = out.size(0), cols = out.size(1);
    const int64_t rs0 = residual.stride(0), rs1 = residual.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "adapter_up_epilogue", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t s = scale_value<scalar_t>(scaling, scale);
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      const scalar_t* r = residual.const_data_ptr<scalar_t>();
      const scalar_t* b = bias.const_data_ptr<scalar_t>();
      // The row loop is written twice so that the usual unit-stride residual gets a loop the
      // compiler vectorises (a runtime column stride turns every read into a gather).
      auto rows_with_stride = [&](auto column_stride, int64_t first, int64_t last) {
        for (int64_t i = first; i < last; ++i) {
          scalar_t* o_row = o + i * cols;
          const scalar_t* r_row = r + i * rs0;
          for (int64_t j = 0; j < cols; ++j) {
            o_row[j] = static_cast<scalar_t>(static_cast<acc_t>(r_row[j * column_stride]) +
                                             s * (static_cast<acc_t>(o_row[j]) + static_cast<acc_t>(b[j])));
          }
        }
      };
      at::parallel_for(0, rows, grain(cols), [&](int64_t first, int64_t last) {
        if (rs1 == 1) {
          rows_with_stride(std::integral_constant<int64_t, 1>{}, first, last);
        } else {
          rows_with_stride(rs1, first, last);
        }
      });
    });
  }

  // grad[i, j] = s·grad[i, j]·f'(pre[i, j]) and act[i, j] = f(pre[i, j]), in one pass.
  static void backward(at::Tensor& grad, const at::Tensor& pre, at::Tensor& act_out, double scaling,
                       const std::optional<at::Tensor>& scale, int64_t activation) {
    const int64_t rows = grad.size(0), cols = grad.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "adapter_backward_epilogue", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t s = scale_value<scalar_t>(scaling, scale);
      scalar_t* g = grad.mutable_data_ptr<scalar_t>();
      scalar_t* a = act_out.mutable_data_ptr<scalar_t>();
      const scalar_t* p = pre.const_data_ptr<scalar_t>();
      act::dispatch(activation, [&](auto kind) {
        using F = act::Activation<decltype(kind)::value>;
        at::parallel_for(0, rows, grain(cols), [&](int64_t first, int64_t last) {
          for (int64_t e = first * cols; e < last * cols; ++e) {
            acc_t y, dy;
            F::value_and_derivative(static_cast<acc_t>(p[e]), y, dy);
            a[e] = static_cast<scalar_t>(y);
            g[e] = static_cast<scalar_t>(s * static_cast<acc_t>(g[e]) * dy);
          }
        });
      });
    });
  }
};

std::tuple<at::Tensor, at::Tensor> adapter_bottleneck_fwd_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                              const at::Tensor& w_down, const at::Tensor& b_down,
                                                              const at::Tensor& w_up, const at::Tensor& b_up,
                                                              double scaling, const std::optional<at::Tensor>& scale,
                                                              int64_t activation) {
  return bottleneck_fwd<CpuEpilogues>(x, residual, w_down, b_down, w_up, b_up, scaling, scale, activation);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bottleneck_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& pre, const at::Tensor& w_down,
    const at::Tensor& w_up, const at::Tensor& b_up, double scaling, const std::optional<at::Tensor>& scale,
    int64_t activation) {
  return bottleneck_bwd<CpuEpilogues>(grad_out, x, pre, w_down, w_up, b_up, scaling, scale, activation);
}

}  // namespace
}  // namespace adapter
}  // namespace peftkern

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("adapter_bottleneck_fwd", &peftkern::adapter::adapter_bottleneck_fwd_cpu);
  m.impl("adapter_bottleneck_bwd", &peftkern::adapter::adapter_bottleneck_bwd_cpu);
}
