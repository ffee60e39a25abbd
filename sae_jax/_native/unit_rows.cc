// 
// The decoder's unit-norm atoms (sae.unit_rows) and their VJP, one pass over each row:
//   sae_unit_rows      w (.., D); eps -> a (.., D), n (.., 1)
//                      s = max_i |w_i| (1 where it is 0), n = s sqrt(sum_i (w_i / s)^2) + eps, a = w / n
//   sae_row_norms      w (.., D); eps -> n (.., 1), sae_unit_rows' n alone
//   sae_unit_rows_vjp  w (.., D), n (.., 1), g (.., D); eps -> dw (.., D)
//                      dw = g / n - (g . w) / (n^2 (n - eps)) w   (the second term 0 where n = eps)
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

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

ffi::Error UnitRowsImpl(F32Buf w, float eps, F32Ret a, F32Ret n) {
  return Guard("sae_unit_rows", [&] { return UnitRowsBody(w, eps, a, n); });
}

ffi::Error RowNormsImpl(F32Buf w, float eps, F32Ret n) {
  return Guard("sae_row_norms", [&] { return RowNormsBody(w, eps, n); });
}

ffi::Error UnitRowsVjpImpl(F32Buf w, F32Buf n, F32Buf g, float eps, F32Ret dw) {
  return Guard("sae_unit_rows_vjp", [&] { return UnitRowsVjpBody(w, n, g, eps, dw); });
}

}  // namespace

SAE_FFI_TARGET(sae_unit_rows, SaeUnitRows, UnitRowsImpl,
               ffi::Ffi::Bind()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Attr<float>("eps")
                   .Ret<ffi::Buffer<ffi::F32>>()
                   .Ret<ffi::Buffer<ffi::F32>>());

SAE_FFI_TARGET(sae_unit_rows_vjp, SaeUnitRowsVjp, UnitRowsVjpImpl,
               ffi::Ffi::Bind()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Attr<float>("eps")
                   .Ret<ffi::Buffer<ffi::F32>>());

SAE_FFI_TARGET(sae_row_norms, SaeRowNorms, RowNormsImpl,
               ffi::Ffi::Bind()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Attr<float>("eps")
                   .Ret<ffi::Buffer<ffi::F32>>());
