// Fused sparse-teacher distillation loss for CPU tensors (kdfast.sparse): the student's softmax
// over the whole row against a teacher given at K ids by its log-probabilities (id -1: an empty
// slot), plus, for tail "bucket", one more category holding both sides' rest.
//
// One at::parallel_for over rows; a thread handles whole rows. Per row:
// 1. Sweep 1 walks the student row in blocks of kBlock entries, each loaded once and staged as
//    fp32 in L1, and stores e = exp((x - shift) / T) in a per-thread scratch, the shift being
//    the running maximum at that block (kept per block). Each block's exp-sum is summed in
//    float64 lanes, so that the ids' own e (read back from the scratch: the same floats) later
//    subtract from their block's sum without cancellation: the student's rest p_r comes from
//    the exp-sum of the complement however small it is.
// 2. The K ids: their logits and e, and the teacher's log-probabilities.
// 3. The K + 1 categories in float64: h_c = P_c * d(divergence)/dP_c (see _sparse_terms in
//    kdfast/backends/torch_fallback.py for the derivation of the gradient).
// 4. The gradient in one pass: every entry as a rest token, d_j = p_j (h_r / p_r - H), which is
//    e_j times a per-block constant; then the ids' (and the label's) entries are rewritten.
// Logit transforms of the student (softcap, logit_scale: LogitTransform) are applied as sweep 1
// stages each block, which it then always does; everything after sees the transformed logits,
// and the gradient is multiplied by dz/dx, staged then too.
// The Python layer (kdfast/backends/cpu_ext.py, kdfast/sparse.py) has validated the inputs;
// still, an id outside [-1, V) is never read through: its row becomes NaN.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "kd_binding_checks.h"
#include "kd_cpu_common.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace {

using namespace kdfast_cpu;  // NOLINT: the shared codes and vector helpers
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

enum Tail : int64_t { kBucket = 0, kRenorm = 1, kRaw = 2 };

struct Params {
  double inv_temperature, beta, mass_tolerance;
  int64_t divergence, tail, ignore_index, vocab, n_blocks, n_ids;
  double coef_kd;  // d(total loss)/d(row divergence) / T: d(s / T)/ds = 1 / T
  double coef_ce;  // d(total loss)/d(row cross-entropy)
  bool stream;     // streaming stores (where aligned): the gradient is not the student, which is in cache
  LogitTransform transform;  // the student's
};

// Sums float vectors in float64 lanes.
struct DoubleSum {
#if defined(CPU_CAPABILITY_AVX512)
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  void add(Vec v) {
    const __m512 f = v;
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
  }
  double sum() const { return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)); }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  void add(Vec v) {
    const __m256 f = v;
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
  }
  double sum() const {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, _mm256_add_pd(lo, hi));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  }
#else
  double lanes[kLanes] = {};
  void add(Vec v) {
    alignas(64) float f[kLanes];
    v.store(f);
    for (int64_t i = 0; i < kLanes; ++i) lanes[i] += f[i];
  }
  double sum() const {
    double s = 0;
    for (int64_t i = 0; i < kLanes; ++i) s += lanes[i];
    return s;
  }
#endif
};

// The maximum of a block of kBlock entries (NaN if any entry is NaN).
template <typename T>
float block_max(const T* x) {
  Vec vmax(-kInf);
  for (int64_t i = 0; i < kBlock; i += kLanes) {
    // Rows start at new pages, where the hardware prefetcher stalls: run ahead of it (as kd_cpu.cpp).
    __builtin_prefetch(reinterpret_cast<const char*>(x + i) + kPrefetchBytes);
    vmax = at::vec::maximum(vmax, load_float(x + i));
  }
  return hmax(vmax);
}

// Writes src[0:n] as fp32 into dst[0:kBlock], padded with -inf: the row's last, partial block.
template <typename T>
void stage_partial(const T* src, int64_t n, float* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  std::fill(dst + n, dst + kBlock, -kInf);
}

