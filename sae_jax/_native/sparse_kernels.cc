// CPU kernels for the TopK sparse decoder (sae_jax/sparse.py), as XLA FFI custom calls.
//
// XLA:CPU's TopK is a single-threaded partial sort over an index array and its row gathers and
// scatter-adds run far below the machine's GEMM rate; these kernels do the same work in one pass
// over each row, on every core (sae_jax/native.py compiles this file on first use).
//
// Every array may carry leading "cell" dimensions (a vmapped group); an input whose leading
// dimension is 1 where the output's is not is shared by every cell (vmap_method="expand_dims").
//
//   sae_topk        pre (.., N, M), bias (.., P, M)     -> v (.., N, K), i (.., N, K)
//                   per row n the K largest entries of pre_n + bias_{n mod P}, in no particular
//                   order; ties: the lower index wins (lax.top_k's choice); NaN above +inf
//   sae_batch_topk  pre (B, C, M), bias (C, M); n -> v (C, R, J), i (C, R, J), s (C, R), t (C, 1)
//                   per cell c the n largest entries of the (B, M) matrix pre[:, c] + bias_c
//                   (ties: the lower flat index),
//                   by sample: sample b's c_b entries (latent order) fill ceil(c_b / J)
//                   consecutive rows of J slots, samples in order; s_r the sample of row r; slots
//                   and rows past them 0; t the n-th largest value (R >= ceil(n / J) + B)
//   sae_gather_sum  w (.., N, J), T (.., S, D), i (.., N, J) -> out (.., N, D)
//                   out_n = sum_j w_nj T[i_nj] (summed in slot order j)
//   sae_dots        r (.., N, D), T (.., S, D), i (.., N, J) -> out (.., N, J)
//                   out_nj = r_n . T[i_nj]
//   sae_scatter     w (.., N, J), r (.., N, D), i (.., N, J) -> out (.., L, D), col (.., L)
//                   out_l = sum_{(n,j): i_nj = l} w_nj r_n,  col_l = sum_{(n,j): i_nj = l} w_nj
//                   (entries summed in increasing (n, j): the result does not depend on threads)
//   sae_decode_err  w (.., N, J), T (.., S, D), i (.., N, J), t (.., N, D)
//                   -> e (.., N, D), r (.., N, J), sq (.., N, 1)
//                   e_n = sum_j w_nj T[i_nj] - t_n,  r_nj = e_n . T[i_nj],  sq_n = |e_n|^2
//   sae_decode_err_scaled  the same with scale (.., S): the atoms are the rows scale_s T[s]
//                   (e_n = sum_j w_nj scale_{i_nj} T[i_nj] - t_n, r_nj = scale_{i_nj} e_n . T[i_nj])
//   sae_scatter_unit  w, r, i as sae_scatter, D (.., L, D), n (.., L, 1); eps -> out, col: out_l
//                   as sae_scatter's, then sae_unit_rows_vjp's dL/dD_l for cotangent out_l
//   sae_gather_sum_bf16, sae_dots_bf16, sae_scatter_bf16, sae_decode_err_bf16 and the bf16 twins
//                   of the last two: the same with T and r (decode_err: T) bfloat16, each element
//                   widened to float32 as it is read (float32 sums and outputs)
//
// Indices outside [0, S) (gathers) or [0, L) (scatter) are clipped (gathers) or dropped (scatter).
//
// The decoder's unit-norm atoms (sae.unit_rows) and their VJP, one pass over each row:
//   sae_unit_rows      w (.., D); eps -> a (.., D), n (.., 1)
//                      s = max_i |w_i| (1 where it is 0), n = s sqrt(sum_i (w_i / s)^2) + eps, a = w / n
//   sae_row_norms      w (.., D); eps -> n (.., 1), sae_unit_rows' n alone
//   sae_unit_rows_vjp  w (.., D), n (.., 1), g (.., D); eps -> dw (.., D)
//                      dw = g / n - (g . w) / (n^2 (n - eps)) w   (the second term 0 where n = eps)
//
// And Adam's step (optax.scale_by_adam, then p - lr u) with the grid's divergence rule, in two passes
// over each parameter instead of XLA's many (one fusion per moment, per select, per finite check):
//   sae_adam_check  p, g, m, v (.., P), coef (.., 9); rank (of P) -> ok (.., 1)
//                   ok = 1 if every g and every p' = p - lr u is finite, else 0, where
//                   m' = c1 g + b1 m,  v' = c2 g^2 + b2 v,  u = (m' r1) / (sqrt(v' r2 + eps_root) + eps)
//                   and coef = (b1, c1, b2, c2, r1, r2, eps, eps_root, lr) (c = 1 - b, r = 1/(1 - b^t))
//   sae_adam_apply  p, g, m, v (.., P), coef (.., 9), keep (.., 1); rank -> p', m', v' (.., P), in place:
//                   (p', m', v') as above, or (p, m, v) unchanged where keep != 0
//                   (rounded as XLA:CPU rounds optax's step: the division by 1 - b^t as a product
//                   with its reciprocal, c1 g + (b1 m), c2 g^2 + (b2 v) and p - lr u as fmas)

#include <sched.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

