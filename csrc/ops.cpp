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
  // The CPU SIMD path the NF4 decode and the QLoRA GEMV take now ("scalar", "avx2", "avx512"),
  // chosen once from cpuid or PEFTKERN_CPU_ISA (csrc/common/cpu_isa.h); set_cpu_isa forces one.
  m.def("cpu_isa() -> str");
  m.def("set_cpu_isa(str isa) -> ()");
  // Every path this CPU supports, scalar first.
  m.def("cpu_isas_supported() -> str[]");
  // The library of our layers' float32 CPU base GEMMs ("aten": MKL; "onednn"), chosen once from the
  // CPU vendor or PEFTKERN_CPU_GEMM (csrc/common/cpu_gemm.h); set_cpu_gemm forces one.
  m.def("cpu_gemm() -> str");
  m.def("set_cpu_gemm(str library) -> ()");
  // CPU only: elements [first, first + count) of a flat NF4 weight of `numel` elements, decoded by
  // the primitive every CPU kernel shares (nf4::cpu::decode_range), so tests reach any start (odd =
  // mid-byte) and length on every ISA path. Plain absmax (float32), or uint8 codes + nested_*.
  m.def(
      "nf4_decode_range(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int blocksize, int nested_blocksize, int numel, int first, int count, "
      "ScalarType dtype) -> Tensor");
}
