// The SynthSAEBench sampler's draws (sae_jax/synth_slots.py's module docstring has the equations):
//   sae_synth_solo    z (N, K), bits (N, W), par (5, K) -> v (N, K)
//                     slot k of sample n fires when u < q, u = min((U + 1/2) 2^-32, 1^-) from the
//                     word U = bits[n, col + k], q = Phi(z_nk - t_k) (correlated) or p_k; then
//                     v = relu(mu_k + sigma_k Phi^-1(u / q)), else 0
//   sae_synth_groups  eps (N, R), l (B G, R), bits (N, W), par (5, B G), quad (2, Q), gate (N, G)
//                     -> v (N, B G)
//                     group g (children c at c G + g, B-major) keeps one of its active children:
//                     child c wins with probability w_c = q'_c int_0^1 prod_{j != c} (1 - q'_j (1 - t))
//                     dt (Gauss-Legendre: quad's rows 1 - t_i and the weights), q'_c = q_c r_c,
//                     q_c = Phi(eps_n . l_c - t_c) (correlated) or p_c; the word
//                     U = bits[n, col + g] picks it (T_c = floor(2^32 sum_{c' <= c} w_c'), c when
//                     T_{c-1} <= U < T_c) and its value relu(mu_c + sigma_c Phi^-1(1 - r_c v)),
//                     v = (U - T_{c-1} + 1/2) / (T_c - T_{c-1}), times the group's gate (its
//                     parent's factor); every other slot 0, and every slot of a group whose gate is 0
// par's rows: t (the threshold), p, r = P(mu + sigma g > 0), mu, sigma. Without `correlated`, z,
// eps and l are not read (pass any (1, 1) arrays).
//
// XLA computes Phi (an erfc) and Phi^-1 (an erf_inv) for every slot of every sample, and every
// group's winner before gating it; a slot fires with probability q, mostly well under 1%, and a
// group's parent is mostly off. These kernels skip a group whose gate is 0, bound q from above
// by a table of Phi on a grid (`PhiBound`), and compute q, and Phi^-1, only where u falls under
// that bound (a group: only where U is under 2^32 times its children's bounds' sum, which bounds
// T_B): each decision and value is then the XLA path's formula in float32, to a few ulps (erf_inv
// is XLA's, Giles's single-precision polynomial, but erfc and log1p are the C library's, the
// compiler may fuse multiply-adds, and a group's eps . l is this kernel's sum), so a decision can
// differ from XLA's only where u and q are within a few ulps.
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

constexpr float kOpen = 0.99999994f;        // largest float32 below 1
constexpr float kTop = 4294967040.0f;       // largest float32 below 2^32
constexpr float kTwoM32 = 2.3283064365386963e-10f;  // 2^-32

// An upper bound on Phi(d) for every float d: Phi at the grid point at or above d (grid step
// 1/32 on [-8, 8]), widened by 1e-4 relative; 2 above the grid, Phi(-8) (under 2^-33, so under
// every u) below it and for NaN (which never fires: u < NaN is false).
struct PhiBound {
  static constexpr int kSteps = 512;
  alignas(64) float table[kSteps + 2];
  PhiBound() {
    for (int i = 0; i <= kSteps; ++i) {
      const double x = -8.0 + i / 32.0;
      table[i] = static_cast<float>(0.5 * std::erfc(-x / std::sqrt(2.0)) * (1 + 1e-4) + 1e-30);
    }
    table[kSteps + 1] = 2.0f;
  }
  SAE_INLINE float operator()(float d) const {
    const float s = (d + 8.0f) * 32.0f;
    return table[s > 0.0f ? (s < kSteps ? static_cast<int>(std::ceil(s)) : kSteps + 1) : 0];
  }
};
const PhiBound& Bound() {
  static const PhiBound b;
  return b;
}

SAE_INLINE float Uniform(uint32_t w) { return std::min((static_cast<float>(w) + 0.5f) * kTwoM32, kOpen); }
// bit l: u_l < the bound on q_l (Phi's bound of z_l - t_l, or q_l = p_l without z) for 16 slots,
// u_l from the word w_l; every slot that fires has its bit set.
SAE_INLINE uint32_t MayFire16(const float* z, const float* t, const uint32_t* w, const PhiBound& bound) {
#if defined(__AVX512F__)
  const __m512 u = _mm512_min_ps(
      _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepu32_ps(_mm512_loadu_si512(w)), _mm512_set1_ps(0.5f)),
                    _mm512_set1_ps(kTwoM32)),
      _mm512_set1_ps(kOpen));
  __m512 q = _mm512_loadu_ps(t);
  if (z) {  // max(s, 0) is 0 for NaN s
    __m512 s = _mm512_mul_ps(_mm512_add_ps(_mm512_sub_ps(_mm512_loadu_ps(z), q), _mm512_set1_ps(8.0f)),
                             _mm512_set1_ps(32.0f));
    s = _mm512_min_ps(_mm512_max_ps(s, _mm512_setzero_ps()), _mm512_set1_ps(PhiBound::kSteps + 1.0f));
    const __m512i i = _mm512_cvt_roundps_epi32(s, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    q = _mm512_i32gather_ps(i, bound.table, 4);
  }
  return _mm512_cmp_ps_mask(u, q, _CMP_LT_OQ);
#else
  uint32_t m = 0;
  for (int l = 0; l < 16; ++l)
    m |= static_cast<uint32_t>(Uniform(w[l]) < (z ? bound(z[l] - t[l]) : t[l])) << l;
  return m;
#endif
}

