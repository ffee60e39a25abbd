// Adam's step (optax.scale_by_adam, then p - lr u) with the grid's divergence rule, in two passes
// over each parameter instead of XLA's many (one fusion per moment, per select, per finite check):
//   sae_adam_check  p, g, m, v (.., P), coef (.., 9); rank (of P) -> ok (.., 1)
//                   ok = 1 if every g and every p' = p - lr u is finite, else 0, where
//                   m' = c1 g + b1 m,  v' = c2 g^2 + b2 v,  u = (m' r1) / (sqrt(v' r2 + eps_root) + eps)
//                   and coef = (b1, c1, b2, c2, r1, r2, eps, eps_root, lr) (c = 1 - b, r = 1/(1 - b^t))
//   sae_adam_apply  p, g, m, v (.., P), coef (.., 9), keep (.., 1); rank -> p', m', v' (.., P), in place:
//                   (p', m', v') as above, or (p, m, v) unchanged where keep != 0
//                   (rounded as XLA:CPU rounds optax's step: the division by 1 - b^t as a product
//                   with its reciprocal, c1 g + (b1 m), c2 g^2 + (b2 v) and p - lr u as fmas)
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

// Each element rounds as XLA:CPU's fusion of optax's step does: the fmas written out, no other
// contraction (hence the pragmas, which hold to pop_options / float_control(pop)), IEEE sqrt and
// division.
#ifdef __clang__
#pragma float_control(push)
#pragma clang fp contract(off)
#else
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
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

#ifdef __clang__
#pragma float_control(pop)
#else
#pragma GCC pop_options
#endif

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

// The arguments both targets start with, in order: p, g, m, v (.., P) and coef (.., 9), float32.
auto BindAdam() {
  return ffi::Ffi::Bind().Arg<F32Buf>().Arg<F32Buf>().Arg<F32Buf>().Arg<F32Buf>().Arg<F32Buf>();
}

ffi::Error AdamCheckImpl(F32Buf p, F32Buf g, F32Buf m, F32Buf v, F32Buf coef, int64_t rank, F32Ret ok) {
  return Guard("sae_adam_check", [&] { return AdamCheckBody(p, g, m, v, coef, rank, ok); });
}

ffi::Error AdamApplyImpl(F32Buf p, F32Buf g, F32Buf m, F32Buf v, F32Buf coef, F32Buf keep, int64_t rank,
                         F32Ret po, F32Ret mo, F32Ret vo) {
  return Guard("sae_adam_apply", [&] { return AdamApplyBody(p, g, m, v, coef, keep, rank, po, mo, vo); });
}

}  // namespace

SAE_FFI_TARGET(sae_adam_check, SaeAdamCheck, AdamCheckImpl,
               BindAdam()
                   .Attr<int64_t>("rank")
                   .Ret<ffi::Buffer<ffi::F32>>());

SAE_FFI_TARGET(sae_adam_apply, SaeAdamApply, AdamApplyImpl,
               BindAdam()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Attr<int64_t>("rank")
                   .Ret<ffi::Buffer<ffi::F32>>()
                   .Ret<ffi::Buffer<ffi::F32>>()
                   .Ret<ffi::Buffer<ffi::F32>>());