int Threads() {
  static const int n = [] {
    if (const char* e = std::getenv("SAE_JAX_NATIVE_THREADS"); e && std::atoi(e) > 0)
      return std::atoi(e);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return n;
}

// A thread is started only for at least this much work (in elements read or updated): starting
// and joining one costs tens of microseconds, more than a small call's whole work. (A TopK grid
// at batch 64 with one cell per group ran 1.25x faster on one thread than on two without it.)
constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;

// f(begin, end) over [0, n), split into one contiguous range per thread; each thread gets at
// least min_per_thread items and kMinWorkPerThread work (an item's is work_per_item).
template <class F>
void ParallelFor(int64_t n, int64_t min_per_thread, int64_t work_per_item, F&& f) {
  const int64_t w = std::max<int64_t>(1, work_per_item);
  min_per_thread = std::max<int64_t>({int64_t{1}, min_per_thread, (kMinWorkPerThread + w - 1) / w});
  int64_t t = std::min<int64_t>(Threads(), std::max<int64_t>(1, n / min_per_thread));
  if (t <= 1) {
    f(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < t; ++w) pool.emplace_back([&f, n, t, w] { f(n * w / t, n * (w + 1) / t); });
  f(int64_t{0}, n / t);
  for (auto& th : pool) th.join();
}

// The cell layout of one call: the output's leading dimensions, and for each input the offset
// (in elements) of the matrix a given output cell reads.
struct Cells {
  std::vector<int64_t> lead;  // output leading dims
  int64_t count = 1;

  explicit Cells(ffi::Span<const int64_t> out_dims, int trailing) {
    for (size_t a = 0; a + trailing < out_dims.size(); ++a) lead.push_back(out_dims[a]);
    for (int64_t d : lead) count *= d;
  }
  // Element offset of cell c's matrix in an input of dims `dims` (its leading dims are the
  // output's or 1), where one matrix holds `inner` elements.
  int64_t Offset(int64_t c, ffi::Span<const int64_t> dims, int trailing, int64_t inner) const {
    int64_t rank_lead = static_cast<int64_t>(dims.size()) - trailing;
    int64_t off = 0, stride = inner;
    for (int64_t a = static_cast<int64_t>(lead.size()) - 1, b = rank_lead - 1; a >= 0; --a, --b) {
      int64_t coord = c % lead[a];
      c /= lead[a];
      if (b < 0) continue;
      if (dims[b] != 1) off += coord * stride;
      stride *= dims[b];
    }
    return off;
  }
};

int64_t Dim(ffi::Span<const int64_t> d, int from_end) { return d[d.size() - from_end]; }

// Whether an input of dims `in` (`trailing` matrix dims) broadcasts against the output's cells:
// the same rank, each leading dim 1 or the output's.
bool Fits(const Cells& cells, ffi::Span<const int64_t> in, int trailing) {
  if (in.size() != cells.lead.size() + trailing) return false;
  for (size_t a = 0; a < cells.lead.size(); ++a)
    if (in[a] != 1 && in[a] != cells.lead[a]) return false;
  return true;
}

constexpr int64_t kMaxEntries = (int64_t{1} << 31) - 64;  // int32 offsets in the scratch arrays

// f(), with any C++ exception (no memory, no thread) returned to XLA as an error.
template <class F>
ffi::Error Guard(const char* name, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  }
}

// Rows come as float32 or as bfloat16 (their bits, uint16_t): a bfloat16 row is widened to float32
// as it is read, so the sums are float32 either way and the bfloat16 kernels move half the bytes.
inline float ToF32(float v) { return v; }
inline float ToF32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ----------------------------------------------------------------------------- vectors
// F16: 16 float lanes, as one AVX-512 register, two AVX2 ones, or an array of 16 (any other CPU),
// so that each kernel is written once. Every operation is the IEEE one per lane (Fma: a b + c and
// Fnma: c - a b rounded once), so results do not depend on which of the three runs. kTile: how
// many F16 accumulators a row tile holds in registers (AVX-512 has 32 of them, AVX2 16 of half the
// width); kSlots: how many dot products DotsRow accumulates side by side.
#define SAE_INLINE inline __attribute__((always_inline))
#if defined(__AVX512F__)
struct F16 {
  __m512 v;
  static SAE_INLINE F16 Zero() { return {_mm512_setzero_ps()}; }
  static SAE_INLINE F16 Set(float a) { return {_mm512_set1_ps(a)}; }
  static SAE_INLINE F16 Load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static SAE_INLINE F16 Load(const uint16_t* p) {  // bfloat16 bits, widened
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  SAE_INLINE void Store(float* p) const { _mm512_storeu_ps(p, v); }
};
SAE_INLINE F16 Fma(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
SAE_INLINE F16 Fnma(F16 a, F16 b, F16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
SAE_INLINE F16 operator+(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
SAE_INLINE F16 operator-(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
SAE_INLINE F16 operator*(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
SAE_INLINE F16 operator/(F16 a, F16 b) { return {_mm512_div_ps(a.v, b.v)}; }
SAE_INLINE F16 Sqrt(F16 a) { return {_mm512_sqrt_ps(a.v)}; }
SAE_INLINE F16 Max(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }
SAE_INLINE F16 Abs(F16 a) { return {_mm512_abs_ps(a.v)}; }
// bit l: !(x_l < t) (NaN included)
SAE_INLINE uint32_t NotBelow(F16 x, float t) {
  return _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(t), _CMP_NLT_UQ);
}
// The sum of 8 lanes: (l, l + 4) pairs, then (l, l + 2), then (0, 1).
SAE_INLINE float Sum8(__m256 h) {
  const __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps(y, y, 1)));
}
// The sum of the 16 lanes as a tree: (l, l + 8) pairs first, then as Sum8.
SAE_INLINE float HSum(F16 a) {
  return Sum8(_mm256_add_ps(_mm512_castps512_ps256(a.v),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1))));
}
constexpr int kTile = 16, kSlots = 8;
#elif defined(__AVX2__) && defined(__FMA__)
struct F16 {
  __m256 lo, hi;
  static SAE_INLINE F16 Zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static SAE_INLINE F16 Set(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
  static SAE_INLINE F16 Load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static SAE_INLINE F16 Load(const uint16_t* p) {
    auto widen = [](const uint16_t* q) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    };
    return {widen(p), widen(p + 8)};
  }
  SAE_INLINE void Store(float* p) const {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
};
SAE_INLINE F16 Fma(F16 a, F16 b, F16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
SAE_INLINE F16 Fnma(F16 a, F16 b, F16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
SAE_INLINE F16 operator+(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
SAE_INLINE F16 operator-(F16 a, F16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
SAE_INLINE F16 operator*(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
SAE_INLINE F16 operator/(F16 a, F16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
SAE_INLINE F16 Sqrt(F16 a) { return {_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
SAE_INLINE F16 Max(F16 a, F16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
SAE_INLINE F16 Abs(F16 a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_andnot_ps(sign, a.lo), _mm256_andnot_ps(sign, a.hi)};
}
SAE_INLINE uint32_t NotBelow(F16 x, float t) {
  const __m256 tv = _mm256_set1_ps(t);
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x.lo, tv, _CMP_NLT_UQ))) |
         (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x.hi, tv, _CMP_NLT_UQ))) << 8);
}
SAE_INLINE float Sum8(__m256 h) {
  const __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps(y, y, 1)));
}
SAE_INLINE float HSum(F16 a) { return Sum8(_mm256_add_ps(a.lo, a.hi)); }
constexpr int kTile = 4, kSlots = 4;
#else
struct F16 {
  float x[16];
  static SAE_INLINE F16 Zero() { return Set(0.0f); }
  static SAE_INLINE F16 Set(float a) {
    F16 r;
    for (float& v : r.x) v = a;
    return r;
  }
  template <class T>
  static SAE_INLINE F16 Load(const T* p) {
    F16 r;
    for (int l = 0; l < 16; ++l) r.x[l] = ToF32(p[l]);
    return r;
  }
  SAE_INLINE void Store(float* p) const { std::memcpy(p, x, sizeof x); }
};
template <class F>
SAE_INLINE F16 Lanes(F&& f) {
  F16 r;
  for (int l = 0; l < 16; ++l) r.x[l] = f(l);
  return r;
}
SAE_INLINE F16 Fma(F16 a, F16 b, F16 c) { return Lanes([&](int l) { return std::fma(a.x[l], b.x[l], c.x[l]); }); }
SAE_INLINE F16 Fnma(F16 a, F16 b, F16 c) { return Lanes([&](int l) { return std::fma(-a.x[l], b.x[l], c.x[l]); }); }
SAE_INLINE F16 operator+(F16 a, F16 b) { return Lanes([&](int l) { return a.x[l] + b.x[l]; }); }
SAE_INLINE F16 operator-(F16 a, F16 b) { return Lanes([&](int l) { return a.x[l] - b.x[l]; }); }
SAE_INLINE F16 operator*(F16 a, F16 b) { return Lanes([&](int l) { return a.x[l] * b.x[l]; }); }
SAE_INLINE F16 operator/(F16 a, F16 b) { return Lanes([&](int l) { return a.x[l] / b.x[l]; }); }
SAE_INLINE F16 Sqrt(F16 a) { return Lanes([&](int l) { return std::sqrt(a.x[l]); }); }
SAE_INLINE F16 Max(F16 a, F16 b) { return Lanes([&](int l) { return a.x[l] > b.x[l] ? a.x[l] : b.x[l]; }); }
SAE_INLINE F16 Abs(F16 a) { return Lanes([&](int l) { return std::fabs(a.x[l]); }); }
SAE_INLINE uint32_t NotBelow(F16 x, float t) {
  uint32_t m = 0;
  for (int l = 0; l < 16; ++l) m |= static_cast<uint32_t>(!(x.x[l] < t)) << l;
  return m;
}
SAE_INLINE float HSum(F16 a) {
  float x[16];
  a.Store(x);
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) x[l] += x[l + w];
  return x[0];
}
constexpr int kTile = 4, kSlots = 4;
#endif
constexpr int64_t kLanes = 16;

// `tail` plus the lanes' sum (HSum: the same tree on every CPU); the lanes' maximum.
SAE_INLINE float SumLanes(F16 a, float tail) { return tail + HSum(a); }
SAE_INLINE float MaxLanes(F16 a, float tail) {
  float x[16];
  a.Store(x);
  for (float v : x) tail = v > tail ? v : tail;
  return tail;
}

// Whether every lane is 0 (false for NaN).
SAE_INLINE bool AllZero(F16 a) {
  float x[kLanes];
  a.Store(x);
  bool z = true;
  for (float v : x) z &= v == 0.0f;
  return z;
}

// ----------------------------------------------------------------------------- top-k
// An entry as one integer key: larger key = better (the larger value; on equal values, the lower
// index), so that selection and sorting compare integers. Values map to unsigned integers in
// IEEE total order (negative ones bit-flipped).
inline uint64_t Key(float v, int64_t i) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;
  return (static_cast<uint64_t>(u) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}
inline int32_t KeyIndex(uint64_t key) { return static_cast<int32_t>(0xFFFFFFFFu - (key & 0xFFFFFFFFu)); }
inline float KeyValue(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u ^= (u >> 31) ? 0x80000000u : 0xFFFFFFFFu;  // back from the key's order to float bits
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

#if !defined(__AVX512F__) && defined(__AVX2__)
// AVX2 has no compress: a vpermd by a table row moves the lanes a mask selects to the front, in
// order. perm32[m]: the 32-bit lanes set in the 8-bit mask m; perm64[m]: the 64-bit lanes set in
// the 4-bit mask m (as pairs of 32-bit lanes).
struct CompressTables {
  alignas(32) int32_t perm32[256][8] = {};
  alignas(32) int32_t perm64[16][8] = {};
  CompressTables() {
    for (int m = 0; m < 256; ++m)
      for (int l = 0, c = 0; l < 8; ++l)
        if (m >> l & 1) perm32[m][c++] = l;
    for (int m = 0; m < 16; ++m)
      for (int l = 0, c = 0; l < 4; ++l)
        if (m >> l & 1) {
          perm64[m][c++] = 2 * l;
          perm64[m][c++] = 2 * l + 1;
        }
  }
};
const CompressTables kCompress;
inline __m256i Perm(const int32_t* row) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(row)); }
#endif

// Moves a's n keys greater than p to its front, the rest (p among them) after them, and returns
// how many are greater. tmp: room for n + 8 keys.
int64_t Partition(uint64_t* a, int64_t n, uint64_t p, uint64_t* tmp) {
  int64_t g = 0, l = 0, q = 0;
#ifdef __AVX512F__
  const __m512i pv = _mm512_set1_epi64(static_cast<long long>(p));
  for (; q + 8 <= n; q += 8) {  // compress in registers, then full stores (a: only read slots)
    const __m512i v = _mm512_loadu_si512(a + q);
    const __mmask8 gt = _mm512_cmpgt_epu64_mask(v, pv);
    _mm512_storeu_si512(a + g, _mm512_maskz_compress_epi64(gt, v));
    _mm512_storeu_si512(tmp + l, _mm512_maskz_compress_epi64(static_cast<__mmask8>(~gt), v));
    const int c = __builtin_popcount(gt);
    g += c;
    l += 8 - c;
  }
#elif defined(__AVX2__)
  const __m256i sign = _mm256_set1_epi64x(INT64_MIN);  // unsigned order as signed, sign flipped
  const __m256i pv = _mm256_xor_si256(_mm256_set1_epi64x(static_cast<long long>(p)), sign);
  for (; q + 4 <= n; q += 4) {  // the same with 4 keys and a table's permutation
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + q));
    const int gt = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(_mm256_xor_si256(v, sign), pv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + g), _mm256_permutevar8x32_epi32(v, Perm(kCompress.perm64[gt])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp + l),
                        _mm256_permutevar8x32_epi32(v, Perm(kCompress.perm64[~gt & 15])));
    const int c = __builtin_popcount(gt);
    g += c;
    l += 4 - c;
  }
#endif
  for (; q < n; ++q) {  // both stores, no branch (which the data would mispredict half the time)
    const uint64_t v = a[q];
    const int64_t gt = v > p;
    a[g] = v;  // g <= q: a slot already read
    tmp[l] = v;
    g += gt;
    l += 1 - gt;
  }
  std::memcpy(a + g, tmp, l * sizeof(uint64_t));
  return g;
}

