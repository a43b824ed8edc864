// What the CPU kernels (kd_cpu.cpp, kd_sparse_cpu.cpp) share: the divergence codes, which
// kdfast/backends/__init__.py checks when an extension loads, the vector helpers over ATen's
// Vectorized<float> (the widest SIMD torch uses here), row access and dtype dispatch.
#pragma once

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>

namespace kdfast_cpu {

enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2, kTVD = 3 };

// The codes as the dict each extension exports as DIVERGENCE_CODES.
inline pybind11::dict divergence_codes() {
  pybind11::dict codes;
  codes["forward_kl"] = static_cast<int64_t>(kForwardKL);
  codes["reverse_kl"] = static_cast<int64_t>(kReverseKL);
  codes["jsd"] = static_cast<int64_t>(kJSD);
  codes["tvd"] = static_cast<int64_t>(kTVD);
  return codes;
}

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Entries per block of a row's first sweep (a multiple of kLanes): 4-8% faster than 1024.
constexpr int64_t kBlock = 512;
// How far ahead of a row's loads to prefetch: 1-2% better than 4096 or 8192, 10% better than none.
constexpr int64_t kPrefetchBytes = 1024;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline Vec load_float(const float* p) { return Vec::loadu(p); }
template <typename T>
inline Vec load_float(const T* p) {
  Vec out;
  at::vec::load_to_float<T>(p, out);
  return out;
}

inline float hmax(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, v);
}
inline float hsum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

// Stores one vector of gradient; streaming (non-temporal) stores skip the read of the
// destination line that a normal store of a cold line costs.
inline void store_grad(float* p, Vec v, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if (stream) return _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if (stream) return _mm256_stream_ps(p, v);
#endif
  v.store(p);
}
template <typename T>
inline void store_grad(T* p, Vec v, bool stream) {
  const auto packed = at::vec::convert_from_float<T>(v, v);  // the first kLanes entries hold v
#if defined(CPU_CAPABILITY_AVX512)
  if (stream) return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(packed));
#elif defined(CPU_CAPABILITY_AVX2)
  if (stream) return _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#endif
  packed.store(p, kLanes);
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}


// Rows of a (B, M, V) tensor whose last dimension has unit stride.
template <typename T>
struct Rows {
  T* base;
  int64_t rows_per_batch, stride_b, stride_m;
  explicit Rows(const at::Tensor& t)
      : base(static_cast<T*>(t.data_ptr())),
        rows_per_batch(t.size(1)),
        stride_b(t.stride(0)),
        stride_m(t.stride(1)) {}
  T* row(int64_t r) const {
    return base + (r / rows_per_batch) * stride_b + (r % rows_per_batch) * stride_m;
  }
};

// Calls fn with a value of the C++ type of a floating dtype the CPU kernel supports.
template <typename Fn>
void dispatch_float(at::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(at::BFloat16{});
    case at::kHalf: return fn(at::Half{});
    default:
      TORCH_CHECK(false, what, " must be float32, bfloat16 or float16 for the cpu backend, got ", dtype);
  }
}

}  // namespace kdfast_cpu
