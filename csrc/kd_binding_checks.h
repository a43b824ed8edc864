// Argument checks shared by the CPU and CUDA torch bindings. The Python layer
// (kdfast/api.py) validates every input first; these keep a direct call of an extension
// from reading or writing out of bounds.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <limits>

namespace kdfast {

// A (B, M, V) tensor with unit stride along V, 1 <= V < 2^31, on like's device and of its shape.
inline void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, name, " must be (B, M, V) with unit stride along V");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.size(2) >= 1 && t.size(2) <= std::numeric_limits<int32_t>::max(), name,
              " must have between 1 and 2^31 - 1 entries per row, got ", t.size(2));
}

// The arguments of kd_forward; returns the number of rows.
inline int64_t check_forward_args(const at::Tensor& student, const at::Tensor& teacher,
                                  const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& grad,
                                  const at::Tensor& coefs, bool hard) {
  check_rows(student, "student", student);
  check_rows(teacher, "teacher", student);
  const int64_t n_rows = student.size(0) * student.size(1);
  if (labels) {
    TORCH_CHECK(labels->device() == student.device() && labels->scalar_type() == at::kLong &&
                    labels->is_contiguous() && labels->numel() == n_rows,
                "labels must be a contiguous int64 tensor on the logits' device with one entry per row");
  }
  TORCH_CHECK(!hard || labels, "hard-label loss needs labels");
  if (grad) {
    check_rows(*grad, "grad", student);
    TORCH_CHECK(grad->scalar_type() == student.scalar_type(), "grad must have the student's dtype");
  }
  TORCH_CHECK(coefs.numel() == 2, "coefs must hold (coef_kd, coef_ce)");
  return n_rows;
}

}  // namespace kdfast