// Moves the k largest of a's n distinct keys to its front, in no particular order (a quickselect
// on a median of three; each partition in vector registers). It replaced std::nth_element and a
// heap, whose branches took about 40% of the top-k's time: the top-k of a (4096, 2, 4096) matrix
// went from about 29 to 20 ms at k 128 (interleaved in one process on the AMD EPYC). tmp: room
// for n + 8 keys.
void SelectLargest(uint64_t* a, int64_t n, int64_t k, uint64_t* tmp) {
  int64_t lo = 0, hi = n;  // the answer: a[0, lo) and the k - lo largest of a[lo, hi)
  while (hi - lo > 16 && lo < k) {
    const uint64_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
    const uint64_t p = std::max(std::min(x, y), std::min(std::max(x, y), z));
    const int64_t g = Partition(a + lo, hi - lo, p, tmp);
    if (lo + g >= k) {
      hi = lo + g;
    } else {  // all g are in, and so is p, the largest of the rest
      lo += g;
      std::swap(a[lo], *std::find(a + lo, a + hi, p));
      ++lo;
    }
  }
  if (lo < k) std::sort(a + lo, a + hi, std::greater<uint64_t>());
}

// The indices q with x[q] not below t (NaN included), in increasing order, written to out (room
// for m + 16); their count.
int64_t Candidates(const float* x, int64_t m, float t, int32_t* out) {
  int64_t c = 0, q = 0;
#ifdef __AVX512F__
  const __m512 tv = _mm512_set1_ps(t);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; q + 16 <= m; q += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + q), tv, _CMP_NLT_UQ);
    if (hit) {
      // compress in a register, then a full store (out has 16 spare slots): the memory form
      // of vpcompressd is microcoded and slow on AMD Zen 4
      _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi32(hit, iv));
      c += __builtin_popcount(hit);
    }
    iv = _mm512_add_epi32(iv, step);
  }
#elif defined(__AVX2__)
  const __m256 tv = _mm256_set1_ps(t);
  __m256i iv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  for (; q + 8 <= m; q += 8) {  // every block stored, no branch: 1 in 16 entries is a candidate
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + q), tv, _CMP_NLT_UQ));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c),
                        _mm256_permutevar8x32_epi32(iv, Perm(kCompress.perm32[hit])));
    c += __builtin_popcount(hit);
    iv = _mm256_add_epi32(iv, step);
  }
#else
  for (; q + 16 <= m; q += 16)  // most blocks hold no candidate
    for (uint32_t hit = NotBelow(F16::Load(x + q), t); hit; hit &= hit - 1)
      out[c++] = static_cast<int32_t>(q + __builtin_ctz(hit));
#endif
  for (; q < m; ++q) {
    out[c] = static_cast<int32_t>(q);
    c += !(x[q] < t);
  }
  return c;
}

// Scratch space of one thread.
struct TopkScratch {
  std::vector<float> row;
  std::vector<int32_t> cand;
  std::vector<uint64_t> keys, tmp;
};

// A threshold for the k best of m entries x[0, m) (x: a pointer, or a function of the index):
// the r-th largest of a strided sample of them, r chosen so that about (over4 / 4) k of the m
// reach it; -inf (every entry) where the sample would be under 8 per pick. The sample holds
// about 4k entries, at most max_samples.
template <class Value>
float SampledThreshold(Value x, int64_t m, int64_t k, TopkScratch& s, int64_t over4 = 8,
                       int64_t max_samples = INT64_MAX) {
  const int64_t stride = std::max(m / (4 * k), m / std::max<int64_t>(1, max_samples));
  if (stride < 2) return -INFINITY;
  const int64_t ns = m / stride;
  const int64_t r = std::min<int64_t>(ns - 1, over4 * k * ns / (4 * m));
  s.keys.resize(ns);
  s.tmp.resize(ns + 8);
  for (int64_t q = 0; q < ns; ++q) {
    if constexpr (std::is_pointer_v<Value>) {
      s.keys[q] = Key(x[q * stride], q);
    } else {
      s.keys[q] = Key(x(q * stride), q);
    }
  }
  SelectLargest(s.keys.data(), ns, r + 1, s.tmp.data());
  return KeyValue(*std::min_element(s.keys.begin(), s.keys.begin() + r + 1));
}

// Whether at least k of the c candidates x[cand[q]] are at or above t in key order (then the k
// best entries are all candidates: an entry left out is below t).
bool EnoughCandidates(const float* x, const int32_t* cand, int64_t c, float t, int64_t k) {
  const uint64_t tkey = Key(t, 0) & ~uint64_t{0xFFFFFFFFu};
  int64_t above = 0;
  for (int64_t q = 0; q < c; ++q) above += Key(x[cand[q]], 0) >= tkey;
  return above >= k;
}

// The k best of a row (pre + bias) in the order of `Key`: every entry not below a sampled
// threshold t (`SampledThreshold`; NaN included) as a candidate; an exact selection among them.
// Exact: the selection goes ahead only when at least k candidates are at or above t in key
// order; otherwise (an unlucky sample) every entry is a candidate.
void TopkRow(const float* pre, const float* bias, int64_t m, int64_t k, TopkScratch& s, float* ov,
             int32_t* oi) {
  s.row.resize(m);
  float* x = s.row.data();
  for (int64_t q = 0; q < m; ++q) x[q] = pre[q] + bias[q];
  int64_t c = m;
  s.cand.resize(m + 16);
  if (const float t = SampledThreshold(static_cast<const float*>(x), m, k, s); t != -INFINITY) {
    c = Candidates(x, m, t, s.cand.data());
    if (!EnoughCandidates(x, s.cand.data(), c, t, k)) c = m;
  }
  s.keys.resize(c);
  for (int64_t q = 0; q < c; ++q) {
    const int64_t i = c == m ? q : s.cand[q];
    s.keys[q] = Key(x[i], i);
  }
  s.tmp.resize(c + 8);
  if (c > k) SelectLargest(s.keys.data(), c, k, s.tmp.data());  // the k best first, unordered
  for (int64_t q = 0; q < k; ++q) {
    oi[q] = KeyIndex(s.keys[q]);
    ov[q] = x[oi[q]];
  }
}

ffi::Error TopkBody(ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> bias,
                    ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto pd = pre.dimensions(), bd = bias.dimensions(), vd = vals->dimensions();
  if (pd.size() < 2 || pd.size() != vd.size() || bd.size() != pd.size())
    return ffi::Error::InvalidArgument("sae_topk: ranks");
  const int64_t m = Dim(pd, 1), k = Dim(vd, 1), n = Dim(pd, 2), nb = Dim(bd, 2);
  Cells cells(vd, 2);
  if (k < 1 || k > m || Dim(bd, 1) != m || nb < 1 || Dim(vd, 2) != n || !Fits(cells, pd, 2) ||
      !Fits(cells, bd, 2) || m > kMaxEntries)
    return ffi::Error::InvalidArgument("sae_topk: shapes");
  const float *X = pre.typed_data(), *Bs = bias.typed_data();
  float* ov = vals->typed_data();
  int32_t* oi = idx->typed_data();
  ParallelFor(cells.count * n, 16, m, [&](int64_t a, int64_t b) {
    TopkScratch scratch;
    for (int64_t r = a; r < b; ++r) {
      const int64_t c = r / n, row = r % n;
      TopkRow(X + cells.Offset(c, pd, 2, n * m) + row * m,
              Bs + cells.Offset(c, bd, 2, nb * m) + (row % nb) * m, m, k, scratch, ov + r * k,
              oi + r * k);
    }
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- batch top-k
// The n best entries of one cell's (B, M) matrix x_bj = pre[b * stride + j] + bias_j in the order
// of `Key` (flat index b M + j: ties go to the lower one, as lax.top_k's over the flattened
// matrix), laid out by sample: sample b's entries, in increasing latent order, fill ceil(c_b / J)
// consecutive rows of J slots, the rows of sample 0 first; slots and rows past them hold value 0,
// latent 0, sample 0. One sampled threshold for the whole matrix, candidates per sample on every
// core, an exact selection among them (as `TopkRow`'s), then each sample's rows written on every
// core.
void BatchTopkCell(const float* pre, int64_t stride, const float* bias, int64_t b, int64_t m,
                   int64_t n, int64_t rows, int64_t J, float* ov, int32_t* oi, int32_t* os,
                   float* othr) {
  TopkScratch s;
  auto value = [&](int64_t q) { return pre[q / m * stride + q % m] + bias[q % m]; };
  // about 1.25 n candidates: a sample of 2^16 entries places t to about 2% of n at a training
  // step's n (k B of k m B, k <= m / 8)
  const float t = SampledThreshold(value, b * m, n, s, 5, int64_t{1} << 16);
  std::vector<std::vector<int32_t>> cand(b);
  std::vector<std::vector<float>> cval(b);
  auto gather = [&](float thr) {
    ParallelFor(b, 1, m, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(m);
      std::vector<int32_t> buf(m + 16);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j = 0; j < m; ++j) row[j] = pre[r * stride + j] + bias[j];
        const int64_t c = Candidates(row.data(), m, thr, buf.data());
        cand[r].assign(buf.begin(), buf.begin() + c);
        cval[r].resize(c);
        for (int64_t q = 0; q < c; ++q) cval[r][q] = row[buf[q]];
      }
    });
  };
  std::vector<uint64_t> keys;
  auto collect = [&] {
    keys.clear();
    for (int64_t r = 0; r < b; ++r)
      for (size_t q = 0; q < cand[r].size(); ++q) keys.push_back(Key(cval[r][q], r * m + cand[r][q]));
  };
  gather(t);
  collect();
  const uint64_t tkey = Key(t, 0) & ~uint64_t{0xFFFFFFFFu};
  if (t != -INFINITY &&
      std::count_if(keys.begin(), keys.end(), [&](uint64_t k) { return k >= tkey; }) < n) {
    gather(-INFINITY);  // an unlucky sample: every entry is a candidate
    collect();
  }
  std::vector<uint64_t> tmp(keys.size() + 8);
  SelectLargest(keys.data(), static_cast<int64_t>(keys.size()), n, tmp.data());
  const uint64_t last = *std::min_element(keys.begin(), keys.begin() + n);  // the n-th best
  *othr = KeyValue(last);
  std::vector<int64_t> first(b + 1, 0);  // each sample's first row, after the prefix sum
  ParallelFor(b, 1, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t c = 0;
      for (size_t q = 0; q < cand[r].size(); ++q) c += Key(cval[r][q], r * m + cand[r][q]) >= last;
      first[r + 1] = (c + J - 1) / J;
    }
  });
  for (int64_t r = 0; r < b; ++r) first[r + 1] += first[r];
  std::fill(ov, ov + rows * J, 0.0f);
  std::fill(oi, oi + rows * J, 0);
  std::fill(os, os + rows, 0);
  ParallelFor(b, 1, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t slot = first[r] * J;
      for (size_t q = 0; q < cand[r].size(); ++q) {
        if (Key(cval[r][q], r * m + cand[r][q]) < last) continue;
        ov[slot] = cval[r][q];
        oi[slot++] = cand[r][q];
      }
      for (int64_t q = first[r]; q < first[r + 1]; ++q) os[q] = static_cast<int32_t>(r);
    }
  });
}

