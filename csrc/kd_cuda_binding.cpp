// The torch binding of the CUDA kernels (kd_cuda.cu): checks the tensors, fills the C
// structs of kd_cuda.h and launches on the current CUDA stream. Built only against a
// CUDA build of torch: JIT by kdfast/backends/cuda_ext.py, or at install time with
// KDFAST_BUILD_CUDA=1. The Python layer has already validated every input.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "kd_binding_checks.h"
#include "kd_cuda.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, name,
              " must be float32, bfloat16 or float16 for the cuda backend, got ", type);
  return type == at::kFloat ? KDFAST_FLOAT32 : type == at::kBFloat16 ? KDFAST_BFLOAT16 : KDFAST_FLOAT16;
}

void check_launch(int code) {
  TORCH_CHECK(code == cudaSuccess, "kdfast cuda kernel: ", cudaGetErrorString(static_cast<cudaError_t>(code)));
}

std::tuple<at::Tensor, at::Tensor> kd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                              const c10::optional<at::Tensor>& labels,
                                              const c10::optional<at::Tensor>& grad, const at::Tensor& coefs,
                                              double temperature, double teacher_temperature,
                                              int64_t divergence, double beta,
                                              int64_t ignore_index, bool hard, double student_scale,
                                              double student_cap, double teacher_scale, double teacher_cap) {
  TORCH_CHECK(student.is_cuda(), "student must be a CUDA tensor");
  const int64_t n_rows = kdfast::check_forward_args(student, teacher, labels, grad, coefs, hard);
  // Read by the kernel on the device: no host sync. Freed tensors are reused in stream order.
  const at::Tensor coefs_f = coefs.to(student.device(), at::kFloat).contiguous();

  const c10::cuda::CUDAGuard device_guard(student.device());
  at::Tensor kd_out = at::empty({n_rows}, student.options().dtype(at::kFloat));
  at::Tensor ce_out = at::empty({n_rows}, student.options().dtype(at::kFloat));
  KdCudaArgs args{};
  args.student = {student.data_ptr(), dtype_code(student, "student_logits"), student.stride(0), student.stride(1)};
  args.teacher = {teacher.data_ptr(), dtype_code(teacher, "teacher_logits"), teacher.stride(0), teacher.stride(1)};
  if (grad) {
    args.grad = grad->data_ptr();
    args.grad_stride_b = grad->stride(0);
    args.grad_stride_m = grad->stride(1);
  }
  args.batch = student.size(0);
  args.rows_per_batch = student.size(1);
  args.vocab = student.size(2);
  args.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  args.coefs = coefs_f.data_ptr<float>();
  args.kd_out = kd_out.data_ptr<float>();
  args.ce_out = ce_out.data_ptr<float>();
  args.temperature = static_cast<float>(temperature);
  args.teacher_temperature = static_cast<float>(teacher_temperature);
  args.beta = beta;
  args.ignore_index = ignore_index;
  args.divergence = static_cast<int>(divergence);
  args.hard = hard;
  // The kernel's transforms are fp32 math, as the other backends' are.
  args.student_scale = static_cast<float>(student_scale);
  args.student_cap = static_cast<float>(student_cap);
  args.teacher_scale = static_cast<float>(teacher_scale);
  args.teacher_cap = static_cast<float>(teacher_cap);
  check_launch(kdfast_kd_forward_cuda(&args, c10::cuda::getCurrentCUDAStream()));
  return {kd_out, ce_out};
}

void scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.is_cuda(), "grad must be a CUDA tensor");
  kdfast::check_rows(grad, "grad", grad);
  TORCH_CHECK(scale.numel() == 1, "scale must hold one value, got ", scale.numel());
  const at::Tensor scale_f = scale.to(grad.device(), at::kFloat).contiguous();
  const c10::cuda::CUDAGuard device_guard(grad.device());
  KdCudaScaleArgs args{};
  args.grad = grad.data_ptr();
  args.dtype = dtype_code(grad, "grad");
  args.stride_b = grad.stride(0);
  args.stride_m = grad.stride(1);
  args.batch = grad.size(0);
  args.rows_per_batch = grad.size(1);
  args.vocab = grad.size(2);
  args.scale = scale_f.data_ptr<float>();
  check_launch(kdfast_scale_grad_cuda(&args, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast: fused knowledge-distillation loss, CUDA kernel";
  // Checked against kdfast.backends.DIVERGENCE_CODES when the extension loads.
  m.attr("DIVERGENCE_CODES") = py::dict(py::arg("forward_kl") = static_cast<int64_t>(KDFAST_FORWARD_KL),
                                        py::arg("reverse_kl") = static_cast<int64_t>(KDFAST_REVERSE_KL),
                                        py::arg("jsd") = static_cast<int64_t>(KDFAST_JSD),
                                        py::arg("tvd") = static_cast<int64_t>(KDFAST_TVD));
  m.def("kd_forward", &kd_forward, "Per-row divergence and cross-entropy, and optionally the weighted gradient",
        py::arg("student"), py::arg("teacher"), py::arg("labels"), py::arg("grad"), py::arg("coefs"),
        py::arg("temperature"), py::arg("teacher_temperature"), py::arg("divergence"), py::arg("beta"),
        py::arg("ignore_index"), py::arg("hard"), py::arg("student_scale") = 1.0, py::arg("student_cap") = 0.0,
        py::arg("teacher_scale") = 1.0, py::arg("teacher_cap") = 0.0, py::call_guard<py::gil_scoped_release>());
  m.def("scale_grad_", &scale_grad, "grad *= scale (a one-element tensor), skipped on the device when it is 1",
        py::arg("grad"), py::arg("scale"), py::call_guard<py::gil_scoped_release>());
}
