// What the CPU kernels (kd_cpu.cpp, kd_sparse_cpu.cpp) share: the divergence codes, which
// kdfast/backends/__init__.py checks when an extension loads, the vector helpers over ATen's
// Vectorized<float> (the widest SIMD torch uses here), row access and dtype dispatch.
#pragma once

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>
#include <type_traits>

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

// One side's logit transforms, as the model computes its logits: z = cap tanh(scale x / cap)
// (cap > 0), else z = scale x; scale 1 and cap 0 are off. The kernels apply them to raw logits
// as they load them, so everything downstream sees z; the caller picks the path once per call
// (a template flag), so that the off path has no trace of them.
struct LogitTransform {
  float scale = 1.f, cap = 0.f;
  float scale_over_cap = 0.f;  // formed in double: scale / cap in one rounding

  LogitTransform() = default;
  LogitTransform(double scale_, double cap_)
      : scale(static_cast<float>(scale_)),
        cap(static_cast<float>(cap_)),
        scale_over_cap(cap_ > 0 ? static_cast<float>(scale_ / cap_) : 0.f) {}
  bool on() const { return scale != 1.f || cap > 0.f; }

  // tanh(-inf) = -1: with a cap, -inf becomes -cap and +inf becomes +cap, as in the model.
  Vec apply(Vec x) const {
    if (cap > 0.f) return Vec(cap) * (x * Vec(scale_over_cap)).tanh();
    return x * Vec(scale);
  }
  // dz/dx = scale (1 - tanh^2 u) = scale 4e / (1 + e)^2 with e = exp(-2|u|): 1 - tanh^2 from an
  // fp32 tanh near 1 would keep few correct digits where the softmax mass sits (z near cap).
  // 0 at x = +-inf.
  Vec slope(Vec x) const {
    if (cap > 0.f) {
      const Vec e = (Vec(-2.f) * (x * Vec(scale_over_cap)).abs()).exp();
      const Vec one_e = Vec(1.f) + e;
      return Vec(4.f * scale) * e / (one_e * one_e);
    }
    return Vec(scale);
  }
  // Scalar forms through the vector ones, so that an entry read alone (a label, a sparse id)
  // gets exactly the bits it gets in a sweep.
  float apply(float x) const { return first_lane(apply(Vec(x))); }
  float slope(float x) const { return first_lane(slope(Vec(x))); }

 private:
  static float first_lane(Vec v) {
    alignas(64) float lanes[kLanes];
    v.store(lanes);
    return lanes[0];
  }
};

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

// Calls fn with std::true_type or std::false_type: a flag made a template parameter, so that
// it is tested once per call instead of per entry.
template <typename Fn>
void dispatch_bool(bool flag, Fn&& fn) {
  if (flag) return fn(std::true_type{});
  return fn(std::false_type{});
}

}  // namespace kdfast_cpu