// pre (B, C, M): C cells' matrices interleaved by sample (the layout of one GEMM for a group,
// x [W_1; ...; W_C]^T), bias (C, M); outputs (C, R, J), (C, R, J), (C, R), (C, 1).
ffi::Error BatchTopkBody(ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> bias, int64_t n,
                         ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx,
                         ffi::ResultBuffer<ffi::S32> sample, ffi::ResultBuffer<ffi::F32> thr) {
  auto pd = pre.dimensions(), bd = bias.dimensions(), vd = vals->dimensions();
  if (pd.size() != 3 || bd.size() != 2 || vd.size() != 3)
    return ffi::Error::InvalidArgument("sae_batch_topk: ranks");
  const int64_t b = pd[0], cells = pd[1], m = pd[2], rows = vd[1], J = vd[2];
  if (bd[0] != cells || bd[1] != m || vd[0] != cells || n < 1 || n > b * m || b * m > kMaxEntries ||
      J < 1 || rows < (n + J - 1) / J + b || idx->element_count() != vals->element_count() ||
      sample->element_count() != cells * rows || thr->element_count() != cells)
    return ffi::Error::InvalidArgument("sae_batch_topk: shapes");
  for (int64_t c = 0; c < cells; ++c)
    BatchTopkCell(pre.typed_data() + c * m, cells * m, bias.typed_data() + c * m, b, m, n, rows, J,
                  vals->typed_data() + c * rows * J, idx->typed_data() + c * rows * J,
                  sample->typed_data() + c * rows, thr->typed_data() + c);
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- unit rows
// n of one row (see the top of the file): its largest |w_i| and sum of (w_i / s)^2, in F16 lanes
// then the tail; division by s keeps a huge row's squares finite.
float RowNorm(const float* w, int64_t d, float eps) {
  int64_t i = 0;
  F16 mx = F16::Zero();
  for (; i + kLanes <= d; i += kLanes) mx = Max(mx, Abs(F16::Load(w + i)));
  float s = 0.0f;
  for (int64_t t = i; t < d; ++t) s = std::fabs(w[t]) > s ? std::fabs(w[t]) : s;
  s = MaxLanes(mx, s);
  if (!(s > 0.0f)) s = 1.0f;
  const F16 sv = F16::Set(s);
  F16 acc = F16::Zero();
  for (i = 0; i + kLanes <= d; i += kLanes) {
    const F16 q = F16::Load(w + i) / sv;
    acc = Fma(q, q, acc);
  }
  float tail = 0.0f;
  for (; i < d; ++i) tail += (w[i] / s) * (w[i] / s);
  return s * std::sqrt(SumLanes(acc, tail)) + eps;
}

// dw = g / n - (g . w) / (n^2 (n - eps)) w for one row (o may be g itself).
inline void UnitVjpRow(const float* x, float nv, const float* g, float* o, int64_t d, float eps) {
  int64_t i = 0;
  F16 acc = F16::Zero();
  for (; i + kLanes <= d; i += kLanes) acc = Fma(F16::Load(g + i), F16::Load(x + i), acc);
  float tail = 0.0f;
  for (int64_t t = i; t < d; ++t) tail += g[t] * x[t];
  const float norm = nv - eps, dot = SumLanes(acc, tail);
  const float c = norm > 0.0f ? dot / (nv * nv) / norm : 0.0f;
  const F16 cv = F16::Set(c), nn = F16::Set(nv);
  for (i = 0; i + kLanes <= d; i += kLanes) Fnma(cv, F16::Load(x + i), F16::Load(g + i) / nn).Store(o + i);
  for (; i < d; ++i) o[i] = g[i] / nv - c * x[i];
}

// ----------------------------------------------------------------------------- gathers, scatter
// The scatter-add walks one cell's (row, slot) entries grouped by blocks of rows, and within a
// block by latent, in increasing latent order: a block's rows (B_b x D floats, sized to stay in the
// L2 cache) are read at random while the output streams through once per block in address order.
// The gather and the dot products go row by row instead (GatherSumBody, DotsBody).
constexpr int64_t kBlockBytes = 1024 * 1024;

struct Blocked {
  int64_t rows_per_block = 0, blocks = 0;
  std::vector<int32_t> start;  // (blocks, L + 1): block q's entries for latent l are
  std::vector<int32_t> order;  // order[start[q, l] : start[q, l + 1]], each e = row * J + slot
  std::vector<int32_t> row;    // built with weights w: e's row (e / J) and w_e, in `order`'s order,
  std::vector<float> weight;   // so that the sums read both in sequence (no division, no gather)

  // Sizes the blocks of n rows of jn entries (rows that fit kBlockBytes, and at least one block
  // per thread) and the arrays, `row` and `weight` too where BuildBlock will be given weights.
  void Plan(int64_t n, int64_t jn, int64_t L, int64_t d, bool weights = false) {
    const int64_t per_thread = (n + Threads() - 1) / Threads();
    rows_per_block = std::max<int64_t>(
        8, std::min<int64_t>(per_thread, kBlockBytes / (4 * std::max<int64_t>(d, 1))));
    blocks = (n + rows_per_block - 1) / rows_per_block;
    start.assign(blocks * (L + 1), 0);
    order.resize(n * jn);
    row.resize(weights ? n * jn : 0);
    weight.resize(weights ? n * jn : 0);
  }
  // Block q's part of `start` and `order` (blocks are independent: threads may build them side
  // by side). Entries with index outside [0, L) are left out, or clipped into it (clip: the
  // gathers').
  void BuildBlock(const int32_t* idx, int64_t q, int64_t n, int64_t jn, int64_t L, bool clip,
                  const float* w = nullptr) {
    int32_t* st = start.data() + q * (L + 1);
    const int64_t e0 = q * rows_per_block * jn, e1 = std::min(n, (q + 1) * rows_per_block) * jn;
    auto target = [&](int64_t e) -> int64_t {
      const int64_t l = idx[e];
      if (clip) return std::clamp<int64_t>(l, 0, L - 1);
      return (l < 0 || l >= L) ? -1 : l;
    };
    for (int64_t e = e0; e < e1; ++e)
      if (int64_t l = target(e); l >= 0) ++st[l + 1];
    st[0] = static_cast<int32_t>(e0);
    for (int64_t l = 0; l < L; ++l) st[l + 1] += st[l];
    std::vector<int32_t> fill(st, st + L);
    if (w == nullptr) {
      for (int64_t e = e0; e < e1; ++e)
        if (int64_t l = target(e); l >= 0) order[fill[l]++] = static_cast<int32_t>(e);
      return;
    }
    for (int64_t r = e0 / jn, e = e0; e < e1; ++r)
      for (int64_t j = 0; j < jn; ++j, ++e)
        if (int64_t l = target(e); l >= 0) {
          const int32_t p = fill[l]++;
          order[p] = static_cast<int32_t>(e);
          row[p] = static_cast<int32_t>(r);
          weight[p] = w[e];
        }
  }
  void Build(const int32_t* idx, int64_t n, int64_t jn, int64_t L, int64_t d, bool clip = false) {
    Plan(n, jn, L, d);
    for (int64_t q = 0; q < blocks; ++q) BuildBlock(idx, q, n, jn, L, clip);
  }
  const int32_t* Start(int64_t q, int64_t L) const { return start.data() + q * (L + 1); }
};


// Asks for the n elements at p ahead of their use.
template <class T>
inline void Prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b);
}

template <class T>
inline void Axpy(float a, const T* x, float* y, int64_t d) {
  for (int64_t t = 0; t < d; ++t) y[t] += a * ToF32(x[t]);
}

// AxpyRows on [t0, ...) in tiles of NV x 16 floats held in registers; where the tiles stopped.
template <int NV, class T>
SAE_INLINE int64_t AxpyRowsTiles(const float* w, const T* rows, const int32_t* rs, int64_t ne,
                                 float* y, int64_t d, int64_t t0) {
  for (; t0 + NV * 16 <= d; t0 += NV * 16) {
    F16 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = F16::Load(y + t0 + v * 16);
    for (int64_t p = 0; p < ne; ++p) {
      const T* r = rows + rs[p] * d + t0;
      const F16 a = F16::Set(w[p]);
      for (int v = 0; v < NV; ++v) acc[v] = Fma(a, F16::Load(r + v * 16), acc[v]);
    }
    for (int v = 0; v < NV; ++v) acc[v].Store(y + t0 + v * 16);
  }
  return t0;
}

// y += sum_p w_p r_{rs_p} over p < ne (in order): y held in registers, kTile x 16 floats at a
// time, across the entries (the same per-element order as one Axpy per entry).
template <class T>
inline void AxpyRows(const float* w, const T* rows, const int32_t* rs, int64_t ne, float* y, int64_t d) {
  if (ne == 0) return;
  int64_t t0 = AxpyRowsTiles<kTile>(w, rows, rs, ne, y, d, 0);
  t0 = AxpyRowsTiles<1>(w, rows, rs, ne, y, d, t0);
  if (t0 < d)
    for (int64_t p = 0; p < ne; ++p) Axpy(w[p], rows + rs[p] * d + t0, y + t0, d - t0);
}