SAE_INLINE float Phi(float d) { return 0.5f * std::erfc(d * -0.70710677f); }  // 0.5 erfc((t - z) / sqrt 2)

// erf^-1(x) for float32, XLA's (Giles, "Approximating the erfinv function", single precision).
SAE_INLINE float ErfInv(float x) {
  float w = -std::log1p(-x * x), p;
  if (w < 5.0f) {
    w = w - 2.5f;
    p = 2.81022636e-08f;
    p = 3.43273939e-07f + p * w;
    p = -3.5233877e-06f + p * w;
    p = -4.39150654e-06f + p * w;
    p = 0.00021858087f + p * w;
    p = -0.00125372503f + p * w;
    p = -0.00417768164f + p * w;
    p = 0.246640727f + p * w;
    p = 1.50140941f + p * w;
  } else {
    w = std::sqrt(w) - 3.0f;
    p = -0.000200214257f;
    p = 0.000100950558f + p * w;
    p = 0.00134934322f + p * w;
    p = -0.00367342844f + p * w;
    p = 0.00573950773f + p * w;
    p = -0.0076224613f + p * w;
    p = 0.00943887047f + p * w;
    p = 1.00167406f + p * w;
    p = 2.83297682f + p * w;
  }
  return std::fabs(x) == 1.0f ? x * INFINITY : p * x;
}
// Phi^-1(y), y clipped to [0, 1] and 2 y - 1 to (-1, 1) (|g| <= 5.4, as jax.random.normal).
SAE_INLINE float Ndtri(float y) {
  y = std::min(std::max(y, 0.0f), 1.0f);
  return 1.4142135f * ErfInv(std::min(std::max(2.0f * y - 1.0f, -kOpen), kOpen));
}

enum Par { kThresh = 0, kProbs, kPos, kMean, kStd, kPars };

// bits (N, W) holds the words' columns col .. col + cols, par (kPars, K) for out (N, K).
bool WordsAndPars(ffi::Span<const int64_t> bd, ffi::Span<const int64_t> pd, ffi::Span<const int64_t> od,
                  int64_t col, int64_t cols) {
  return bd.size() == 2 && pd.size() == 2 && od.size() == 2 && bd[0] == od[0] && pd[0] == kPars &&
         pd[1] == od[1] && col >= 0 && cols <= bd[1] && col <= bd[1] - cols;
}

ffi::Error SynthSoloImpl(F32Buf z, ffi::Buffer<ffi::U32> bits, F32Buf par, F32Ret out, int64_t col,
                         int64_t correlated) {
  auto od = out->dimensions();
  auto zd = z.dimensions();
  if (!WordsAndPars(bits.dimensions(), par.dimensions(), od, col, od.size() == 2 ? od[1] : 0) || zd.size() != 2 ||
      (correlated && (zd[0] != od[0] || zd[1] != od[1])))
    return ffi::Error::InvalidArgument("sae_synth_solo: shapes");
  const int64_t n = od[0], k = od[1], w = bits.dimensions()[1];
  const float *P = par.typed_data(), *t = P + kThresh * k, *p = P + kProbs * k, *mu = P + kMean * k,
              *sd = P + kStd * k;
  const uint32_t* U = bits.typed_data();
  float* O = out->typed_data();
  const PhiBound& bound = Bound();
  return Guard("sae_synth_solo", [&] {
    ParallelFor(n, 8, k, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* ur = U + r * w + col;
        const float* zr = correlated ? z.typed_data() + r * k : nullptr;
        float* o = O + r * k;
        std::fill(o, o + k, 0.0f);
        auto fire = [&](int64_t j) {  // slot j, which may fire
          const float u = Uniform(ur[j]), q = zr ? Phi(zr[j] - t[j]) : p[j];
          if (u < q) o[j] = std::max(mu[j] + sd[j] * Ndtri(u / q), 0.0f);
        };
        int64_t j = 0;
        for (; j + kLanes <= k; j += kLanes)
          for (uint32_t m = MayFire16(zr ? zr + j : nullptr, (zr ? t : p) + j, ur + j, bound); m; m &= m - 1)
            fire(j + __builtin_ctz(m));
        for (; j < k; ++j) fire(j);
      }
    });
    return ffi::Error::Success();
  });
}

