// Fused knowledge-distillation loss for CUDA tensors: the algorithm and numerics of
// csrc/kd_cpu.cpp on a GPU, behind the C interface of kd_cuda.h.
//
// A group of threads owns a row: one warp when the vocabulary is small (a block then
// holds kBlockThreads / 32 rows), else the whole block. Sweep 1 reads the row once,
// W entries per thread at a time with 8- or 16-byte loads (scalars at an unaligned head
// and at the tail), keeping per thread an online softmax of both sides against running
// maxima; warp shuffles and one shared-memory step merge the threads' states. jsd then
// sweeps again for the mixture term, and the gradient sweep re-reads the row and writes
// the gradient. Each sweep walks the row in the opposite direction to the one before,
// so that what was read last, the part most likely still in L2, is read again first;
// a row's last sweep loads and stores with evict-first hints, so that what is dead
// pushes out of L2 before what is still to be re-read.
//
// Logit transforms (a logit scale and a soft cap per side, kd_cuda.h) are applied to every
// entry as it is loaded, in every sweep; a launch without them runs kernels compiled
// without them (kTransform false), which convert entries only as they are used.
//
// Only CUDA toolkit headers here: the torch binding is kd_cuda_binding.cpp.
#include "kd_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlockThreads = 512;
constexpr int64_t kWarpRowMaxVocab = 4096;  // rows up to this long get a warp each (not yet tuned on a GPU)
constexpr int64_t kMaxBlocks = int64_t{1} << 30;  // more rows than this many groups: blocks stride over them
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLn2 = 0.6931471805599453;
constexpr float kLn2f = static_cast<float>(kLn2);

enum : unsigned { kSeenS = 1, kSeenT = 2, kBad = 4 };