// out_n = sum_j w_nj T[i_nj] in slot order, row by row over the threads: the row is held in
// registers kTile x 16 floats at a time while its J table rows stream in, each asked for kAhead slots
// ahead of its use. Walking the entries by latent instead (the table read once per row block, the
// out rows added to in the L2 cache) ran 1.6x slower at d 256 and no faster at d 1024 (both
// kernels interleaved in one process on the AMD EPYC; the step: benchmarks/grid_step.py).
constexpr int64_t kAhead = 4;
template <int NV, class T>
SAE_INLINE int64_t GatherRowTiles(const float* w, int64_t jn, const T* t, int64_t d, float* o,
                                  const int64_t* at, int64_t t0) {
  for (; t0 + NV * 16 <= d; t0 += NV * 16) {
    F16 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = F16::Zero();
    for (int64_t j = 0; j < jn; ++j) {
      if (j + kAhead < jn) Prefetch(t + at[j + kAhead] + t0, NV * 16);
      const T* src = t + at[j] + t0;
      const F16 a = F16::Set(w[j]);
      for (int v = 0; v < NV; ++v) acc[v] = Fma(a, F16::Load(src + v * 16), acc[v]);
    }
    for (int v = 0; v < NV; ++v) acc[v].Store(o + t0 + v * 16);
  }
  return t0;
}
template <class T>
void GatherRow(const float* w, const int32_t* i, int64_t jn, const T* t, int64_t s, int64_t d,
               float* o, std::vector<int64_t>& at) {
  for (int64_t j = 0; j < jn; ++j) at[j] = std::clamp<int64_t>(i[j], 0, s - 1) * d;
  int64_t t0 = GatherRowTiles<kTile>(w, jn, t, d, o, at.data(), 0);
  t0 = GatherRowTiles<1>(w, jn, t, d, o, at.data(), t0);
  if (t0 < d) {
    std::fill(o + t0, o + d, 0.0f);
    for (int64_t j = 0; j < jn; ++j) Axpy(w[j], t + at[j] + t0, o + t0, d - t0);
  }
}

template <ffi::DataType R>
using RowBuf = ffi::Buffer<R>;
template <ffi::DataType R>
using Row = ffi::NativeType<R>;

template <ffi::DataType R>
ffi::Error GatherSumBody(ffi::Buffer<ffi::F32> w, RowBuf<R> table, ffi::Buffer<ffi::S32> idx,
                         ffi::ResultBuffer<ffi::F32> out) {
  auto ad = w.dimensions(), td = table.dimensions(), id = idx.dimensions(), od = out->dimensions();
  const int64_t n = Dim(id, 2), jn = Dim(id, 1), s = Dim(td, 2), d = Dim(td, 1);
  Cells cells(od, 2);
  if (Dim(ad, 1) != jn || Dim(ad, 2) != n || Dim(od, 1) != d || Dim(od, 2) != n || s < 1 ||
      n * jn > kMaxEntries || !Fits(cells, ad, 2) || !Fits(cells, td, 2) || !Fits(cells, id, 2))
    return ffi::Error::InvalidArgument("sae_gather_sum: shapes");
  const float* A = w.typed_data();
  const Row<R>* T = table.typed_data();
  const int32_t* I = idx.typed_data();
  float* O = out->typed_data();
  ParallelFor(cells.count * n, 16, jn * d, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> at(jn);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r / n, row = r % n;
      GatherRow(A + cells.Offset(c, ad, 2, n * jn) + row * jn, I + cells.Offset(c, id, 2, n * jn) + row * jn,
                jn, T + cells.Offset(c, td, 2, s * d), s, d, O + r * d, at);
    }
  });
  return ffi::Error::Success();
}

// out_j = r . T[i_j] for one row's J slots, kJ (kSlots) at a time: one accumulator of 16 lanes per
// slot (lane l sums the elements l mod 16 in order), then the tail plus the lanes (SumLanes). The
// kJ table rows stream in side by side while the next kJ are asked for. Row by row, as the gather:
// 1.6x faster than walking the entries by latent at d 256 and 1.2x at d 1024 (both kernels
// interleaved in one process on the AMD EPYC; 8 slots at a time beat 4 and 16 at both).
template <class Tr, class T>
void DotsRow(const Tr* r, const int32_t* i, int64_t jn, const T* t, int64_t s, int64_t d,
             float* o) {
  constexpr int kJ = kSlots;
  const int64_t d16 = d - d % 16;
  for (int64_t j0 = 0; j0 < jn; j0 += kJ) {
    const int nj = static_cast<int>(std::min<int64_t>(kJ, jn - j0));
    const T* src[kJ];
    for (int q = 0; q < nj; ++q) src[q] = t + std::clamp<int64_t>(i[j0 + q], 0, s - 1) * d;
    for (int q = nj; q < kJ; ++q) src[q] = src[0];
    for (int q = 0; q < kJ && j0 + kJ + q < jn; ++q)
      __builtin_prefetch(t + std::clamp<int64_t>(i[j0 + kJ + q], 0, s - 1) * d);
    F16 acc[kJ];
    for (int q = 0; q < kJ; ++q) acc[q] = F16::Zero();
    for (int64_t e = 0; e < d16; e += 16) {
      const F16 rv = F16::Load(r + e);
      for (int q = 0; q < kJ; ++q) acc[q] = Fma(rv, F16::Load(src[q] + e), acc[q]);
    }
    for (int q = 0; q < nj; ++q) {
      float a = 0.0f;
      for (int64_t e = d16; e < d; ++e) a += ToF32(r[e]) * ToF32(src[q][e]);
      o[j0 + q] = SumLanes(acc[q], a);
    }
  }
}

template <ffi::DataType R>
ffi::Error DotsBody(RowBuf<R> rows, RowBuf<R> table, ffi::Buffer<ffi::S32> idx,
                    ffi::ResultBuffer<ffi::F32> out) {
  auto ad = rows.dimensions(), td = table.dimensions(), id = idx.dimensions(), od = out->dimensions();
  const int64_t n = Dim(id, 2), jn = Dim(id, 1), s = Dim(td, 2), d = Dim(td, 1);
  Cells cells(od, 2);
  if (Dim(ad, 1) != d || Dim(ad, 2) != n || Dim(od, 1) != jn || Dim(od, 2) != n || s < 1 ||
      n * jn > kMaxEntries || !Fits(cells, ad, 2) || !Fits(cells, td, 2) || !Fits(cells, id, 2))
    return ffi::Error::InvalidArgument("sae_dots: shapes");
  const Row<R>*A = rows.typed_data(), *T = table.typed_data();
  const int32_t* I = idx.typed_data();
  float* O = out->typed_data();
  ParallelFor(cells.count * n, 16, jn * d, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r / n, row = r % n;
      DotsRow(A + cells.Offset(c, ad, 2, n * d) + row * d, I + cells.Offset(c, id, 2, n * jn) + row * jn,
              jn, T + cells.Offset(c, td, 2, s * d), s, d, O + r * jn);
    }
  });
  return ffi::Error::Success();
}

// e -= g, and |e|^2 after it: kLanes partial sums, then the tail, then the lanes (SumLanes).
inline float SubtractSquares(float* e, const float* g, int64_t d) {
  F16 part = F16::Zero();
  int64_t q = 0;
  for (; q + kLanes <= d; q += kLanes) {
    const F16 v = F16::Load(e + q) - F16::Load(g + q);
    v.Store(e + q);
    part = Fma(v, v, part);
  }
  float acc = 0.0f;
  for (; q < d; ++q) {
    const float v = e[q] - g[q];
    e[q] = v;
    acc += v * v;
  }
  return SumLanes(part, acc);
}

// a . b for float a and b of either row type: kLanes partial sums, then the tail plus the lanes.
template <class T>
inline float DotF(const float* a, const T* b, int64_t d) {
  int64_t e = 0;
  F16 acc = F16::Zero();
  for (; e + kLanes <= d; e += kLanes) acc = Fma(F16::Load(a + e), F16::Load(b + e), acc);
  float s = 0.0f;
  for (; e < d; ++e) s += a[e] * ToF32(b[e]);
  return SumLanes(acc, s);
}

// A table of more than TableCacheBytes() (one cell's; $SAE_JAX_NATIVE_TABLE_CACHE_BYTES, else
// 12 MiB) is read once per block of rows, in address order: each table row (a latent) adds to, and
// then takes dot products with, the block's L2-resident rows of its entries, instead of k random
// table rows per sample coming from memory. Both paths interleaved in one process (AMD EPYC, L3
// 32 MiB): blocked 1.7x slower with a 4 MB table (d 256), 1.07x faster with 16 MB (d 1024,
// m 4096), even at 32 MB, 1.8x faster with 75 MB (d 768, m 24576, k 768: 401 -> 220 ms).
inline int64_t TableCacheBytes() {
  const char* e = std::getenv("SAE_JAX_NATIVE_TABLE_CACHE_BYTES");
  return e && *e ? std::atoll(e) : (int64_t{12} << 20);
}

template <class T>
void DecodeErrBlocked(const float* w, const T* table, const int32_t* idx, const float* g,
                      int64_t n, int64_t jn, int64_t s, int64_t d, float* e, float* r, float* sq) {
  Blocked blk;
  blk.Build(idx, n, jn, s, d, /*clip=*/true);
  ParallelFor(blk.blocks, 1, blk.rows_per_block * jn * d, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * blk.rows_per_block, n1 = std::min(n, n0 + blk.rows_per_block);
      std::fill(e + n0 * d, e + n1 * d, 0.0f);
      const int32_t* st = blk.Start(q, s);
      for (int64_t l = 0; l < s; ++l)
        for (int32_t p = st[l]; p < st[l + 1]; ++p) {
          const int64_t en = blk.order[p];
          Axpy(w[en], table + l * d, e + (en / jn) * d, d);
        }
      for (int64_t row = n0; row < n1; ++row) sq[row] = SubtractSquares(e + row * d, g + row * d, d);
      for (int64_t l = 0; l < s; ++l)
        for (int32_t p = st[l]; p < st[l + 1]; ++p) {
          const int64_t en = blk.order[p];
          r[en] = DotF(e + (en / jn) * d, table + l * d, d);
        }
    }
  });
}

