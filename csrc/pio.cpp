// The pio operator library: every schema, nothing else.
//
// Kernels live one file per op and device (csrc/cpu/, csrc/cuda/) and register
// themselves with TORCH_LIBRARY_IMPL; fake (meta) kernels and the Python-side
// argument checks live in pio_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import pio_kernels._C` loads this shared object, which runs the static
// registrations below. The module itself exports nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pio, m) {
  // SPEC section 3: greedy cosine NMS with a fixed budget, per batch row.
  // features (B, N, D) floating, scores (B, N) floating, lengths (B,) int64.
  // Returns (B, budget) int64: kept positions ascending, -1 padded.
  m.def(
      "select_tokens(Tensor features, Tensor scores, int budget, float tau=0.8, "
      "Tensor? lengths=None) -> Tensor");
}
