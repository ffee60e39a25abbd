// The decoder's row gather-sum and the dot products of its VJP:
//   sae_gather_sum  w (.., N, J), T (.., S, D), i (.., N, J) -> out (.., N, D)
//                   out_n = sum_j w_nj T[i_nj] (summed in slot order j)
//   sae_dots        r (.., N, D), T (.., S, D), i (.., N, J) -> out (.., N, J)
//                   out_nj = r_n . T[i_nj]
//   (sae_gather_sum_bf16, sae_dots_bf16: T and r bfloat16, each element widened to float32 as it
//   is read; float32 sums and outputs)
//
// Indices outside [0, S) are clipped.
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

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

}  // namespace

// The sae_gather_sum, sae_dots targets, once per row type (float32, or bfloat16: _bf16).
#define SAE_GATHER_TARGETS(suffix, Suffix, R)                                          \
  SAE_FFI_TARGET(sae_gather_sum##suffix, SaeGatherSum##Suffix, GatherSumImpl<ffi::R>,  \
                 BindCodes<ffi::R>()                                                   \
                     .Ret<ffi::Buffer<ffi::F32>>());                                   \
  SAE_FFI_TARGET(sae_dots##suffix, SaeDots##Suffix, DotsImpl<ffi::R>,                  \
                 ffi::Ffi::Bind()                                                      \
                     .Arg<ffi::Buffer<ffi::R>>()                                       \
                     .Arg<ffi::Buffer<ffi::R>>()                                       \
                     .Arg<ffi::Buffer<ffi::S32>>()                                     \
                     .Ret<ffi::Buffer<ffi::F32>>())

SAE_GATHER_TARGETS(, , F32);
SAE_GATHER_TARGETS(_bf16, Bf16, BF16);
