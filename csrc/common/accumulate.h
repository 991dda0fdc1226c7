// The accumulation type of the kernels that widen each value, combine there and round once:
// float for float/half/bfloat16 storage, double for double. `acc_type<T>` for device and CPU
// code, `acc_dtype(t)` for host code that allocates accumulators and scratch.
#pragma once

#include <c10/core/ScalarType.h>

#include <type_traits>

namespace peftkern {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline c10::ScalarType acc_dtype(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

}  // namespace peftkern
