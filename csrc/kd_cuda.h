/* C interface of kdfast's CUDA kernels (csrc/kd_cuda.cu).
 *
 * Plain structs of device pointers, sizes and strides, so that the kernels build with
 * the CUDA toolkit alone and any binding (kd_cuda_binding.cpp for torch) stays thin.
 * Logits are (batch, rows_per_batch, vocab) arrays with unit stride along vocab. Strides
 * count elements; sizes, strides and row offsets are 64-bit (a row itself holds fewer
 * than 2^31 entries). The functions launch on `stream` and return a cudaError_t code
 * (cudaSuccess = 0) without synchronising.
 */
#ifndef KDFAST_KD_CUDA_H
#define KDFAST_KD_CUDA_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of logits and gradients; all math is fp32 whatever the type. */
enum { KDFAST_FLOAT32 = 0, KDFAST_BFLOAT16 = 1, KDFAST_FLOAT16 = 2 };

/* Divergence codes, the same as kdfast.backends' FORWARD_KL, REVERSE_KL, JSD and TVD. */
enum { KDFAST_FORWARD_KL = 0, KDFAST_REVERSE_KL = 1, KDFAST_JSD = 2, KDFAST_TVD = 3 };

/* Row r = b * rows_per_batch + m starts at data + b * stride_b + m * stride_m. */
typedef struct {
  const void* data;
  int dtype; /* KDFAST_FLOAT32, KDFAST_BFLOAT16 or KDFAST_FLOAT16 */
  int64_t stride_b;
  int64_t stride_m;
} KdCudaRows;

typedef struct {
  KdCudaRows student;
  KdCudaRows teacher;
  /* NULL for the loss alone; else receives coefs[0] * d(kd)/ds + coefs[1] * d(ce)/ds in
   * the student's dtype. It may be student.data itself (the gradient overwrites it). */
  void* grad;
  int64_t grad_stride_b;
  int64_t grad_stride_m;
  int64_t batch;
  int64_t rows_per_batch;
  int64_t vocab;         /* 1 .. 2^31 - 1 */
  const int64_t* labels; /* batch * rows_per_batch entries, or NULL */
  const float* coefs;    /* (coef_kd, coef_ce), read on the device; needed only with grad */
  float* kd_out;         /* per row: the divergence (not times T^2) */
  float* ce_out;         /* per row: the hard-label cross-entropy at T = 1 (0 unless hard) */
  float temperature;     /* > 0: the student's (and that of d(kd)/ds's 1 / T) */
  float teacher_temperature; /* > 0: the teacher's softmax is taken at it */
  double beta;           /* jsd mixture weight, in (0, 1); double, for 1 - beta near 0 */
  int64_t ignore_index;  /* rows with this label are not read: 0 loss, zero gradient */
  int divergence;        /* KDFAST_FORWARD_KL, KDFAST_REVERSE_KL, KDFAST_JSD or KDFAST_TVD */
  int hard;              /* nonzero: also the hard-label cross-entropy (needs labels) */
  /* The logit transforms of each side, applied to its raw logits x before everything above:
   * y = scale x, then z = cap tanh(y / cap) when cap > 0, else z = y. scale 1 and cap 0 are
   * off; else finite and > 0. grad is with respect to x: that with respect to z times
   * dz/dx = scale (1 - tanh^2(y / cap)) (scale without a cap). */
  float student_scale, student_cap;
  float teacher_scale, teacher_cap;
} KdCudaArgs;

/* The fused loss (and gradient) of every row. Rows holding NaN, or +inf on a side without a
 * cap (a cap maps it to +cap), rows all -inf on a side without a cap (a cap maps -inf to
 * -cap), and rows whose label is neither ignore_index nor in [0, vocab) (with or without
 * hard) give NaN losses (the cross-entropy only with hard) and a NaN gradient row. */
int kdfast_kd_forward_cuda(const KdCudaArgs* args, cudaStream_t stream);

typedef struct {
  void* grad;
  int dtype; /* KDFAST_FLOAT32, KDFAST_BFLOAT16 or KDFAST_FLOAT16 */
  int64_t stride_b;
  int64_t stride_m;
  int64_t batch;
  int64_t rows_per_batch;
  int64_t vocab; /* 1 .. 2^31 - 1 */
  const float* scale; /* one float on the device */
} KdCudaScaleArgs;

/* grad *= *scale in fp32; does nothing (reads no gradient) when *scale is exactly 1. */
int kdfast_scale_grad_cuda(const KdCudaScaleArgs* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* KDFAST_KD_CUDA_H */