// Bit patterns of an element type, and their fp32 values.
template <typename X>
struct Elem;
template <>
struct Elem<float> {
  static __device__ uint32_t raw(float x) { return __float_as_uint(x); }
  static __device__ float make(uint32_t bits) { return __uint_as_float(bits); }
  static __device__ float to_float(uint32_t bits) { return __uint_as_float(bits); }
  static __device__ uint32_t bits_of(float v) { return __float_as_uint(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  static __device__ uint32_t raw(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  static __device__ __nv_bfloat16 make(uint32_t bits) { return __ushort_as_bfloat16(static_cast<uint16_t>(bits)); }
  static __device__ float to_float(uint32_t bits) { return __uint_as_float(bits << 16); }
  static __device__ uint32_t bits_of(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};
template <>
struct Elem<__half> {
  static __device__ uint32_t raw(__half x) { return __half_as_ushort(x); }
  static __device__ __half make(uint32_t bits) { return __ushort_as_half(static_cast<uint16_t>(bits)); }
  static __device__ float to_float(uint32_t bits) { return __half2float(make(bits)); }
  static __device__ uint32_t bits_of(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <typename X>
__device__ float load_one(const X* p) {
  return Elem<X>::to_float(Elem<X>::raw(*p));
}
template <typename X>
__device__ void store_one(X* p, float v) {
  *p = Elem<X>::make(Elem<X>::bits_of(v));
}

// W consecutive entries of type X as 32-bit words: 8 or 16 bytes, one memory access.
// Entries are converted to and from fp32 one at a time, as they are used, which keeps
// fewer registers live than fp32 copies of whole vectors would.
template <typename X, int W>
struct Packed {
  static constexpr int kSize = W;
  static constexpr int kPerWord = 4 / sizeof(X);
  static constexpr int kWords = W / kPerWord;
  static constexpr int kBytes = W * sizeof(X);
  static_assert(kBytes == 8 || kBytes == 16, "a vector is 8 or 16 bytes");
  uint32_t word[kWords];

  __device__ uint32_t raw(int k) const {
    return kPerWord == 1 ? word[k] : (word[k / 2] >> (16 * (k % 2))) & 0xffffu;
  }
  __device__ float get(int k) const { return Elem<X>::to_float(raw(k)); }
  // Entries must be set in order, from k = 0.
  __device__ void set(int k, float v) {
    const uint32_t bits = Elem<X>::bits_of(v);
    if (kPerWord == 1) {
      word[k] = bits;
    } else {
      word[k / 2] = k % 2 ? word[k / 2] | (bits << 16) : bits;
    }
  }
  static __device__ Packed of_bits(const uint32_t (&bits)[W]) {
    Packed p;
#pragma unroll
    for (int j = 0; j < kWords; ++j) p.word[j] = kPerWord == 1 ? bits[j] : bits[2 * j] | (bits[2 * j + 1] << 16);
    return p;
  }
};

// One vector load where p is aligned for it, else W scalar loads. last_use: evict-first.
template <typename X, int W>
__device__ Packed<X, W> load_packed(const X* p, bool vectorised, bool last_use) {
  Packed<X, W> v;
  if (!vectorised) {
    uint32_t bits[W];
#pragma unroll
    for (int k = 0; k < W; ++k) bits[k] = Elem<X>::raw(p[k]);
    return Packed<X, W>::of_bits(bits);
  }
  if constexpr (Packed<X, W>::kBytes == 16) {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    const uint4 r = last_use ? __ldcs(q) : *q;
    v.word[0] = r.x, v.word[1] = r.y, v.word[2] = r.z, v.word[3] = r.w;
  } else {
    const uint2* q = reinterpret_cast<const uint2*>(p);
    const uint2 r = last_use ? __ldcs(q) : *q;
    v.word[0] = r.x, v.word[1] = r.y;
  }
  return v;
}

// Stores are evict-first: nothing here reads a gradient back.
template <typename X, int W>
__device__ void store_packed(X* p, const Packed<X, W>& v, bool vectorised) {
  if (!vectorised) {
#pragma unroll
    for (int k = 0; k < W; ++k) p[k] = Elem<X>::make(v.raw(k));
  } else if constexpr (Packed<X, W>::kBytes == 16) {
    __stcs(reinterpret_cast<uint4*>(p), make_uint4(v.word[0], v.word[1], v.word[2], v.word[3]));
  } else {
    __stcs(reinterpret_cast<uint2*>(p), make_uint2(v.word[0], v.word[1]));
  }
}

template <int W, typename X>
__device__ bool vector_aligned(const X* p) {
  return reinterpret_cast<uintptr_t>(p) % (W * sizeof(X)) == 0;
}

// A row's entries [0, vocab) as a scalar head (up to the first entry at which `anchor`
// is aligned for W-entry vectors), whole vectors, and a scalar tail. The scalars number
// fewer than 2W <= 32, so one warp takes them all. Offsets within a row are 32-bit
// (the C interface takes rows of up to 2^31 - 1 entries), which saves registers.
struct RowSplit {
  int head, n_vec, tail_start, n_scalar;
  __device__ int scalar_index(int j) const { return j < head ? j : tail_start + (j - head); }
};

template <int W, typename X>
__device__ RowSplit split_row(const X* anchor, int vocab) {
  constexpr uintptr_t kBytes = W * sizeof(X);
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(anchor) % kBytes;
  RowSplit sp;
  sp.head = misaligned ? static_cast<int>((kBytes - misaligned) / sizeof(X)) : 0;
  if (sp.head > vocab) sp.head = vocab;
  sp.n_vec = (vocab - sp.head) / W;
  sp.tail_start = sp.head + sp.n_vec * W;
  sp.n_scalar = sp.head + vocab - sp.tail_start;
  return sp;
}

// The rows a thread works on: its group (a warp, or the whole block) takes rows
// first, first + stride, ...; lane is the thread's index in the group.
struct RowGroups {
  int group, lane;
  int64_t first, stride;
  __device__ explicit RowGroups(int group_size)
      : group(group_size),
        lane(static_cast<int>(threadIdx.x) % group_size),
        first(static_cast<int64_t>(blockIdx.x) * (kBlockThreads / group_size) + threadIdx.x / group_size),
        stride(static_cast<int64_t>(gridDim.x) * (kBlockThreads / group_size)) {}
};

template <typename X>
__device__ X* row_start(X* base, int64_t r, int64_t rows_per_batch, int64_t stride_b, int64_t stride_m) {
  return base + (r / rows_per_batch) * stride_b + (r % rows_per_batch) * stride_m;
}

// Sets each entry x of a row to fn(x) (to fn(0) without kRead, which reads nothing).
template <bool kRead, typename X, typename Fn>
__device__ void map_row(X* row, int vocab, int lane, int group, Fn fn) {
  constexpr int W = 16 / sizeof(X);
  const RowSplit sp = split_row<W>(row, vocab);
  if (lane < sp.n_scalar) {
    X* p = row + sp.scalar_index(lane);
    store_one(p, fn(kRead ? load_one(p) : 0.f));
  }
  for (int v = lane; v < sp.n_vec; v += group) {
    X* p = row + sp.head + v * W;
    Packed<X, W> x;
    if constexpr (kRead) x = load_packed<X, W>(p, true, true);
#pragma unroll
    for (int k = 0; k < W; ++k) x.set(k, fn(kRead ? x.get(k) : 0.f));
    store_packed(p, x, true);
  }
}

// A side's logit transforms, as its model applies them to its raw logits x: y = scale x,
// then z = cap t with t = tanh(y / cap) when cap > 0, else z = y. The kernel computes
// everything on z and takes the student's gradient back to x through dz/dx = scale (1 - t^2)
// (scale without a cap). In two steps, so that a loaded vector keeps one float per entry,
// u = t (or y), from which z and dz/dx are a product away (fp32 copies of both z and dz/dx
// spilled registers in the gradient sweep). tanhf, not the approximate __tanhf: near t = 1, 1 - t^2 is all of dz/dx.
// x = -inf with a cap gives z = -cap and dz/dx = 0, +inf gives +cap; NaN stays NaN.
struct LogitTransform {
  float scale, cap;  // 1 and 0: off

  // y = scale x, divided by the cap when there is one; there a +-inf logit becomes +-FLT_MAX (z = +-cap,
  // as tanh makes it), so that -inf is left to mark padding, which must stay -inf.
  __device__ float inner(float x) const {
    const float y = x * scale;
    if (cap == 0.f) return y;
    const float u = y / cap;
    return isinf(u) ? copysignf(FLT_MAX, u) : u;
  }
  __device__ float z(float y) const { return cap > 0.f && y != -kInf ? cap * tanhf(y) : y; }
  // dz/dx = scale (1 - tanh^2(y)), as 4 e / (1 + e)^2 with e = exp(-2|y|): from a rounded tanh, 1 - t^2
  // loses its digits where the cap saturates (2e-3 relative at |y| = 6).
  __device__ float slope(float y) const {
    if (cap == 0.f) return scale;
    const float e = expf(-2.f * fabsf(y));
    return scale * (4.f * e / ((1.f + e) * (1.f + e)));
  }
  __device__ float apply(float x) const { return z(inner(x)); }
};

// W entries of one side through its transforms, what the sweeps see with kTransform.
template <int W>
struct Logits {
  static constexpr int kSize = W;
  float y[W];  // LogitTransform::inner of each entry
  LogitTransform tr;
  __device__ float get(int k) const { return tr.z(y[k]); }
  __device__ float slope(int k) const { return tr.slope(y[k]); }  // dz/dx
};

// The logits of a loaded vector v whose entries from n_live on are padding: v itself without
// kTransform (entries are converted as they are used); else each live entry's y, computed
// once per load. The padding is y = -inf, which z keeps -inf with or without a cap (a raw -inf
// becomes -cap through one, and counts); its slope is never stored.
template <bool kTransform, typename X, int W>
__device__ auto logits_of(const Packed<X, W>& v, LogitTransform tr, int n_live) {
  if constexpr (!kTransform) {
    return v;
  } else {
    Logits<W> l;
    l.tr = tr;
#pragma unroll
    for (int k = 0; k < W; ++k) l.y[k] = k < n_live ? tr.inner(v.get(k)) : -kInf;
    return l;
  }
}

// A row of student and teacher logits, split for the student's vectors; the teacher's
// and the gradient's vectors are used where they are aligned at the same entries too.
template <typename S, typename T>
struct RowPair {
  static constexpr int W = 16 / (sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));  // entries per vector
  using SVec = Packed<S, W>;
  using TVec = Packed<T, W>;
  const S* s;
  const T* t;
  S* g;  // the gradient row, or null
  LogitTransform s_tr, t_tr;  // used by sweeps with kTransform only
  RowSplit split;
  bool t_vec, g_vec;

  __device__ RowPair(const S* s_row, const T* t_row, S* g_row, LogitTransform s_transform,
                     LogitTransform t_transform, int vocab)
      : s(s_row), t(t_row), g(g_row), s_tr(s_transform), t_tr(t_transform), split(split_row<W>(s_row, vocab)) {
    t_vec = vector_aligned<W>(t + split.head);
    g_vec = g != nullptr && vector_aligned<W>(g + split.head);
  }
};

// Calls fn(first, s, t, g) over the row, W entries at a time: a thread's vector, or one
// scalar entry padded with -inf (which adds nothing to any sum). s and t are the loaded
// vectors, or with kTransform their Logits (logits_of: every load of the sweeps passes
// here). With kStore, stores g as the gradient of those entries, after this thread read
// them (so the gradient may overwrite the student). kReverse walks from the end of the row.
template <bool kReverse, bool kStore, bool kTransform, typename S, typename T, typename Fn>
__device__ void sweep(const RowPair<S, T>& row, int lane, int group, bool last_use, Fn&& fn) {
  using Row = RowPair<S, T>;
  constexpr int W = Row::W;
  const RowSplit& sp = row.split;
  auto scalars = [&] {
    if (lane >= sp.n_scalar) return;
    const int i = sp.scalar_index(lane);
    uint32_t s_bits[W], t_bits[W];
#pragma unroll
    for (int k = 1; k < W; ++k) s_bits[k] = Elem<S>::bits_of(-kInf), t_bits[k] = Elem<T>::bits_of(-kInf);
    s_bits[0] = Elem<S>::raw(row.s[i]);
    t_bits[0] = Elem<T>::raw(row.t[i]);
    typename Row::SVec g;
    fn(i, logits_of<kTransform>(Row::SVec::of_bits(s_bits), row.s_tr, 1),
       logits_of<kTransform>(Row::TVec::of_bits(t_bits), row.t_tr, 1), g);
    if constexpr (kStore) row.g[i] = Elem<S>::make(g.raw(0));
  };
  if constexpr (!kReverse) scalars();
  const int n_steps = (sp.n_vec + group - 1) / group;
  for (int k = 0; k < n_steps; ++k) {
    const int v = (kReverse ? n_steps - 1 - k : k) * group + lane;
    if (v >= sp.n_vec) continue;
    const int first = sp.head + v * W;
    const typename Row::SVec s = load_packed<S, W>(row.s + first, true, last_use);
    const typename Row::TVec t = load_packed<T, W>(row.t + first, row.t_vec, last_use);
    typename Row::SVec g;
    fn(first, logits_of<kTransform>(s, row.s_tr, W), logits_of<kTransform>(t, row.t_tr, W), g);
    if constexpr (kStore) store_packed(row.g + first, g, row.g_vec);
  }
  if constexpr (kReverse) scalars();
}

// Sweep 1's online softmax of both sides, per thread and then per row. Everything is
// relative to the running maxima ("shifts") and in log2 units, a = (x - shift) log2(e) / T,
// so the exponentials are exp2 of numbers <= 0, and the divergence is a sum of small
// terms instead of a difference of two log-sum-exps of the size of the logits. Logits
// are divided by T only after the shift is subtracted, so huge logits lose nothing.
// log2(e) / T of each side: the student's and the teacher's temperatures may differ.
struct Scales {
  float s, t;
};

template <int kDiv, bool kHard>
struct SoftmaxStats {
  float shift_s, shift_t;  // running maxima; 0 while a side has seen only -inf
  float zs, zt;            // sum 2^a
  float w;                 // forward: sum 2^a_t (a_t - a_s); reverse: sum 2^a_s (a_s - a_t)
  float z1;                // hard labels: sum 2^((s - shift_s) log2 e), the softmax at T = 1
  unsigned flags;          // kSeenS | kSeenT | kBad (a NaN or +inf was seen)

  static __device__ SoftmaxStats identity() { return {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0u}; }

  // Re-expresses the sums against shifts no lower than the current ones.
  __device__ void rebase(float new_s, float new_t, unsigned new_flags, Scales c) {
    const float da_s = (new_s - shift_s) * c.s, da_t = (new_t - shift_t) * c.t;
    const float f_s = (flags & kSeenS) ? exp2f(-da_s) : 0.f;
    const float f_t = (flags & kSeenT) ? exp2f(-da_t) : 0.f;
    // 2^a' = f 2^a with a' = a - da. A weight that underflowed to 0 adds nothing, even to
    // an infinite w (a student -inf where the teacher had mass).
    if constexpr (kDiv == KDFAST_FORWARD_KL) w = f_t > 0.f ? f_t * (w - zt * (da_t - da_s)) : 0.f;
    if constexpr (kDiv == KDFAST_REVERSE_KL) w = f_s > 0.f ? f_s * (w - zs * (da_s - da_t)) : 0.f;
    if constexpr (kHard) z1 = (flags & kSeenS) ? z1 * exp2f((shift_s - new_s) * kLog2e) : 0.f;
    zs *= f_s;
    zt *= f_t;
    shift_s = new_s;
    shift_t = new_t;
    flags = new_flags;
  }

  template <typename SVec, typename TVec>
  __device__ void add(const SVec& s, const TVec& t, Scales c) {
    float max_s = -kInf, max_t = -kInf;
    bool bad = false;
#pragma unroll
    for (int k = 0; k < SVec::kSize; ++k) {
      const float x_s = s.get(k), x_t = t.get(k);
      max_s = fmaxf(max_s, x_s);
      max_t = fmaxf(max_t, x_t);
      bad |= !(x_s < kInf) || !(x_t < kInf);  // NaN or +inf
    }
    if (bad) flags |= kBad;
    const bool grow_s = max_s > -kInf && (!(flags & kSeenS) || max_s > shift_s);
    const bool grow_t = max_t > -kInf && (!(flags & kSeenT) || max_t > shift_t);
    if (grow_s || grow_t) {
      rebase(grow_s ? max_s : shift_s, grow_t ? max_t : shift_t,
             flags | (grow_s ? kSeenS : 0u) | (grow_t ? kSeenT : 0u), c);
    }
#pragma unroll
    for (int k = 0; k < SVec::kSize; ++k) {
      const float as = (s.get(k) - shift_s) * c.s, at = (t.get(k) - shift_t) * c.t;
      const float es = exp2f(as), et = exp2f(at);
      zs += es;
      zt += et;
      // 0 * log 0 = 0: entries with zero weight add nothing, even at -inf.
      if constexpr (kDiv == KDFAST_FORWARD_KL) w += et > 0.f ? et * (at - as) : 0.f;
      if constexpr (kDiv == KDFAST_REVERSE_KL) w += es > 0.f ? es * (as - at) : 0.f;
      if constexpr (kHard) z1 += exp2f((s.get(k) - shift_s) * kLog2e);
    }
  }

  // Commutative to the bit, so every lane of a butterfly ends with the same state.
  __device__ void merge(SoftmaxStats o, Scales c) {
    const unsigned both = flags | o.flags;
    const float new_s = !(o.flags & kSeenS) ? shift_s : !(flags & kSeenS) ? o.shift_s : fmaxf(shift_s, o.shift_s);
    const float new_t = !(o.flags & kSeenT) ? shift_t : !(flags & kSeenT) ? o.shift_t : fmaxf(shift_t, o.shift_t);
    rebase(new_s, new_t, both, c);
    o.rebase(new_s, new_t, both, c);
    zs += o.zs;
    zt += o.zt;
    w += o.w;
    z1 += o.z1;
  }

  __device__ SoftmaxStats shfl_xor(int offset) const {
    SoftmaxStats o = identity();
    o.shift_s = __shfl_xor_sync(kFullMask, shift_s, offset);
    o.shift_t = __shfl_xor_sync(kFullMask, shift_t, offset);
    o.zs = __shfl_xor_sync(kFullMask, zs, offset);
    o.zt = __shfl_xor_sync(kFullMask, zt, offset);
    if constexpr (kDiv == KDFAST_FORWARD_KL || kDiv == KDFAST_REVERSE_KL) o.w = __shfl_xor_sync(kFullMask, w, offset);
    if constexpr (kHard) o.z1 = __shfl_xor_sync(kFullMask, z1, offset);
    o.flags = __shfl_xor_sync(kFullMask, flags, offset);
    return o;
  }
};

// The jsd mixture m = beta p_t + (1 - beta) p_s seen from its lighter side A (the teacher when
// beta <= 0.5, else the student) and its heavier side B, in log2 units. Formed on the host in
// double from the double beta: at beta = 1 - 1e-6, 1 - beta from a float beta is 1.3 % off.
struct JsdWeights {
  float w_small;  // A's weight, <= 0.5
  float log_w_small;        // log2(w_small)
  float c;                  // log2(w_big / w_small) >= 0: past it, A's term dominates m
  float split;              // max(c, 1): where jsd_log_ratios changes formula
  double teacher, student;  // beta and 1 - beta
  bool teacher_is_a;
};

JsdWeights jsd_weights(double beta) {
  const bool teacher_is_a = beta <= 0.5;
  const double w_small = teacher_is_a ? beta : 1.0 - beta;  // exact for beta > 0.5
  const double c = (std::log1p(-w_small) - std::log(w_small)) / kLn2;
  return {static_cast<float>(w_small), static_cast<float>(std::log2(w_small)), static_cast<float>(c),
          static_cast<float>(std::max(c, 1.0)), beta, teacher_is_a ? 1.0 - beta : w_small, teacher_is_a};
}

// Below it, expm1 cannot overflow; above it, where w_small < 2^-64, w_small * expm1(delta)
// = 2^(delta + log2 w_small) - w_small without cancellation.
constexpr float kJsdExpm1Limit = 64.f;

struct JsdRatios {
  float teacher, student;  // log2 m - log2 p_t, log2 m - log2 p_s
};

// log2 m - log2 p of both sides without the cancellation of the difference in fp32. With
// delta = log2 p_A - log2 p_B: up to split (B dominates m, or delta <= 1),
// log m - log p_B = log1p(w_small expm1(delta)), whose argument is >= -w_small >= -0.5; beyond
// it, log m - log p_A = log(w_small) + log1p(2^(c - delta)), 2 to a power < 0. The other side's
// ratio differs by delta. Entries where both sides are -inf give NaN (their weights are 0).
__device__ JsdRatios jsd_log_ratios(float log_pt, float log_ps, const JsdWeights& w) {
  const float delta = w.teacher_is_a ? log_pt - log_ps : log_ps - log_pt;
  float ratio_a, ratio_b;
  if (delta <= w.split) {
    const float shifted = delta > kJsdExpm1Limit ? exp2f(delta + w.log_w_small) - w.w_small
                                                 : w.w_small * expm1f(delta * kLn2f);
    ratio_b = log1pf(shifted) * kLog2e;
    ratio_a = ratio_b - delta;
  } else {
    ratio_a = w.log_w_small + log1pf(exp2f(w.c - delta)) * kLog2e;
    ratio_b = ratio_a + delta;
  }
  return w.teacher_is_a ? JsdRatios{ratio_a, ratio_b} : JsdRatios{ratio_b, ratio_a};
}

// The second sweep's sums. jsd: sum p_t (log2 m - log2 p_t) and sum p_s (log2 m - log2 p_s), m the
// mixture (third unused); tvd: sum |p_t - p_s|, then the student's mass where p_s < p_t and where
// p_s > p_t, each plus half of its mass where they are equal.
struct MixtureTerms {
  float first, second, third;
  static __device__ MixtureTerms identity() { return {0.f, 0.f, 0.f}; }
  __device__ void merge(MixtureTerms o, Scales) {
    first += o.first;
    second += o.second;
    third += o.third;
  }
  __device__ MixtureTerms shfl_xor(int offset) const {
    return {__shfl_xor_sync(kFullMask, first, offset), __shfl_xor_sync(kFullMask, second, offset),
            __shfl_xor_sync(kFullMask, third, offset)};
  }
};

// The merge of the states of a row's group, in every thread of it: a butterfly over the
// warp and, for a block-wide group, another over the warps' results, passed through
// shared memory. It is also a memory barrier of the group (__syncthreads, or __syncwarp
// for a warp), so a logit one thread read before it is not yet overwritten by another
// thread's gradient after it.
template <typename State>
__device__ State group_reduce(State x, int group, Scales c) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x.merge(x.shfl_xor(offset), c);
  if (group == kWarp) {
    __syncwarp();
  } else {
    __shared__ State partial[kBlockThreads / kWarp];
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    x = lane < group / kWarp ? partial[lane] : State::identity();
    __syncthreads();  // partial is free for the next reduction
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) x.merge(x.shfl_xor(offset), c);
  }
  return x;
}

// What the gradient sweep needs of a row, log-normalisers in log2 units.
struct RowResult {
  float shift_s, shift_t, log_zs, log_zt, log_z1;
  float kd;    // the divergence, in nats
  float kl_s;  // jsd: KL(p_s || m), in nats
  float mass_below, mass_above;  // tvd: the student's mass where p_s < p_t (> p_t), + half of p_s = p_t
};

// d(tvd)/d(s_j / T) / p_s,j = g_j - sum_i p_s,i g_i, g = 0.5 sign(p_s - p_t) (sign(0) = 0, autograd's
// subgradient of |x|), from the masses: sums of positive terms, where 0.5 - sum_i p_s,i g_i would
// cancel when the teacher is near one-hot and the student puts little mass on its token.
__device__ __forceinline__ float tvd_factor(float ps, float pt, float mass_below, float mass_above) {
  return ps > pt ? mass_below : ps < pt ? -mass_above : 0.5f * (mass_below - mass_above);
}

// kTransform: the sides' logit transforms are on (a launch without them compiles them out).
template <typename S, typename T, int kDiv, bool kHard, bool kTransform>
__device__ void kd_row(const KdCudaArgs& a, const JsdWeights& jw, int64_t r, const RowGroups& rg, Scales c,
                       float coef_kd, float coef_ce) {
  using Row = RowPair<S, T>;
  using SVec = typename Row::SVec;
  constexpr int W = Row::W;
  const int lane = rg.lane, group = rg.group, vocab = static_cast<int>(a.vocab);
  S* grad = a.grad ? row_start(static_cast<S*>(a.grad), r, a.rows_per_batch, a.grad_stride_b, a.grad_stride_m)
                   : nullptr;
  // A row whose outputs are known without the sweeps.
  auto constant_row = [&](float kd, float ce, float g) {
    if (lane == 0) {
      a.kd_out[r] = kd;
      a.ce_out[r] = ce;
    }
    if (grad) map_row<false>(grad, vocab, lane, group, [g](float) { return g; });
  };
  const int64_t label = a.labels ? a.labels[r] : a.ignore_index;
  if (a.labels && label == a.ignore_index) return constant_row(0.f, 0.f, 0.f);  // not read at all
  // Labels decide which rows count even without the hard term, and are not checked on the
  // host (that would sync): a label out of range makes its row NaN.
  if (a.labels && (label < 0 || label >= vocab)) return constant_row(kNaN, kHard ? kNaN : 0.f, kNaN);

  const Row row(row_start(static_cast<const S*>(a.student.data), r, a.rows_per_batch, a.student.stride_b,
                          a.student.stride_m),
                row_start(static_cast<const T*>(a.teacher.data), r, a.rows_per_batch, a.teacher.stride_b,
                          a.teacher.stride_m),
                grad, {a.student_scale, a.student_cap}, {a.teacher_scale, a.teacher_cap}, vocab);
  // The label's logit z: read before the gradient sweep, which may overwrite the student
  // (group_reduce orders the two).
  float s_label = 0.f;
  if (kHard && lane == 0) {
    s_label = load_one(row.s + label);
    if constexpr (kTransform) s_label = row.s_tr.apply(s_label);
  }

  using Stats = SoftmaxStats<kDiv, kHard>;
  Stats st = Stats::identity();
  // jsd and tvd need both normalisers before their terms: a second sweep for the loss.
  constexpr bool kTwoSweeps = kDiv == KDFAST_JSD || kDiv == KDFAST_TVD;
  const bool one_sweep = grad == nullptr && !kTwoSweeps;
  sweep<false, false, kTransform>(row, lane, group, one_sweep,
                                  [&](int, const auto& s, const auto& t, SVec&) { st.add(s, t, c); });
  st = group_reduce(st, group, c);
  if ((st.flags & kBad) || (st.flags & (kSeenS | kSeenT)) != (kSeenS | kSeenT)) {
    return constant_row(kNaN, kHard ? kNaN : 0.f, kNaN);  // no softmax: NaN, +inf, or only -inf
  }

  // The final combinations in double: they subtract terms the size of log z.
  const double log_zs = log2(double{st.zs}), log_zt = log2(double{st.zt});
  RowResult res{st.shift_s, st.shift_t, static_cast<float>(log_zs), static_cast<float>(log_zt), 0.f, 0.f, 0.f, 0.f,
                0.f};
  // KL(p_t || p_s) = E_t[a_t - a_s] - log zt + log zs (the shifts cancel), and symmetrically.
  if constexpr (kDiv == KDFAST_FORWARD_KL) res.kd = static_cast<float>(kLn2 * (st.w / double{st.zt} - log_zt + log_zs));
  if constexpr (kDiv == KDFAST_REVERSE_KL) res.kd = static_cast<float>(kLn2 * (st.w / double{st.zs} - log_zs + log_zt));
  if constexpr (kDiv == KDFAST_JSD) {
    // Sweep 2: the mixture needs both normalisers first.
    MixtureTerms mt = MixtureTerms::identity();
    sweep<true, false, kTransform>(row, lane, group, grad == nullptr, [&](int, const auto& s, const auto& t, SVec&) {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float lps = (s.get(k) - res.shift_s) * c.s - res.log_zs;
        const float lpt = (t.get(k) - res.shift_t) * c.t - res.log_zt;
        const float ps = exp2f(lps), pt = exp2f(lpt);
        const JsdRatios vs_mix = jsd_log_ratios(lpt, lps, jw);
        // 0 * log 0 = 0: entries without mass add nothing (both sides -inf gives NaN ratios).
        mt.first += pt > 0.f ? pt * vs_mix.teacher : 0.f;
        mt.second += ps > 0.f ? ps * vs_mix.student : 0.f;
      }
    });
    mt = group_reduce(mt, group, c);
    res.kd = static_cast<float>(-kLn2 * (jw.teacher * mt.first + jw.student * mt.second));
    res.kl_s = static_cast<float>(-kLn2 * mt.second);
  }
  if constexpr (kDiv == KDFAST_TVD) {
    // Sweep 2: |p_t - p_s| needs both normalisers first.
    MixtureTerms mt = MixtureTerms::identity();
    sweep<true, false, kTransform>(row, lane, group, grad == nullptr, [&](int, const auto& s, const auto& t, SVec&) {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float ps = exp2f((s.get(k) - res.shift_s) * c.s - res.log_zs);
        const float pt = exp2f((t.get(k) - res.shift_t) * c.t - res.log_zt);
        const float half_tied = ps == pt ? 0.5f * ps : 0.f;
        mt.first += fabsf(pt - ps);
        mt.second += ps < pt ? ps : half_tied;
        mt.third += ps > pt ? ps : half_tied;
      }
    });
    mt = group_reduce(mt, group, c);
    res.kd = 0.5f * mt.first;
    res.mass_below = mt.second;
    res.mass_above = mt.third;
  }
  float ce = 0.f;
  if constexpr (kHard) {
    const double log_z1 = log2(double{st.z1});
    res.log_z1 = static_cast<float>(log_z1);
    ce = static_cast<float>(double{st.shift_s} - s_label + kLn2 * log_z1);
  }
  if (lane == 0) {
    a.kd_out[r] = res.kd;
    a.ce_out[r] = ce;
  }
  if (!grad) return;

  // The gradient: coef_kd (already over T) * d(kd)/d(s/T) + coef_ce * (softmax(s) - onehot),
  // with respect to z; with the transforms, times dz/dx for that with respect to the raw logits.
  const float student_weight = static_cast<float>(jw.student);
  sweep<!kTwoSweeps, true, kTransform>(row, lane, group, true, [&](int first, const auto& s, const auto& t, SVec& g) {
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float lps = (s.get(k) - res.shift_s) * c.s - res.log_zs;
      const float lpt = (t.get(k) - res.shift_t) * c.t - res.log_zt;
      const float ps = exp2f(lps);
      float d;
      if constexpr (kDiv == KDFAST_FORWARD_KL) {
        d = ps - exp2f(lpt);
      } else if constexpr (kDiv == KDFAST_REVERSE_KL) {
        d = ps > 0.f ? ps * (kLn2f * (lps - lpt) - res.kd) : 0.f;
      } else if constexpr (kDiv == KDFAST_TVD) {
        d = ps * tvd_factor(ps, exp2f(lpt), res.mass_below, res.mass_above);
      } else {
        // log p_s - log m = -(log m - log p_s)
        d = ps > 0.f ? student_weight * ps * (-kLn2f * jsd_log_ratios(lpt, lps, jw).student - res.kl_s) : 0.f;
      }
      float gk = coef_kd * d;
      if constexpr (kHard) {
        const float p1 = exp2f((s.get(k) - res.shift_s) * kLog2e - res.log_z1);
        gk += coef_ce * (first + k == label ? p1 - 1.f : p1);
      }
      if constexpr (kTransform) gk *= s.slope(k);
      g.set(k, gk);
    }
  });
}