// e_n = sum_j w_nj T[i_nj] - t_n, r_nj = e_n . T[i_nj], sq_n = |e_n|^2: the decoder's forward,
// its error against the target and the dot products of the error's VJP, row by row in one pass
// (GatherRow, then DotsRow on the float32 error while the row's J table rows are still in the L2
// cache: the unfused kernels read them from memory twice), or by table row for a large table.
// scale (sae_decode_err_scaled): the table's rows times scale_s, the atoms of the sums and of the
// dot products (c_j a_{i_j} = (c_j scale_{i_j}) T[i_j], e . a_{i_j} = scale_{i_j} (e . T[i_j])):
// the weights are scaled before the pass and the dot products after it.
template <ffi::DataType R>
ffi::Error DecodeErrBody(ffi::Buffer<ffi::F32> w, RowBuf<R> table, ffi::Buffer<ffi::S32> idx,
                         ffi::Buffer<ffi::F32> target, const ffi::Buffer<ffi::F32>* scale,
                         ffi::ResultBuffer<ffi::F32> err, ffi::ResultBuffer<ffi::F32> dots,
                         ffi::ResultBuffer<ffi::F32> sq) {
  auto ad = w.dimensions(), td = table.dimensions(), id = idx.dimensions(), gd = target.dimensions(),
       od = err->dimensions();
  const int64_t n = Dim(id, 2), jn = Dim(id, 1), s = Dim(td, 2), d = Dim(td, 1);
  Cells cells(od, 2);
  if (Dim(ad, 1) != jn || Dim(ad, 2) != n || Dim(od, 1) != d || Dim(od, 2) != n || Dim(gd, 1) != d ||
      Dim(gd, 2) != n || s < 1 || n * jn > kMaxEntries || !Fits(cells, ad, 2) || !Fits(cells, td, 2) ||
      !Fits(cells, id, 2) || !Fits(cells, gd, 2) ||
      (scale && (!Fits(cells, scale->dimensions(), 1) || Dim(scale->dimensions(), 1) != s)))
    return ffi::Error::InvalidArgument("sae_decode_err: shapes");
  const Row<R>* T = table.typed_data();
  const int32_t* I = idx.typed_data();
  const float *A = w.typed_data(), *G = target.typed_data();
  std::vector<float> scaled;
  auto scale_of = [&](int64_t c, const int32_t* ir, int64_t j) {
    return scale->typed_data()[cells.Offset(c, scale->dimensions(), 1, s) + std::clamp<int64_t>(ir[j], 0, s - 1)];
  };
  if (scale) {  // the weights times their atoms' scales, laid out as the output's cells
    scaled.resize(cells.count * n * jn);
    ParallelFor(cells.count * n, 256, jn, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r / n, row = r % n;
        const int32_t* ir = I + cells.Offset(c, id, 2, n * jn) + row * jn;
        const float* wr = A + cells.Offset(c, ad, 2, n * jn) + row * jn;
        for (int64_t j = 0; j < jn; ++j) scaled[r * jn + j] = wr[j] * scale_of(c, ir, j);
      }
    });
    A = scaled.data();
    ad = od;  // now one matrix per cell (Offset reads only the leading dims)
  }
  float *E = err->typed_data(), *D = dots->typed_data(), *Q = sq->typed_data();
  auto unscale = [&] {  // the dot products times their atoms' scales
    if (!scale) return;
    ParallelFor(cells.count * n, 256, jn, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int32_t* ir = I + cells.Offset(r / n, id, 2, n * jn) + (r % n) * jn;
        for (int64_t j = 0; j < jn; ++j) D[r * jn + j] *= scale_of(r / n, ir, j);
      }
    });
  };
  if (s * d * static_cast<int64_t>(sizeof(Row<R>)) > TableCacheBytes()) {
    for (int64_t c = 0; c < cells.count; ++c)
      DecodeErrBlocked(A + cells.Offset(c, ad, 2, n * jn), T + cells.Offset(c, td, 2, s * d),
                       I + cells.Offset(c, id, 2, n * jn), G + cells.Offset(c, gd, 2, n * d), n, jn, s,
                       d, E + c * n * d, D + c * n * jn, Q + c * n);
    unscale();
    return ffi::Error::Success();
  }
  ParallelFor(cells.count * n, 16, jn * d, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> at(jn);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r / n, row = r % n;
      const int32_t* ir = I + cells.Offset(c, id, 2, n * jn) + row * jn;
      const Row<R>* tc = T + cells.Offset(c, td, 2, s * d);
      const float* g = G + cells.Offset(c, gd, 2, n * d) + row * d;
      float* e = E + r * d;
      GatherRow(A + cells.Offset(c, ad, 2, n * jn) + row * jn, ir, jn, tc, s, d, e, at);
      Q[r] = SubtractSquares(e, g, d);
      DotsRow(e, ir, jn, tc, s, d, D + r * jn);
    }
  });
  unscale();
  return ffi::Error::Success();
}

// out_l = sum w_nj r_n over entries with i_nj = l: every cell's row blocks indexed first, side by
// side on the threads (on one thread, a cell after another, the counting sorts cost the LLM-sized
// step's scatter 15%), then a cell at a time, its latents split over the threads (both threads
// on one cell's rows: splitting the cells instead ran 1.2x slower at d 1024); each thread walks
// every row block and adds, per latent, that block's entries in (row, slot) order, so the sum's
// order does not depend on the threads. The output row is held in
// registers across the entries (AxpyRows): 1.4x faster than an Axpy per entry at d 256 and 1024.
// unit (sae_scatter_unit): the atoms' table D (.., L, d) and norms n (.., L, 1) of
// sae_unit_rows: each output row, once summed, becomes that VJP's dL/dD_l = UnitVjpRow(D_l, n_l,
// out_l) while it is still in cache (no pass of its own over the dictionary).
struct UnitArgs {
  const ffi::Buffer<ffi::F32>* atoms;
  const ffi::Buffer<ffi::F32>* norms;
  float eps;
};

template <ffi::DataType R>
ffi::Error ScatterBody(ffi::Buffer<ffi::F32> w, RowBuf<R> rows, ffi::Buffer<ffi::S32> idx,
                       const UnitArgs* unit, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> col) {
  auto wd = w.dimensions(), rd = rows.dimensions(), id = idx.dimensions(), od = out->dimensions();
  const int64_t L = Dim(od, 2), d = Dim(od, 1), n = Dim(wd, 2), jn = Dim(wd, 1);
  Cells cells(od, 2);
  if (Dim(rd, 1) != d || Dim(rd, 2) != n || Dim(id, 2) != n || Dim(id, 1) != jn ||
      n * jn > kMaxEntries || !Fits(cells, wd, 2) || !Fits(cells, rd, 2) || !Fits(cells, id, 2) ||
      (unit && (!Fits(cells, unit->atoms->dimensions(), 2) || Dim(unit->atoms->dimensions(), 1) != d ||
                Dim(unit->atoms->dimensions(), 2) != L || !Fits(cells, unit->norms->dimensions(), 2) ||
                Dim(unit->norms->dimensions(), 1) != 1 || Dim(unit->norms->dimensions(), 2) != L)))
    return ffi::Error::InvalidArgument("sae_scatter: shapes");
  const float* W = w.typed_data();
  const Row<R>* Rw = rows.typed_data();
  const int32_t* I = idx.typed_data();
  float *O = out->typed_data(), *C = col->typed_data();
  // every cell's blocks built side by side, then every (cell, latent) range summed side by side
  std::vector<Blocked> blk(cells.count);
  for (auto& b : blk) b.Plan(n, jn, L, d * sizeof(Row<R>) / 4, /*weights=*/true);
  const int64_t nb = blk.empty() ? 0 : blk[0].blocks;
  ParallelFor(cells.count * nb, 1, blk.empty() ? 0 : blk[0].rows_per_block * jn, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      blk[t / nb].BuildBlock(I + cells.Offset(t / nb, id, 2, n * jn), t % nb, n, jn, L, false,
                             W + cells.Offset(t / nb, wd, 2, n * jn));
  });
  for (int64_t c = 0; c < cells.count; ++c) {
    const Row<R>* rc = Rw + cells.Offset(c, rd, 2, n * d);
    float *oc = O + c * L * d, *cc = C + c * L;
    const Blocked& bc = blk[c];
    ParallelFor(L, 64, n * jn * d / std::max<int64_t>(1, L), [&](int64_t l0, int64_t l1) {
      std::fill(oc + l0 * d, oc + l1 * d, 0.0f);
      std::fill(cc + l0, cc + l1, 0.0f);
      for (int64_t q = 0; q < nb; ++q) {
        const int32_t* st = bc.Start(q, L);
        for (int64_t l = l0; l < l1; ++l) {
          for (int32_t p = st[l]; p < st[l + 1]; ++p) cc[l] += bc.weight[p];
          AxpyRows(bc.weight.data() + st[l], rc, bc.row.data() + st[l], st[l + 1] - st[l], oc + l * d, d);
        }
      }
      if (!unit) return;
      const float* dc = unit->atoms->typed_data() + cells.Offset(c, unit->atoms->dimensions(), 2, L * d);
      const float* nc = unit->norms->typed_data() + cells.Offset(c, unit->norms->dimensions(), 2, L);
      for (int64_t l = l0; l < l1; ++l) UnitVjpRow(dc + l * d, nc[l], oc + l * d, oc + l * d, d, unit->eps);
    });
  }
  return ffi::Error::Success();
}


using F32Buf = ffi::Buffer<ffi::F32>;
using F32Ret = ffi::ResultBuffer<ffi::F32>;

// ----------------------------------------------------------------------------- unit rows: kernels
// A (.., D) array as `rows` rows of d; Same: whether an operand of dims `dims` has as many rows of
// `width`.
struct RowLayout {
  int64_t rows = 0, d = 0;
  bool Same(ffi::Span<const int64_t> dims, int64_t width) const {
    if (dims.size() == 0 || Dim(dims, 1) != width) return false;
    int64_t r = 1;
    for (size_t a = 0; a + 1 < dims.size(); ++a) r *= dims[a];
    return r == rows;
  }
};

