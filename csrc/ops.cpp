// The one registration unit of the extension: binds each backend's kernels into a submodule
// (`_C.cpu`, `_C.cuda`) under the names mmfast/backends.py looks up: `<op>_forward`, `<op>_backward`.
#include <torch/extension.h>

#include "cross_entropy.h"
#include "linear_cross_entropy.h"

namespace {

mmfast::CrossEntropyOptions ce_options(int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  return {ignore_index, label_smoothing, z_loss, softcap};
}

template <auto Forward, auto Backward>
void bind_cross_entropy(py::module_& m) {
  m.def(
      "cross_entropy_forward",
      [](const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, double label_smoothing,
         double z_loss, double softcap) {
        return Forward(logits, target, ce_options(ignore_index, label_smoothing, z_loss, softcap));
      },
      py::arg("logits"), py::arg("target"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"),
      py::arg("softcap"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "cross_entropy_backward",
      [](const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& grad_loss,
         at::Tensor grad_logits, int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
        Backward(logits, target, lse, grad_loss, grad_logits, ce_options(ignore_index, label_smoothing, z_loss, softcap));
      },
      py::arg("logits"), py::arg("target"), py::arg("lse"), py::arg("grad_loss"), py::arg("grad_logits"),
      py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"),
      py::call_guard<py::gil_scoped_release>());
}

template <auto Forward>
void bind_linear_cross_entropy(py::module_& m) {
  m.def(
      "linear_cross_entropy_forward",
      [](const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         const at::Tensor& target, const std::optional<at::Tensor>& grad_loss, double label_smoothing, double z_loss,
         double softcap, int64_t chunk_size, bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias,
         bool return_argmax) {
        return Forward(hidden, weight, bias.value_or(at::Tensor()), target, grad_loss.value_or(at::Tensor()),
                       {label_smoothing, z_loss, softcap, chunk_size, need_grad_hidden, need_grad_weight,
                        need_grad_bias, return_argmax});
      },
      py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("target"), py::arg("grad_loss"),
      py::arg("label_smoothing"), py::arg("z_loss"), py::arg("softcap"), py::arg("chunk_size"),
      py::arg("need_grad_hidden"), py::arg("need_grad_weight"), py::arg("need_grad_bias"), py::arg("return_argmax"),
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmfast native kernels";
  auto cpu = m.def_submodule("cpu", "C++ kernels for CPU tensors (ATen + at::vec + OpenMP)");
  bind_cross_entropy<mmfast::cpu::cross_entropy_forward, mmfast::cpu::cross_entropy_backward>(cpu);
  bind_linear_cross_entropy<mmfast::cpu::linear_cross_entropy_forward>(cpu);
#ifdef MMFAST_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA C++ kernels for CUDA tensors");
  bind_cross_entropy<mmfast::cuda::cross_entropy_forward, mmfast::cuda::cross_entropy_backward>(cuda);
  bind_linear_cross_entropy<mmfast::cuda::linear_cross_entropy_forward>(cuda);
#endif
}