template <typename S, typename T, int kDiv, bool kHard, bool kTransform>
__global__ void __launch_bounds__(kBlockThreads, 2) kd_forward_kernel(const KdCudaArgs a, const JsdWeights jw,
                                                                       int group) {
  const RowGroups rg(group);
  const Scales c{static_cast<float>(1.4426950408889634 / a.temperature),
                 static_cast<float>(1.4426950408889634 / a.teacher_temperature)};  // log2(e) / T
  float coef_kd = 0.f, coef_ce = 0.f;
  if (a.grad) {
    coef_kd = a.coefs[0] / a.temperature;  // d(s / T)/ds = 1 / T
    coef_ce = a.coefs[1];
  }
  const int64_t n_rows = a.batch * a.rows_per_batch;
  for (int64_t r = rg.first; r < n_rows; r += rg.stride) {
    kd_row<S, T, kDiv, kHard, kTransform>(a, jw, r, rg, c, coef_kd, coef_ce);
  }
}

template <typename X>
__global__ void __launch_bounds__(kBlockThreads) scale_grad_kernel(const KdCudaScaleArgs a, int group) {
  const float scale = *a.scale;
  if (scale == 1.f) return;  // the usual loss.backward(): nothing to do, nothing read
  const RowGroups rg(group);
  const int64_t n_rows = a.batch * a.rows_per_batch;
  for (int64_t r = rg.first; r < n_rows; r += rg.stride) {
    X* row = row_start(static_cast<X*>(a.grad), r, a.rows_per_batch, a.stride_b, a.stride_m);
    map_row<true>(row, static_cast<int>(a.vocab), rg.lane, rg.group, [scale](float x) { return x * scale; });
  }
}

