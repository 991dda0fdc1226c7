// The Python module `peftkern._C`. It holds no functions: importing it loads this shared library,
// whose static initialisers register every op with the dispatcher (torch.ops.peftkern.*).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "peftkern op library", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