// TRANSFORM: writes the transformed src[0:n] as fp32 into dst[0:kBlock], padded with -inf, and
// dz/dx into slope (unless null).
template <typename T>
void stage_transformed(const T* src, int64_t n, float* dst, const LogitTransform& tr, float* slope) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    __builtin_prefetch(reinterpret_cast<const char*>(src + i) + kPrefetchBytes);
    const Vec x = load_float(src + i);
    if (slope) tr.slope(x).store(slope + i);
    tr.apply(x).store(dst + i);
  }
  if (i < n) {  // the row's last, partial vector
    alignas(64) float part[kLanes] = {};
    for (int64_t j = i; j < n; ++j) part[j - i] = static_cast<float>(src[j]);
    const Vec x = Vec::loadu(part);
    if (slope) tr.slope(x).store(slope + i);
    tr.apply(x).store(dst + i);
  }
  std::fill(dst + n, dst + kBlock, -kInf);  // the padding is no entry: not -cap
}

// Per-thread scratch: e (and e1 = exp(x - shift) at T = 1 for the hard labels) of the row, the
// shift of each block, its exp-sums, and the ids' logits. With logit transforms and a gradient,
// dz and dz_ids hold dz/dx of the row and of the ids (else they are empty).
struct Scratch {
  std::vector<float> e, e1, x_ids, dz, dz_ids;
  std::vector<double> h_ids, shift, z, z_ids, z1, scale;
  Scratch(const Params& p, bool hard, bool slopes)
      : e(p.n_blocks * kBlock), e1(hard ? p.n_blocks * kBlock : 0), x_ids(p.n_ids),
        dz(slopes ? p.n_blocks * kBlock : 0), dz_ids(slopes ? p.n_ids : 0), h_ids(p.n_ids), shift(p.n_blocks),
        z(p.n_blocks), z_ids(p.n_blocks), z1(p.n_blocks), scale(p.n_blocks) {}
};

// The exponentials of one block against its shift, into e (and e1), and their sums.
template <bool HARD, typename T>
void block_exps(const T* x, float shift, const Vec& inv_temp, float* e, float* e1, double& z, double& z1) {
  const Vec vshift(shift);
  DoubleSum sum;
  Vec sum1(0.f);
  for (int64_t i = 0; i < kBlock; i += kLanes) {
    const Vec d = load_float(x + i) - vshift;
    const Vec ei = (d * inv_temp).exp_u20();
    ei.store(e + i);
    sum.add(ei);
    if constexpr (HARD) {
      const Vec e1i = d.exp_u20();
      e1i.store(e1 + i);
      sum1 += e1i;
    }
  }
  z = sum.sum();
  z1 = hsum(sum1);
}

// Sweep 1; returns the row maximum (NaN for a row with NaN or +inf, -inf for a row all -inf).
// A block is read twice, the second time from L1 (staged in e when partial or transformed).
template <bool HARD, bool TRANSFORM, typename S>
float sweep(const S* s_row, Scratch& sc, const Params& p) {
  const Vec inv_temp(static_cast<float>(p.inv_temperature));
  float shift = 0;  // the running maximum; 0 while the row is all -inf so far
  bool seen = false;
  for (int64_t blk = 0; blk < p.n_blocks; ++blk) {
    const S* x = s_row + blk * kBlock;
    float* e = sc.e.data() + blk * kBlock;
    float* e1 = HARD ? sc.e1.data() + blk * kBlock : nullptr;
    const int64_t n = std::min(kBlock, p.vocab - blk * kBlock);
    const bool staged = TRANSFORM || n < kBlock;
    if constexpr (TRANSFORM) {
      stage_transformed(x, n, e, p.transform, sc.dz.empty() ? nullptr : sc.dz.data() + blk * kBlock);
    } else if (n < kBlock) {
      stage_partial(x, n, e);
    }
    const float max = staged ? block_max(e) : block_max(x);
    if (std::isnan(max) || max == kInf) return std::numeric_limits<float>::quiet_NaN();
    if (max != -kInf && (!seen || max > shift)) {
      shift = max;
      seen = true;
    }
    sc.shift[blk] = seen ? shift : -kInf;
    if (staged) {
      block_exps<HARD>(e, shift, inv_temp, e, e1, sc.z[blk], sc.z1[blk]);
    } else {
      block_exps<HARD>(x, shift, inv_temp, e, e1, sc.z[blk], sc.z1[blk]);
    }
  }
  return seen ? shift : -kInf;
}