struct Geometry {
  int group;
  unsigned blocks;
};

Geometry geometry(int64_t n_rows, int64_t vocab) {
  const int group = vocab <= kWarpRowMaxVocab ? kWarp : kBlockThreads;
  const int64_t per_block = kBlockThreads / group;
  const int64_t blocks = (n_rows + per_block - 1) / per_block;
  return {group, static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks)};
}

// Calls fn with a value of the element type that `dtype` codes.
template <typename Fn>
cudaError_t with_element_type(int dtype, Fn&& fn) {
  switch (dtype) {
    case KDFAST_FLOAT32: return fn(float{});
    case KDFAST_BFLOAT16: return fn(__nv_bfloat16{});
    case KDFAST_FLOAT16: return fn(__half{});
    default: return cudaErrorInvalidValue;
  }
}

// Calls fn with std::true_type or std::false_type: a runtime flag as a template argument.
template <typename Fn>
cudaError_t with_flag(bool flag, Fn&& fn) {
  return flag ? fn(std::true_type{}) : fn(std::false_type{});
}

template <typename Fn>
cudaError_t with_divergence(int divergence, bool hard, Fn&& fn) {
  auto with_hard = [&](auto div) {
    return with_flag(hard, [&](auto h) { return fn(div, h); });
  };
  switch (divergence) {
    case KDFAST_FORWARD_KL: return with_hard(std::integral_constant<int, KDFAST_FORWARD_KL>{});
    case KDFAST_REVERSE_KL: return with_hard(std::integral_constant<int, KDFAST_REVERSE_KL>{});
    case KDFAST_JSD: return with_hard(std::integral_constant<int, KDFAST_JSD>{});
    case KDFAST_TVD: return with_hard(std::integral_constant<int, KDFAST_TVD>{});
    default: return cudaErrorInvalidValue;
  }
}

