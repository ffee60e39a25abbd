// The decoder's forward, its error against a target and the dot products of the error's VJP, fused:
//   sae_decode_err  w (.., N, J), T (.., S, D), i (.., N, J), t (.., N, D)
//                   -> e (.., N, D), r (.., N, J), sq (.., N, 1)
//                   e_n = sum_j w_nj T[i_nj] - t_n,  r_nj = e_n . T[i_nj],  sq_n = |e_n|^2
//   sae_decode_err_scaled  the same with scale (.., S): the atoms are the rows scale_s T[s]
//                   (e_n = sum_j w_nj scale_{i_nj} T[i_nj] - t_n, r_nj = scale_{i_nj} e_n . T[i_nj])
//   (the _bf16 twins: T bfloat16, each element widened to float32 as it is read; float32 sums
//   and outputs)
//
// Indices outside [0, S) are clipped.
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

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

}  // namespace

// The sae_decode_err, sae_decode_err_scaled targets, once per row type (float32, or bfloat16: _bf16).
#define SAE_DECODE_ERR_TARGETS(suffix, Suffix, R)                                                         \
  SAE_FFI_TARGET(sae_decode_err##suffix, SaeDecodeErr##Suffix, DecodeErrImpl<ffi::R>,                     \
                 BindCodes<ffi::R>()                                                                      \
                     .Arg<ffi::Buffer<ffi::F32>>()                                                        \
                     .Ret<ffi::Buffer<ffi::F32>>()                                                        \
                     .Ret<ffi::Buffer<ffi::F32>>()                                                        \
                     .Ret<ffi::Buffer<ffi::F32>>());                                                      \
  SAE_FFI_TARGET(sae_decode_err_scaled##suffix, SaeDecodeErrScaled##Suffix, DecodeErrScaledImpl<ffi::R>,  \
                 BindCodes<ffi::R>()                                                                      \
                     .Arg<ffi::Buffer<ffi::F32>>()                                                        \
                     .Arg<ffi::Buffer<ffi::F32>>()                                                        \
                     .Ret<ffi::Buffer<ffi::F32>>()                                                        \
                     .Ret<ffi::Buffer<ffi::F32>>()                                                        \
                     .Ret<ffi::Buffer<ffi::F32>>())

SAE_DECODE_ERR_TARGETS(, , F32);
SAE_DECODE_ERR_TARGETS(_bf16, Bf16, BF16);
