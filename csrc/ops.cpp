// The one registration unit of the extension: binds each backend's kernels into a submodule
// (`_C.cpu`, `_C.cuda`) under the names mmfast/backends.py looks up: `<op>_forward`, `<op>_backward`.
#include <torch/extension.h>

#include "attention.h"
#include "cross_entropy.h"
#include "linear_cross_entropy.h"
#include "lora.h"

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

template <auto Forward, auto Backward, auto Mask>
void bind_lora_linear(py::module_& m) {
  m.def(
      "lora_linear_forward",
      [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
         const at::Tensor& lora_B, double scaling, double dropout_p, int64_t seed) {
        return Forward(x, weight, bias.value_or(at::Tensor()), lora_A, lora_B, {scaling, dropout_p, seed});
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
      py::arg("dropout_p"), py::arg("seed"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "lora_linear_backward",
      [](const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
         const at::Tensor& lora_B, double scaling, const at::Tensor& xa, const at::Tensor& mask, double dropout_p,
         int64_t seed, const std::optional<at::Tensor>& grad_x, bool need_grad_x, bool need_grad_weight,
         bool need_grad_bias, bool need_grad_A, bool need_grad_B) {
        return Backward(grad_out, x, weight, lora_A, lora_B, xa, mask, {scaling, dropout_p, seed},
                        grad_x.value_or(at::Tensor()),
                        {need_grad_x, need_grad_weight, need_grad_bias, need_grad_A, need_grad_B});
      },
      py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
      py::arg("xa"), py::arg("mask"), py::arg("dropout_p"), py::arg("seed"), py::arg("grad_x"), py::arg("need_grad_x"),
      py::arg("need_grad_weight"), py::arg("need_grad_bias"), py::arg("need_grad_A"), py::arg("need_grad_B"),
      py::call_guard<py::gil_scoped_release>());
  m.def("lora_linear_mask", Mask, py::arg("seed"), py::arg("rows"), py::arg("cols"), py::arg("dropout_p"),
        py::arg("device"), py::call_guard<py::gil_scoped_release>());
}

template <auto Forward, auto Backward>
void bind_cross_modal_attention(py::module_& m) {
  m.def(
      "cross_modal_attention_forward",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale,
         const std::optional<at::Tensor>& gate, const std::optional<at::Tensor>& residual) {
        return Forward(q, k, v, cu_seqlens_q, cu_seqlens_k, {max_seqlen_q, max_seqlen_k, causal, scale},
                       gate.value_or(at::Tensor()), residual.value_or(at::Tensor()));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
      py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("causal"), py::arg("scale"), py::arg("gate"),
      py::arg("residual"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "cross_modal_attention_backward",
      [](const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& attn, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
         int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale, const std::optional<at::Tensor>& gate) {
        return Backward(grad_out, q, k, v, attn, lse, cu_seqlens_q, cu_seqlens_k,
                        {max_seqlen_q, max_seqlen_k, causal, scale}, gate.value_or(at::Tensor()));
      },
      py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("attn"), py::arg("lse"),
      py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
      py::arg("causal"), py::arg("scale"), py::arg("gate"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmfast native kernels";
  auto cpu = m.def_submodule("cpu", "C++ kernels for CPU tensors (ATen + at::vec + OpenMP)");
  bind_cross_entropy<mmfast::cpu::cross_entropy_forward, mmfast::cpu::cross_entropy_backward>(cpu);
  bind_linear_cross_entropy<mmfast::cpu::linear_cross_entropy_forward>(cpu);
  bind_lora_linear<mmfast::cpu::lora_linear_forward, mmfast::cpu::lora_linear_backward, mmfast::cpu::lora_linear_mask>(cpu);
  bind_cross_modal_attention<mmfast::cpu::cross_modal_attention_forward, mmfast::cpu::cross_modal_attention_backward>(cpu);
#ifdef MMFAST_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA C++ kernels for CUDA tensors");
  bind_cross_entropy<mmfast::cuda::cross_entropy_forward, mmfast::cuda::cross_entropy_backward>(cuda);
  bind_linear_cross_entropy<mmfast::cuda::linear_cross_entropy_forward>(cuda);
  bind_lora_linear<mmfast::cuda::lora_linear_forward, mmfast::cuda::lora_linear_backward,
                   mmfast::cuda::lora_linear_mask>(cuda);
  bind_cross_modal_attention<mmfast::cuda::cross_modal_attention_forward,
                             mmfast::cuda::cross_modal_attention_backward>(cuda);
#endif
}
