// Output allocation for every op: one place that can poison fresh outputs in debug runs.
#pragma once

#include <ATen/ATen.h>

namespace peftkern {

// Set through the op peftkern::set_poison_outputs (tests and `python -m peftkern.check` turn it
// on). Defined in csrc/library.cpp.
bool poison_outputs_enabled();

// at::empty, then (when poisoning is on) NaN for floating outputs and 0xA5 bytes for integer
// ones: a kernel that skips an element leaves a value no correct kernel produces by accident.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs_enabled() && out.numel() > 0) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<float>::quiet_NaN());
    } else {
      out.fill_(0xA5);
    }
  }
  return out;
}

}  // namespace peftkern