// log(w e^d + 1 - w): accurate near d = 0, and no overflow for large d.
inline double log_mix_ratio(double d, double w) {
  return d <= 1 ? std::log1p(w * std::expm1(d)) : d + std::log(w + (1 - w) * std::exp(-d));
}

// (divergence term, h = P * d(divergence)/dP) of one category with student log-probability
// log_p and teacher log-probability log_q; 0 log 0 = 0.
inline std::pair<double, double> category(double log_p, double log_q, const Params& p) {
  const double pp = std::exp(log_p), q = std::exp(log_q);
  if (p.divergence == kForwardKL) return {q > 0 ? q * (log_q - log_p) : 0.0, -q};
  if (p.divergence == kReverseKL) {
    const double term = pp > 0 ? pp * (log_p - log_q) : 0.0;
    return {term, term};
  }
  // jsd: log p - log m and log q - log m with m = beta q + (1 - beta) p; where only one side
  // has mass, m is that side's share of it.
  const bool both = pp > 0 && q > 0;
  const double p_vs_mix = both ? -log_mix_ratio(log_q - log_p, p.beta) : -std::log1p(-p.beta);
  const double q_vs_mix = both ? -log_mix_ratio(log_p - log_q, 1 - p.beta) : -std::log(p.beta);
  const double h = pp > 0 ? (1 - p.beta) * pp * p_vs_mix : 0.0;
  return {(q > 0 ? p.beta * q * q_vs_mix : 0.0) + h, h};
}

template <typename S>
void fill_row(S* grad, int64_t n, double value) {
  std::fill(grad, grad + n, static_cast<S>(value));
}

struct RowOut {
  float kd, ce;
};