ffi::Error SynthGroupsImpl(F32Buf eps, F32Buf corr, ffi::Buffer<ffi::U32> bits, F32Buf par, F32Buf quad, F32Buf gate,
                           F32Ret out, int64_t col, int64_t correlated, int64_t width) {
  auto od = out->dimensions(), gd = gate.dimensions(), ed = eps.dimensions(), cd = corr.dimensions();
  const int64_t b = width;
  if (od.size() != 2 || b < 1 || od[1] % b || !WordsAndPars(bits.dimensions(), par.dimensions(), od, col, od[1] / b) ||
      quad.dimensions().size() != 2 || quad.dimensions()[0] != 2 || gd.size() != 2 || gd[0] != od[0] ||
      gd[1] != od[1] / b || ed.size() != 2 || cd.size() != 2 ||
      (correlated && (ed[0] != od[0] || cd[0] != od[1] || cd[1] != ed[1])))
    return ffi::Error::InvalidArgument("sae_synth_groups: shapes");
  const int64_t n = od[0], k = od[1], g = k / b, w = bits.dimensions()[1], nq = quad.dimensions()[1], rk = ed[1];
  const float *E = eps.typed_data(), *L = corr.typed_data();
  const float *P = par.typed_data(), *onem = quad.typed_data(), *wts = onem + nq, *G = gate.typed_data();
  const float *t = P + kThresh * k, *p = P + kProbs * k, *pos = P + kPos * k, *mu = P + kMean * k,
              *sd = P + kStd * k;
  const uint32_t* U = bits.typed_data();
  float* O = out->typed_data();
  const PhiBound& bound = Bound();
  // T_B / 2^32 <= sum_c q'_c up to float32 rounding of the quadrature and the running sum
  const double slack = 1.001 + 1.2e-7 * static_cast<double>(2 * b + nq);
  return Guard("sae_synth_groups", [&] {
    ParallelFor(n, 8, k, [&](int64_t r0, int64_t r1) {
      std::vector<float> qa(b), fac(b), zc(b), win(b);
      std::vector<uint32_t> tc(b);
      for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* ur = U + r * w + col;
        const float *er = E + r * rk, *gr = G + r * g;
        float* o = O + r * k;
        std::fill(o, o + k, 0.0f);
        for (int64_t j = 0; j < g; ++j) {
          if (gr[j] == 0.0f) continue;  // the group's parent is off
          const uint32_t word = ur[j];
          double most = 0;  // bounds T_B / 2^32 = sum_c q'_c w_c (w_c <= 1)
          for (int64_t c = 0; c < b; ++c) {
            const int64_t s = c * g + j;
            if (correlated) {  // z = eps . l_s
              float d = 0.0f;
              for (int64_t i = 0; i < rk; ++i) d += er[i] * L[s * rk + i];
              zc[c] = d;
            }
            most += static_cast<double>(correlated ? bound(zc[c] - t[s]) : p[s]) * pos[s];
          }
          if (static_cast<double>(word) >= 4294967296.0 * slack * most) continue;  // U >= T_B: no winner
          for (int64_t c = 0; c < b; ++c) {
            const int64_t s = c * g + j;
            qa[c] = (correlated ? Phi(zc[c] - t[s]) : p[s]) * pos[s];
          }
          std::fill(win.begin(), win.end(), 0.0f);
          for (int64_t i = 0; i < nq; ++i) {  // w_c / q'_c: sum_i w_i prod_j fac_j / fac_c
            float prod = 1.0f;
            for (int64_t c = 0; c < b; ++c) prod *= (fac[c] = 1.0f - qa[c] * onem[i]);
            for (int64_t c = 0; c < b; ++c) win[c] += wts[i] * prod / fac[c];
          }
          float cum = 0.0f;
          for (int64_t c = 0; c < b; ++c) {
            cum += qa[c] * win[c];
            tc[c] = cum > 0.0f ? static_cast<uint32_t>(std::min(cum * 4294967296.0f, kTop)) : 0u;  // NaN: 0, as XLA
          }
          int64_t c = 0;
          uint32_t lo = 0;
          while (c < b && tc[c] <= word) lo = tc[c++];
          if (c == b) continue;
          const float v = (static_cast<float>(word - lo) + 0.5f) / std::max(static_cast<float>(tc[c] - lo), 1.0f);
          const int64_t s = c * g + j;
          o[s] = std::max(mu[s] + sd[s] * -Ndtri(pos[s] * v), 0.0f) * gr[j];
        }
      }
    });
    return ffi::Error::Success();
  });
}

}  // namespace

SAE_FFI_TARGET(sae_synth_solo, SaeSynthSolo, SynthSoloImpl,
               ffi::Ffi::Bind()
                   .Arg<F32Buf>()
                   .Arg<ffi::Buffer<ffi::U32>>()
                   .Arg<F32Buf>()
                   .Ret<ffi::Buffer<ffi::F32>>()
                   .Attr<int64_t>("col")
                   .Attr<int64_t>("correlated"));
SAE_FFI_TARGET(sae_synth_groups, SaeSynthGroups, SynthGroupsImpl,
               ffi::Ffi::Bind()
                   .Arg<F32Buf>()
                   .Arg<F32Buf>()
                   .Arg<ffi::Buffer<ffi::U32>>()
                   .Arg<F32Buf>()
                   .Arg<F32Buf>()
                   .Arg<F32Buf>()
                   .Ret<ffi::Buffer<ffi::F32>>()
                   .Attr<int64_t>("col")
                   .Attr<int64_t>("correlated")
                   .Attr<int64_t>("width"));
