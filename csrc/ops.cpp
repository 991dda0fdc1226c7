// The library `peftkern`: every kernel op's schema (op_schemas.h) plus the library-level ops.
// Device implementations register themselves beside their code; fake (meta) implementations,
// autograd formulas and the plain-PyTorch references live in peftkern/ops/.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(peftkern, m) {
  peftkern::define_kernel_ops(m);

  // --- Library ----------------------------------------------------------------------------------
  // JSON text: what this binary was built with (CUDA version, archs, torch, compiler).
  m.def("build_info() -> str");
  // Debug aid for tests: when on, every output an op allocates is filled with a poison pattern
  // (NaN / 0xA5 bytes) before the kernel runs, so an element a kernel forgets to write shows up.
  m.def("set_poison_outputs(bool enabled) -> ()");
}