// One row that is not ignored; label_ok: no labels, or the row's label is in [0, V).
template <bool HARD, bool TRANSFORM, typename S, typename I, typename L>
RowOut sparse_row(const S* s_row, const I* ids, const L* logprobs, int64_t label, bool label_ok, S* grad,
                  Scratch& sc, const Params& p) {
  const double nan_ce = HARD ? kNaN : 0.0;
  if (!label_ok) {
    if (grad) fill_row(grad, p.vocab, kNaN);
    return {static_cast<float>(kNaN), static_cast<float>(nan_ce)};
  }
  for (int64_t k = 0; k < p.n_ids; ++k) {
    if (ids[k] < -1 || ids[k] >= p.vocab) {  // never read through such an id
      if (grad) fill_row(grad, p.vocab, kNaN);
      return {static_cast<float>(kNaN), static_cast<float>(nan_ce)};
    }
  }
  const float max = sweep<HARD, TRANSFORM>(s_row, sc, p);
  if (!(max > -kInf && max < kInf)) {
    if (grad) fill_row(grad, p.vocab, kNaN);
    return {static_cast<float>(kNaN), static_cast<float>(nan_ce)};
  }

  // Each block's sums against the row maximum.
  double z = 0, z1 = 0;
  for (int64_t blk = 0; blk < p.n_blocks; ++blk) {
    sc.scale[blk] = std::exp((sc.shift[blk] - max) * p.inv_temperature);
    z += sc.z[blk] * sc.scale[blk];
    if constexpr (HARD) z1 += sc.z1[blk] * std::exp(sc.shift[blk] - max);
    sc.z_ids[blk] = 0;
  }
  const double log_z = std::log(z), log_z1 = std::log(z1);

  // The ids: their e subtract from their block's sum; the teacher's mass.
  int64_t n_valid = 0;
  double teacher_mass = 0;
  bool label_is_id = false;
  for (int64_t k = 0; k < p.n_ids; ++k) {
    const int64_t id = ids[k];
    if (id < 0) continue;
    ++n_valid;
    sc.z_ids[id / kBlock] += sc.e[id];
    sc.x_ids[k] = static_cast<float>(s_row[id]);
    if constexpr (TRANSFORM) {
      if (grad) sc.dz_ids[k] = p.transform.slope(sc.x_ids[k]);
      sc.x_ids[k] = p.transform.apply(sc.x_ids[k]);
    }
    teacher_mass += std::exp(static_cast<double>(logprobs[k]));
    label_is_id |= id == label;
  }
  const bool has_rest = n_valid < p.vocab;  // ids covering the vocabulary leave no rest on either side
  double z_rest = 0;
  for (int64_t blk = 0; blk < p.n_blocks; ++blk) z_rest += std::max(sc.z[blk] - sc.z_ids[blk], 0.0) * sc.scale[blk];
  const double log_pr = has_rest ? std::log(z_rest) - log_z : -INFINITY;

  // The categories.
  const double log_mass_shift = p.tail == kRenorm ? (teacher_mass > 0 ? std::log(teacher_mass) : INFINITY) : 0.0;
  auto log_pk = [&](int64_t k) { return (static_cast<double>(sc.x_ids[k]) - max) * p.inv_temperature - log_z; };
  auto log_qk = [&](int64_t k) { return static_cast<double>(logprobs[k]) - log_mass_shift; };
  double kd = 0, h_total = 0, h_rest = 0;
  for (int64_t k = 0; k < p.n_ids; ++k) {
    if (ids[k] < 0) continue;
    const auto [term, h] = category(log_pk(k), log_qk(k), p);
    kd += term;
    h_total += h;
    sc.h_ids[k] = h;
  }
  if (p.tail == kBucket && has_rest) {
    const double rest = 1 - teacher_mass > p.mass_tolerance ? 1 - teacher_mass : 0.0;
    const auto [term, h] = category(log_pr, std::log(rest), p);
    kd += term;
    h_rest = h;
    h_total += h;
  }
  if (n_valid == 0) kd = h_total = h_rest = 0;  // no teacher mass: no divergence (its ids have none)
  // Read before an in-place gradient overwrites it.
  const float raw_label = HARD ? static_cast<float>(s_row[label]) : 0.f;
  const float x_label = HARD && TRANSFORM ? p.transform.apply(raw_label) : raw_label;
  const RowOut out{static_cast<float>(kd), HARD ? static_cast<float>(max + log_z1 - x_label) : 0.f};
  if (!grad) return out;

  // Every entry as a rest token: p_j (h_r / p_r - H) = e_j * scale * (h_r / z_rest - H / z).
  const bool stream = p.stream && reinterpret_cast<uintptr_t>(grad) % (kLanes * sizeof(S)) == 0;
  const double per_e = p.coef_kd * ((z_rest > 0 ? h_rest / z_rest : 0.0) - h_total / z);
  const Vec zero(0.f);
  for (int64_t blk = 0; blk < p.n_blocks; ++blk) {
    // p_j / p_r may exceed float's range as a factor while the product stays below 1: split it.
    const double factor = per_e * sc.scale[blk];
    const float f1 = static_cast<float>(std::abs(factor) < 1e30 ? factor : std::copysign(std::sqrt(std::abs(factor)), factor));
    const float f2 = static_cast<float>(std::abs(factor) < 1e30 ? 1.0 : std::sqrt(std::abs(factor)));
    const Vec v1(f1), v2(f2);
    const Vec hard_scale(HARD ? static_cast<float>(p.coef_ce * std::exp(sc.shift[blk] - max - log_z1)) : 0.f);
    const float* e = sc.e.data() + blk * kBlock;
    const float* e1 = HARD ? sc.e1.data() + blk * kBlock : nullptr;
    const int64_t begin = blk * kBlock, end = std::min(begin + kBlock, p.vocab);
    for (int64_t i = begin; i < end; i += kLanes) {
      Vec g = Vec::loadu(e + i - begin) * v1 * v2;
      if constexpr (HARD) g = g + Vec::loadu(e1 + i - begin) * hard_scale;
      if constexpr (TRANSFORM) g = g * Vec::loadu(sc.dz.data() + i);
      if (i + kLanes <= end) {
        store_grad(grad + i, g, stream);
      } else {  // the row's last, partial vector
        alignas(64) float part[kLanes];
        g.store(part);
        for (int64_t j = i; j < end; ++j) grad[j] = static_cast<S>(part[j - i]);
      }
    }
  }
  if (stream) stream_fence();  // order the streamed entries before the plain rewrites below

  // The ids' own entries: h_k - p_k H; and the label's -1.
  auto hard_part = [&](int64_t j, double x) {
    return HARD ? p.coef_ce * (std::exp(x - max - log_z1) - (j == label ? 1.0 : 0.0)) : 0.0;
  };
  for (int64_t k = 0; k < p.n_ids; ++k) {
    const int64_t id = ids[k];
    if (id < 0) continue;
    double g = p.coef_kd * (sc.h_ids[k] - std::exp(log_pk(k)) * h_total) + hard_part(id, sc.x_ids[k]);
    if constexpr (TRANSFORM) g *= sc.dz_ids[k];
    grad[id] = static_cast<S>(g);
  }
  if (HARD && !label_is_id) {
    double g = per_e * sc.scale[label / kBlock] * sc.e[label] + hard_part(label, x_label);
    if constexpr (TRANSFORM) g *= p.transform.slope(raw_label);
    grad[label] = static_cast<S>(g);
  }
  return out;
}