bool valid_shape(int64_t batch, int64_t rows_per_batch, int64_t vocab) {
  return batch >= 0 && rows_per_batch >= 0 && vocab >= 1 && vocab <= std::numeric_limits<int>::max();
}

bool valid_transform(float scale, float cap) {
  return scale > 0.f && scale < kInf && cap >= 0.f && cap < kInf;  // NaN fails every comparison
}

bool transform_on(float scale, float cap) { return scale != 1.f || cap != 0.f; }

}  // namespace

extern "C" int kdfast_kd_forward_cuda(const KdCudaArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const KdCudaArgs& a = *args;
  if (!valid_shape(a.batch, a.rows_per_batch, a.vocab) || !(a.temperature > 0.f) || !(a.teacher_temperature > 0.f) ||
      !valid_transform(a.student_scale, a.student_cap) || !valid_transform(a.teacher_scale, a.teacher_cap)) {
    return cudaErrorInvalidValue;
  }
  const int64_t n_rows = a.batch * a.rows_per_batch;
  if (n_rows == 0) return cudaSuccess;
  if (!a.student.data || !a.teacher.data || !a.kd_out || !a.ce_out || (a.hard && !a.labels) ||
      (a.grad && !a.coefs) || (a.divergence == KDFAST_JSD && !(a.beta > 0.0 && a.beta < 1.0))) {
    return cudaErrorInvalidValue;
  }
  const JsdWeights jw = jsd_weights(a.divergence == KDFAST_JSD ? a.beta : 0.5);
  const Geometry geo = geometry(n_rows, a.vocab);
  // Chosen once per launch: without transforms, the kernels have no trace of them.
  const bool transform = transform_on(a.student_scale, a.student_cap) || transform_on(a.teacher_scale, a.teacher_cap);
  return with_element_type(a.student.dtype, [&](auto s_tag) {
    return with_element_type(a.teacher.dtype, [&](auto t_tag) {
      return with_divergence(a.divergence, a.hard != 0, [&](auto div, auto hard) {
        return with_flag(transform, [&](auto tr) {
          using S = decltype(s_tag);
          using T = decltype(t_tag);
          kd_forward_kernel<S, T, decltype(div)::value, decltype(hard)::value, decltype(tr)::value>
              <<<geo.blocks, kBlockThreads, 0, stream>>>(a, jw, geo.group);
          return cudaGetLastError();
        });
      });
    });
  });
}

extern "C" int kdfast_scale_grad_cuda(const KdCudaScaleArgs* args, cudaStream_t stream) {
  if (args == nullptr) return cudaErrorInvalidValue;
  const KdCudaScaleArgs& a = *args;
  if (!valid_shape(a.batch, a.rows_per_batch, a.vocab)) return cudaErrorInvalidValue;
  const int64_t n_rows = a.batch * a.rows_per_batch;
  if (n_rows == 0) return cudaSuccess;
  if (!a.grad || !a.scale) return cudaErrorInvalidValue;
  const Geometry geo = geometry(n_rows, a.vocab);
  return with_element_type(a.dtype, [&](auto tag) {
    scale_grad_kernel<decltype(tag)><<<geo.blocks, kBlockThreads, 0, stream>>>(a, geo.group);
    return cudaGetLastError();
  });
}
