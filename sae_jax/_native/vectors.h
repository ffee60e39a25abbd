// F16, the 16 float lanes every kernel is written in.

#pragma once

#include "common.h"

namespace {

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
// bit l: x_l != 0 (NaN included)
SAE_INLINE uint32_t NonZero(F16 x) { return _mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_NEQ_UQ); }
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
SAE_INLINE uint32_t NonZero(F16 x) {
  const __m256 z = _mm256_setzero_ps();
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x.lo, z, _CMP_NEQ_UQ))) |
         (static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(x.hi, z, _CMP_NEQ_UQ))) << 8);
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
SAE_INLINE uint32_t NonZero(F16 x) {
  uint32_t m = 0;
  for (int l = 0; l < 16; ++l) m |= static_cast<uint32_t>(!(x.x[l] == 0.0f)) << l;
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

}  // namespace