template <bool HARD, bool TRANSFORM, typename S, typename I, typename L>
void sparse_rows(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs, const int64_t* labels,
                 const c10::optional<at::Tensor>& grad, const Params& p, float* kd_out, float* ce_out) {
  const Rows<const S> s_rows(student);
  std::unique_ptr<Rows<S>> g_rows;
  if (grad) g_rows = std::make_unique<Rows<S>>(*grad);
  const I* ids_ptr = ids.data_ptr<I>();
  const L* lp_ptr = static_cast<const L*>(logprobs.data_ptr());
  const int64_t n_rows = student.size(0) * student.size(1);
  const int64_t grain = std::max<int64_t>(1, 65536 / (p.n_blocks * kBlock));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    Scratch sc(p, HARD, TRANSFORM && g_rows);
    for (int64_t r = begin; r < end; ++r) {
      S* grad_row = g_rows ? g_rows->row(r) : nullptr;
      const int64_t label = labels ? labels[r] : p.ignore_index;
      if (labels && label == p.ignore_index) {  // ignored rows are not read at all
        kd_out[r] = ce_out[r] = 0.f;
        if (grad_row) fill_row(grad_row, p.vocab, 0.0);
        continue;
      }
      const bool label_ok = !labels || (label >= 0 && label < p.vocab);
      const RowOut out = sparse_row<HARD, TRANSFORM>(s_rows.row(r), ids_ptr + r * p.n_ids, lp_ptr + r * p.n_ids,
                                                     label, label_ok, grad_row, sc, p);
      kd_out[r] = out.kd;
      ce_out[r] = out.ce;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_forward(const at::Tensor& student, const at::Tensor& ids,
                                                     const at::Tensor& logprobs, const c10::optional<at::Tensor>& labels,
                                                     const c10::optional<at::Tensor>& grad, const at::Tensor& coefs,
                                                     double temperature, int64_t divergence, double beta, int64_t tail,
                                                     double mass_tolerance, int64_t ignore_index, bool hard,
                                                     double student_scale, double student_cap) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor");
  // The dense loss's checks of the student, labels, grad and coefs (the student stands in for its teacher).
  const int64_t n_rows = kdfast::check_forward_args(student, student, labels, grad, coefs, hard);
  TORCH_CHECK(ids.device() == student.device() && ids.dim() == 2 && ids.size(0) == n_rows && ids.size(1) >= 1 &&
                  ids.is_contiguous() && (ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt),
              "ids must be a contiguous int64 or int32 (rows, K) tensor on the student's device, K >= 1");
  TORCH_CHECK(logprobs.device() == student.device() && logprobs.sizes() == ids.sizes() && logprobs.is_contiguous(),
              "logprobs must be a contiguous tensor of the ids' shape on the student's device");
  TORCH_CHECK(divergence >= kForwardKL && divergence <= kJSD, "divergence code must be 0, 1 or 2, got ", divergence);
  TORCH_CHECK(tail == kBucket || ((tail == kRenorm || tail == kRaw) && divergence == kForwardKL),
              "tail code must be 0 (bucket), or 1 / 2 (renorm / raw) with forward KL; got ", tail);

  Params p{};
  p.inv_temperature = 1.0 / temperature;
  p.beta = beta;
  p.mass_tolerance = mass_tolerance;
  p.divergence = divergence;
  p.tail = tail;
  p.ignore_index = ignore_index;
  p.vocab = student.size(2);
  p.n_blocks = (p.vocab + kBlock - 1) / kBlock;
  p.n_ids = ids.size(1);
  const at::Tensor coefs_f = coefs.to(at::kFloat).contiguous();
  p.coef_kd = static_cast<double>(coefs_f.data_ptr<float>()[0]) * p.inv_temperature;
  p.coef_ce = coefs_f.data_ptr<float>()[1];
  p.stream = grad && !grad->is_alias_of(student);
  p.transform = LogitTransform(student_scale, student_cap);

  auto kd_out = at::empty({n_rows}, student.options().dtype(at::kFloat));
  auto ce_out = at::empty({n_rows}, student.options().dtype(at::kFloat));
  const int64_t* label_ptr = labels ? labels->data_ptr<int64_t>() : nullptr;
  dispatch_float(student.scalar_type(), "student_logits", [&](auto s_tag) {
    dispatch_float(logprobs.scalar_type(), "teacher_logprobs", [&](auto l_tag) {
      auto run = [&](auto i_tag, auto hard_tag) {
        dispatch_bool(p.transform.on(), [&](auto transform_tag) {
          sparse_rows<decltype(hard_tag)::value, decltype(transform_tag)::value, decltype(s_tag), decltype(i_tag),
                      decltype(l_tag)>(student, ids, logprobs, label_ptr, grad, p, kd_out.data_ptr<float>(),
                                       ce_out.data_ptr<float>());
        });
      };
      auto with_hard = [&](auto i_tag) {
        if (hard) {
          run(i_tag, std::true_type{});
        } else {
          run(i_tag, std::false_type{});
        }
      };
      if (ids.scalar_type() == at::kLong) {
        with_hard(int64_t{});
      } else {
        with_hard(int32_t{});
      }
    });
  });
  return {kd_out, ce_out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdfast: fused sparse-teacher distillation loss, CPU kernel";
  // Checked against kdfast.backends' DIVERGENCE_CODES and TAIL_CODES when the extension loads.
  m.attr("DIVERGENCE_CODES") = divergence_codes();
  py::dict tails;
  tails["bucket"] = static_cast<int64_t>(kBucket);
  tails["renorm"] = static_cast<int64_t>(kRenorm);
  tails["raw"] = static_cast<int64_t>(kRaw);
  m.attr("TAIL_CODES") = tails;
  m.def("sparse_kd_forward", &sparse_kd_forward,
        "Per-row divergence and cross-entropy against a sparse teacher, and optionally the weighted gradient",
        py::arg("student"), py::arg("ids"), py::arg("logprobs"), py::arg("labels"), py::arg("grad"), py::arg("coefs"),
        py::arg("temperature"), py::arg("divergence"), py::arg("beta"), py::arg("tail"), py::arg("mass_tolerance"),
        py::arg("ignore_index"), py::arg("hard"), py::arg("student_scale") = 1.0, py::arg("student_cap") = 0.0,
        py::call_guard<py::gil_scoped_release>());
}
