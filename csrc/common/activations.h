// Activation functions and their derivatives, shared by the CPU and CUDA kernels (the bottleneck
// adapter's down-projection epilogue and its backward), so the CPU tests exercise exactly the
// arithmetic the GPU runs. Evaluated in float32 for float32/float16/bfloat16 storage, in double for float64.
//
// Names follow AdapterHub / transformers' get_activation: "relu"; "gelu" = exact erf form;
// "gelu_new" (also "gelu_pytorch_tanh") = the tanh approximation; "silu" = "swish" = x·sigmoid(x).
// The integer codes are the op's `activation` argument (peftkern/ops/adapter.py maps names).
// `A` is the accumulation type: float for float32/float16/bfloat16 storage, double for float64
// (the gradcheck dtype).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "host_device.h"

namespace peftkern {
namespace act {

enum Kind : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kNumKinds = 4 };

// Written as double; A(k) rounds them once to the accumulation type.
constexpr double kSqrtHalf = 0.70710678118654752440;     // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2*pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kGeluTanhCoef = 0.044715;

// erf / tanh / exp for float and double on host and device (float: the single-precision
// library functions, never a silent promotion to double on the GPU).
PK_HOST_DEVICE float erf_(float x) { return erff(x); }
PK_HOST_DEVICE double erf_(double x) { return erf(x); }
PK_HOST_DEVICE float tanh_(float x) { return tanhf(x); }
PK_HOST_DEVICE double tanh_(double x) { return tanh(x); }
PK_HOST_DEVICE float exp_(float x) { return expf(x); }
PK_HOST_DEVICE double exp_(double x) { return exp(x); }

template <int K>
struct Activation;

// y = max(x, 0); y' = 1 for x > 0, else 0 (as torch's relu backward: the gradient passes where
// the output is positive).
template <>
struct Activation<kRelu> {
  template <typename A>
  PK_HOST_DEVICE static A value(A x) { return x > A(0) ? x : A(0); }
  template <typename A>
  PK_HOST_DEVICE static void value_and_derivative(A x, A& y, A& dy) {
    y = x > A(0) ? x : A(0);
    dy = x > A(0) ? A(1) : A(0);
  }
};

// y = x·Φ(x) = 0.5·x·(1 + erf(x/√2)); y' = Φ(x) + x·φ(x), φ(x) = exp(-x²/2)/√(2π).
template <>
struct Activation<kGelu> {
  template <typename A>
  PK_HOST_DEVICE static A value(A x) { return A(0.5) * x * (A(1) + erf_(x * A(kSqrtHalf))); }
  template <typename A>
  PK_HOST_DEVICE static void value_and_derivative(A x, A& y, A& dy) {
    const A cdf = A(0.5) * (A(1) + erf_(x * A(kSqrtHalf)));
    y = x * cdf;
    dy = cdf + x * A(kInvSqrt2Pi) * exp_(A(-0.5) * x * x);
  }
};

// y = 0.5·x·(1 + tanh(u)), u = √(2/π)·(x + 0.044715·x³);
// y' = 0.5·(1 + t) + 0.5·x·(1 - t²)·√(2/π)·(1 + 3·0.044715·x²), t = tanh(u).
template <>
struct Activation<kGeluTanh> {
  template <typename A>
  PK_HOST_DEVICE static A value(A x) {
    return A(0.5) * x * (A(1) + tanh_(A(kSqrt2OverPi) * (x + A(kGeluTanhCoef) * x * x * x)));
  }
  template <typename A>
  PK_HOST_DEVICE static void value_and_derivative(A x, A& y, A& dy) {
    const A x2 = x * x;
    const A t = tanh_(A(kSqrt2OverPi) * (x + A(kGeluTanhCoef) * x2 * x));
    y = A(0.5) * x * (A(1) + t);
    dy = A(0.5) * (A(1) + t) +
         A(0.5) * x * (A(1) - t * t) * A(kSqrt2OverPi) * (A(1) + A(3) * A(kGeluTanhCoef) * x2);
  }
};

// y = x·σ(x); y' = σ(x)·(1 + x·(1 - σ(x))). For x → -inf, exp(-x) overflows to inf and σ to 0:
// y = -0, y' = 0, no NaN for finite x.
template <>
struct Activation<kSilu> {
  template <typename A>
  PK_HOST_DEVICE static A value(A x) { return x / (A(1) + exp_(-x)); }
  template <typename A>
  PK_HOST_DEVICE static void value_and_derivative(A x, A& y, A& dy) {
    const A sig = A(1) / (A(1) + exp_(-x));
    y = x * sig;
    dy = sig * (A(1) + x * (A(1) - sig));
  }
};

// Calls f(std::integral_constant<int, K>{}) for the runtime kind, so kernels get the activation
// as a template parameter (no switch inside the element loop). The caller validates `kind`.
template <typename F>
void dispatch(int64_t kind, F&& f) {
  switch (kind) {
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    case kGelu: f(std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: f(std::integral_constant<int, kGeluTanh>{}); break;
    default: f(std::integral_constant<int, kSilu>{}); break;
  }
}

}  // namespace act
}  // namespace peftkern