ffi::Error UnitRowsBody(F32Buf w, float eps, F32Ret a, F32Ret n) {
  auto wd = w.dimensions();
  if (wd.size() == 0) return ffi::Error::InvalidArgument("sae_unit_rows: ranks");
  RowLayout r{static_cast<int64_t>(w.element_count()) / std::max<int64_t>(1, Dim(wd, 1)), Dim(wd, 1)};
  if (r.d < 1 || !r.Same(a->dimensions(), r.d) || !r.Same(n->dimensions(), 1))
    return ffi::Error::InvalidArgument("sae_unit_rows: shapes");
  const float* W = w.typed_data();
  float *A = a->typed_data(), *N = n->typed_data();
  ParallelFor(r.rows, 64, r.d, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const float* x = W + row * r.d;
      const float nv = RowNorm(x, r.d, eps);
      N[row] = nv;
      const F16 nn = F16::Set(nv);
      int64_t i = 0;
      for (; i + kLanes <= r.d; i += kLanes) (F16::Load(x + i) / nn).Store(A + row * r.d + i);
      for (; i < r.d; ++i) A[row * r.d + i] = x[i] / nv;
    }
  });
  return ffi::Error::Success();
}

ffi::Error RowNormsBody(F32Buf w, float eps, F32Ret n) {
  auto wd = w.dimensions();
  if (wd.size() == 0) return ffi::Error::InvalidArgument("sae_row_norms: ranks");
  RowLayout r{static_cast<int64_t>(w.element_count()) / std::max<int64_t>(1, Dim(wd, 1)), Dim(wd, 1)};
  if (r.d < 1 || !r.Same(n->dimensions(), 1)) return ffi::Error::InvalidArgument("sae_row_norms: shapes");
  ParallelFor(r.rows, 64, r.d, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) n->typed_data()[row] = RowNorm(w.typed_data() + row * r.d, r.d, eps);
  });
  return ffi::Error::Success();
}

ffi::Error UnitRowsVjpBody(F32Buf w, F32Buf n, F32Buf g, float eps, F32Ret dw) {
  auto wd = w.dimensions();
  if (wd.size() == 0) return ffi::Error::InvalidArgument("sae_unit_rows_vjp: ranks");
  RowLayout r{static_cast<int64_t>(w.element_count()) / std::max<int64_t>(1, Dim(wd, 1)), Dim(wd, 1)};
  if (r.d < 1 || !r.Same(n.dimensions(), 1) || !r.Same(g.dimensions(), r.d) || !r.Same(dw->dimensions(), r.d))
    return ffi::Error::InvalidArgument("sae_unit_rows_vjp: shapes");
  const float *W = w.typed_data(), *Nn = n.typed_data(), *G = g.typed_data();
  float* O = dw->typed_data();
  ParallelFor(r.rows, 64, r.d, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      UnitVjpRow(W + row * r.d, Nn[row], G + row * r.d, O + row * r.d, r.d, eps);
    }
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- Adam
// Each element rounds as XLA:CPU's fusion of optax's step does: the fmas written out, no other
// contraction (hence the pragma), IEEE sqrt and division.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#ifdef __clang__
#pragma clang fp contract(off)
#endif

struct AdamCoef {
  float b1, c1, b2, c2, r1, r2, eps, eps_root, lr;
  explicit AdamCoef(const float* c)
      : b1(c[0]), c1(c[1]), b2(c[2]), c2(c[3]), r1(c[4]), r2(c[5]), eps(c[6]), eps_root(c[7]), lr(c[8]) {}
  // (p', m', v') of one element
  inline void Step(float p, float g, float m, float v, float& po, float& mo, float& vo) const {
    mo = std::fma(c1, g, b1 * m);
    vo = std::fma(c2, g * g, b2 * v);
    float u = (mo * r1) / (std::sqrt(vo * r2 + eps_root) + eps);
    po = std::fma(-lr, u, p);
  }
};
constexpr int64_t kAdamCoefs = 9;

// The same on 16 lanes.
struct AdamCoef16 {
  F16 b1, c1, b2, c2, r1, r2, eps, eps_root, lr;
  explicit AdamCoef16(const AdamCoef& k)
      : b1(F16::Set(k.b1)), c1(F16::Set(k.c1)), b2(F16::Set(k.b2)), c2(F16::Set(k.c2)),
        r1(F16::Set(k.r1)), r2(F16::Set(k.r2)), eps(F16::Set(k.eps)), eps_root(F16::Set(k.eps_root)),
        lr(F16::Set(k.lr)) {}
  SAE_INLINE void Step(F16 p, F16 g, F16 m, F16 v, F16& po, F16& mo, F16& vo) const {
    mo = Fma(c1, g, b1 * m);
    vo = Fma(c2, g * g, b2 * v);
    po = Fnma(lr, (mo * r1) / (Sqrt(vo * r2 + eps_root) + eps), p);  // p - lr u, one rounding
  }
};

// Whether g and p' are finite on [0, n): x - x is 0 for a finite x and NaN otherwise.
bool AdamFinite(const float* p, const float* g, const float* m, const float* v, int64_t n,
                const AdamCoef& k) {
  int64_t i = 0;
  const AdamCoef16 k16(k);
  F16 acc = F16::Zero();
  for (; i + kLanes <= n; i += kLanes) {
    const F16 gi = F16::Load(g + i);
    F16 po, mo, vo;
    k16.Step(F16::Load(p + i), gi, F16::Load(m + i), F16::Load(v + i), po, mo, vo);
    acc = acc + ((gi - gi) + (po - po));
  }
  bool ok = AllZero(acc);
  for (; i < n; ++i) {
    float po, mo, vo;
    k.Step(p[i], g[i], m[i], v[i], po, mo, vo);
    ok &= (g[i] - g[i]) == 0.0f && (po - po) == 0.0f;
  }
  return ok;
}

// p', m', v' on [0, n), written to po, mo, vo (which may be p, m, v themselves).
void AdamStep(const float* p, const float* g, const float* m, const float* v, int64_t n,
              const AdamCoef& k, float* po, float* mo, float* vo) {
  int64_t i = 0;
  const AdamCoef16 k16(k);
  for (; i + kLanes <= n; i += kLanes) {
    F16 a, b, c;
    k16.Step(F16::Load(p + i), F16::Load(g + i), F16::Load(m + i), F16::Load(v + i), a, b, c);
    a.Store(po + i);
    b.Store(mo + i);
    c.Store(vo + i);
  }
  for (; i < n; ++i) k.Step(p[i], g[i], m[i], v[i], po[i], mo[i], vo[i]);
}

#pragma GCC pop_options

constexpr int64_t kAdamBlock = int64_t{1} << 14;  // elements per task: 64 KiB of each array


// The cells (the leading dims of `out`, whose last `trailing` dims are not cells) and the element
// count n of one cell's parameter (its last `rank` dims: the parameter is passed in its own shape,
// which lets XLA write the step over it in place).
struct AdamLayout {
  Cells cells;
  int64_t rank, n = 1;
  AdamLayout(ffi::Span<const int64_t> out, int trailing, ffi::Span<const int64_t> param, int64_t rank)
      : cells(out, trailing), rank(rank) {
    for (int64_t a = 0; a < rank && a < static_cast<int64_t>(param.size()); ++a) n *= Dim(param, a + 1);
  }
};

bool AdamShapes(const AdamLayout& a, std::initializer_list<ffi::Span<const int64_t>> params,
                ffi::Span<const int64_t> coef, ffi::Span<const int64_t> flag) {
  for (auto d : params) {
    if (!Fits(a.cells, d, static_cast<int>(a.rank))) return false;
    int64_t n = 1;
    for (int64_t k = 0; k < a.rank; ++k) n *= Dim(d, k + 1);
    if (n != a.n) return false;
  }
  return Fits(a.cells, coef, 1) && Dim(coef, 1) == kAdamCoefs && Fits(a.cells, flag, 1) && Dim(flag, 1) == 1;
}

// f(c, lo, len, at, k) over every cell c and block [lo, lo + len) of its parameter, on the
// threads: at(buffer) points at that block of the buffer's cell c, k is the cell's coefficients.
template <class F>
void ForAdamBlocks(const AdamLayout& a, const F32Buf& coef, F&& f) {
  const int64_t blocks = (a.n + kAdamBlock - 1) / kAdamBlock;
  ParallelFor(a.cells.count * blocks, 8, kAdamBlock, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / blocks, lo = (t % blocks) * kAdamBlock, len = std::min(kAdamBlock, a.n - lo);
      auto at = [&](const F32Buf& b) {
        return b.typed_data() + a.cells.Offset(c, b.dimensions(), static_cast<int>(a.rank), a.n) + lo;
      };
      f(c, lo, len, at, AdamCoef(coef.typed_data() + a.cells.Offset(c, coef.dimensions(), 1, kAdamCoefs)));
    }
  });
}

ffi::Error AdamCheckBody(F32Buf p, F32Buf g, F32Buf m, F32Buf v, F32Buf coef, int64_t rank, F32Ret ok) {
  if (rank < 0 || static_cast<int64_t>(p.dimensions().size()) < rank || ok->dimensions().size() < 1)
    return ffi::Error::InvalidArgument("sae_adam_check: ranks");
  AdamLayout a(ok->dimensions(), 1, p.dimensions(), rank);
  if (!AdamShapes(a, {p.dimensions(), g.dimensions(), m.dimensions(), v.dimensions()}, coef.dimensions(),
                  ok->dimensions()))
    return ffi::Error::InvalidArgument("sae_adam_check: shapes");
  // one flag per (cell, block): a cell's blocks may run on different threads
  const int64_t blocks = (a.n + kAdamBlock - 1) / kAdamBlock;
  std::vector<char> bad(static_cast<size_t>(a.cells.count * blocks), 0);
  ForAdamBlocks(a, coef, [&](int64_t c, int64_t lo, int64_t len, auto at, const AdamCoef& k) {
    bad[c * blocks + lo / kAdamBlock] = !AdamFinite(at(p), at(g), at(m), at(v), len, k);
  });
  for (int64_t c = 0; c < a.cells.count; ++c) {
    bool any = false;
    for (int64_t b = 0; b < blocks; ++b) any |= bad[c * blocks + b] != 0;
    ok->typed_data()[c] = any ? 0.0f : 1.0f;
  }
  return ffi::Error::Success();
}

