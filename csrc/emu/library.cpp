// The test-only library `peftkern_emu` (see cuda_emulation.h): the kernel ops' schemas, whose CPU
// kernels are the CUDA families' .cu files compiled as C++, plus the emulation's controls.
#include <torch/library.h>

#include <string>

#include "../op_schemas.h"

namespace peftkern {

// Under the emulation every output is poisoned (NaN / 0xA5) before a kernel writes it.
bool poison_outputs_enabled() { return true; }

namespace emu {
void set_schedule(const std::string& mode, int64_t seed);
std::string launch_stats();
std::string instantiations_json();
void reset_launch_stats();
int64_t static_shared_bytes();
}  // namespace emu
}  // namespace peftkern

TORCH_LIBRARY(peftkern_emu, m) {
  peftkern::define_kernel_ops(m);
  // The order in which the GPU threads of a block run between barriers, and the blocks of a grid:
  // "forward" (index order), "reverse", or "shuffle" (seeded; reseeded at every launch).
  m.def("emu_set_schedule(str mode, int seed) -> ()", [](std::string mode, int64_t seed) {
    peftkern::emu::set_schedule(mode, seed);
  });
  // JSON: per launch site (file:line), the kernel, blocks and threads run, and launches by
  // instantiation (template arguments), since the last reset.
  m.def("emu_launch_stats() -> str", &peftkern::emu::launch_stats);
  m.def("emu_reset_launch_stats() -> ()", &peftkern::emu::reset_launch_stats);
  // JSON: every kernel instantiation compiled into the library (launched or not).
  m.def("emu_instantiations() -> str", &peftkern::emu::instantiations_json);
  // The most static __shared__ bytes any kernel instantiation has used so far.
  m.def("emu_static_shared_bytes() -> int", &peftkern::emu::static_shared_bytes);
  // Runs one case of csrc/emu/selftest.cu (the emulation's own tests): a float32 [384] result.
  m.def("emu_selftest(str name) -> Tensor");
}