ffi::Error AdamApplyBody(F32Buf p, F32Buf g, F32Buf m, F32Buf v, F32Buf coef, F32Buf keep, int64_t rank,
                         F32Ret po, F32Ret mo, F32Ret vo) {
  if (rank < 0 || static_cast<int64_t>(po->dimensions().size()) < rank)
    return ffi::Error::InvalidArgument("sae_adam_apply: ranks");
  AdamLayout a(po->dimensions(), static_cast<int>(rank), po->dimensions(), rank);
  if (!AdamShapes(a, {p.dimensions(), g.dimensions(), m.dimensions(), v.dimensions(), mo->dimensions(),
                      vo->dimensions()}, coef.dimensions(), keep.dimensions()) ||
      mo->element_count() != a.cells.count * a.n || vo->element_count() != a.cells.count * a.n)
    return ffi::Error::InvalidArgument("sae_adam_apply: shapes");
  ForAdamBlocks(a, coef, [&](int64_t c, int64_t lo, int64_t len, auto at, const AdamCoef& k) {
    float* out_p = po->typed_data() + c * a.n + lo;
    float* out_m = mo->typed_data() + c * a.n + lo;
    float* out_v = vo->typed_data() + c * a.n + lo;
    if (keep.typed_data()[a.cells.Offset(c, keep.dimensions(), 1, 1)] != 0.0f) {
      // unchanged (a no-op where XLA aliased the outputs to p, m, v)
      for (auto [src, dst] : {std::pair{at(p), out_p}, std::pair{at(m), out_m}, std::pair{at(v), out_v}})
        if (src != dst) std::memmove(dst, src, sizeof(float) * len);
      return;
    }
    AdamStep(at(p), at(g), at(m), at(v), len, k, out_p, out_m, out_v);
  });
  return ffi::Error::Success();
}

// The handlers: shape errors and C++ exceptions come back to XLA as errors, never a crash.
bool Matrices(std::initializer_list<ffi::Span<const int64_t>> dims) {
  for (auto d : dims)
    if (d.size() < 2) return false;
  return true;
}

using S32Buf = ffi::Buffer<ffi::S32>;

ffi::Error TopkImpl(F32Buf pre, F32Buf bias, F32Ret vals, ffi::ResultBuffer<ffi::S32> idx) {
  if (!Matrices({pre.dimensions(), bias.dimensions(), vals->dimensions()}))
    return ffi::Error::InvalidArgument("sae_topk: ranks");
  return Guard("sae_topk", [&] { return TopkBody(pre, bias, vals, idx); });
}

ffi::Error BatchTopkImpl(F32Buf pre, F32Buf bias, int64_t n, F32Ret vals, ffi::ResultBuffer<ffi::S32> idx,
                         ffi::ResultBuffer<ffi::S32> sample, F32Ret thr) {
  return Guard("sae_batch_topk", [&] { return BatchTopkBody(pre, bias, n, vals, idx, sample, thr); });
}

template <ffi::DataType R>
ffi::Error GatherSumImpl(F32Buf w, RowBuf<R> table, S32Buf idx, F32Ret out) {
  if (!Matrices({w.dimensions(), table.dimensions(), idx.dimensions(), out->dimensions()}))
    return ffi::Error::InvalidArgument("sae_gather_sum: ranks");
  return Guard("sae_gather_sum", [&] { return GatherSumBody<R>(w, table, idx, out); });
}

template <ffi::DataType R>
ffi::Error DotsImpl(RowBuf<R> rows, RowBuf<R> table, S32Buf idx, F32Ret out) {
  if (!Matrices({rows.dimensions(), table.dimensions(), idx.dimensions(), out->dimensions()}))
    return ffi::Error::InvalidArgument("sae_dots: ranks");
  return Guard("sae_dots", [&] { return DotsBody<R>(rows, table, idx, out); });
}

template <ffi::DataType R>
ffi::Error DecodeErrImpl(F32Buf w, RowBuf<R> table, S32Buf idx, F32Buf target, F32Ret err, F32Ret dots,
                         F32Ret sq) {
  if (!Matrices({w.dimensions(), table.dimensions(), idx.dimensions(), target.dimensions(),
                 err->dimensions(), dots->dimensions(), sq->dimensions()}))
    return ffi::Error::InvalidArgument("sae_decode_err: ranks");
  return Guard("sae_decode_err", [&] { return DecodeErrBody<R>(w, table, idx, target, nullptr, err, dots, sq); });
}

template <ffi::DataType R>
ffi::Error DecodeErrScaledImpl(F32Buf w, RowBuf<R> table, S32Buf idx, F32Buf target, F32Buf scale,
                               F32Ret err, F32Ret dots, F32Ret sq) {
  if (!Matrices({w.dimensions(), table.dimensions(), idx.dimensions(), target.dimensions(),
                 err->dimensions(), dots->dimensions(), sq->dimensions()}) || scale.dimensions().size() < 1)
    return ffi::Error::InvalidArgument("sae_decode_err: ranks");
  return Guard("sae_decode_err", [&] { return DecodeErrBody<R>(w, table, idx, target, &scale, err, dots, sq); });
}

template <ffi::DataType R>
ffi::Error ScatterImpl(F32Buf w, RowBuf<R> rows, S32Buf idx, F32Ret out, F32Ret col) {
  if (!Matrices({w.dimensions(), rows.dimensions(), idx.dimensions(), out->dimensions()}))
    return ffi::Error::InvalidArgument("sae_scatter: ranks");
  return Guard("sae_scatter", [&] { return ScatterBody<R>(w, rows, idx, nullptr, out, col); });
}

template <ffi::DataType R>
ffi::Error ScatterUnitImpl(F32Buf w, RowBuf<R> rows, S32Buf idx, F32Buf atoms, F32Buf norms, float eps,
                           F32Ret out, F32Ret col) {
  if (!Matrices({w.dimensions(), rows.dimensions(), idx.dimensions(), out->dimensions(), atoms.dimensions(),
                 norms.dimensions()}))
    return ffi::Error::InvalidArgument("sae_scatter: ranks");
  const UnitArgs unit{&atoms, &norms, eps};
  return Guard("sae_scatter", [&] { return ScatterBody<R>(w, rows, idx, &unit, out, col); });
}

ffi::Error UnitRowsImpl(F32Buf w, float eps, F32Ret a, F32Ret n) {
  return Guard("sae_unit_rows", [&] { return UnitRowsBody(w, eps, a, n); });
}

ffi::Error RowNormsImpl(F32Buf w, float eps, F32Ret n) {
  return Guard("sae_row_norms", [&] { return RowNormsBody(w, eps, n); });
}

ffi::Error UnitRowsVjpImpl(F32Buf w, F32Buf n, F32Buf g, float eps, F32Ret dw) {
  return Guard("sae_unit_rows_vjp", [&] { return UnitRowsVjpBody(w, n, g, eps, dw); });
}

ffi::Error AdamCheckImpl(F32Buf p, F32Buf g, F32Buf m, F32Buf v, F32Buf coef, int64_t rank, F32Ret ok) {
  return Guard("sae_adam_check", [&] { return AdamCheckBody(p, g, m, v, coef, rank, ok); });
}

ffi::Error AdamApplyImpl(F32Buf p, F32Buf g, F32Buf m, F32Buf v, F32Buf coef, F32Buf keep, int64_t rank,
                         F32Ret po, F32Ret mo, F32Ret vo) {
  return Guard("sae_adam_apply", [&] { return AdamApplyBody(p, g, m, v, coef, keep, rank, po, mo, vo); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeBatchTopk, BatchTopkImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeTopk, TopkImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// The row kernels, once per row type (Name##Suffix: float32 rows, or bfloat16 rows).
#define SAE_ROW_KERNELS(Suffix, R)                                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeGatherSum##Suffix, GatherSumImpl<ffi::R>,                \
                                ffi::Ffi::Bind()                                            \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::R>>()                             \
                                    .Arg<ffi::Buffer<ffi::S32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>());                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeDots##Suffix, DotsImpl<ffi::R>,                          \
                                ffi::Ffi::Bind()                                            \
                                    .Arg<ffi::Buffer<ffi::R>>()                             \
                                    .Arg<ffi::Buffer<ffi::R>>()                             \
                                    .Arg<ffi::Buffer<ffi::S32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>());                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeScatter##Suffix, ScatterImpl<ffi::R>,                    \
                                ffi::Ffi::Bind()                                            \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::R>>()                             \
                                    .Arg<ffi::Buffer<ffi::S32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>());                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeDecodeErr##Suffix, DecodeErrImpl<ffi::R>,                \
                                ffi::Ffi::Bind()                                            \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::R>>()                             \
                                    .Arg<ffi::Buffer<ffi::S32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>());                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeDecodeErrScaled##Suffix, DecodeErrScaledImpl<ffi::R>,    \
                                ffi::Ffi::Bind()                                            \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::R>>()                             \
                                    .Arg<ffi::Buffer<ffi::S32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>());                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeScatterUnit##Suffix, ScatterUnitImpl<ffi::R>,            \
                                ffi::Ffi::Bind()                                            \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::R>>()                             \
                                    .Arg<ffi::Buffer<ffi::S32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()                           \
                                    .Attr<float>("eps")                                     \
                                    .Ret<ffi::Buffer<ffi::F32>>()                           \
                                    .Ret<ffi::Buffer<ffi::F32>>())

SAE_ROW_KERNELS(, F32);
SAE_ROW_KERNELS(Bf16, BF16);

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeAdamCheck, AdamCheckImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("rank")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeAdamApply, AdamApplyImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("rank")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeUnitRows, UnitRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeUnitRowsVjp, UnitRowsVjpImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeRowNorms, RowNormsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>());
