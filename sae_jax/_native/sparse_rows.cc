// A dense matrix of mostly zero rows times a table (the SynthSAEBench sampler's x = V W,
// sae_jax/synth_slots.py):
//   sae_sparse_rows  v (.., N, P), T (.., P, D) -> out (.., N, D)
//                    out_n = sum over p with v_np != 0 of v_np T_p, in increasing p (an entry
//                    that is NaN counts as nonzero)
//
// A GEMM makes P D multiply-adds per row; this one scans the row for its nonzeros, 16 entries at
// a time, and adds only their table rows (`GatherRowTiles`): the sampler's rows hold a few dozen
// nonzeros among about 10^3 slots.
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

// The columns of v's nonzero (or NaN) entries, in increasing order, written to nz; their count.
int64_t Nonzeros(const float* v, int64_t p, int64_t* nz) {
  int64_t c = 0, q = 0;
  for (; q + kLanes <= p; q += kLanes) {
    for (uint32_t m = NonZero(F16::Load(v + q)); m; m &= m - 1) nz[c++] = q + __builtin_ctz(m);
  }
  for (; q < p; ++q)
    if (!(v[q] == 0.0f)) nz[c++] = q;
  return c;
}

ffi::Error SparseRowsBody(ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> table,
                          ffi::ResultBuffer<ffi::F32> out) {
  auto vd = v.dimensions(), td = table.dimensions(), od = out->dimensions();
  const int64_t n = Dim(vd, 2), p = Dim(vd, 1), d = Dim(td, 1);
  Cells cells(od, 2);
  if (Dim(td, 2) != p || Dim(od, 2) != n || Dim(od, 1) != d || p > kMaxEntries || !Fits(cells, vd, 2) ||
      !Fits(cells, td, 2))
    return ffi::Error::InvalidArgument("sae_sparse_rows: shapes");
  const float *V = v.typed_data(), *T = table.typed_data();
  float* O = out->typed_data();
  ParallelFor(cells.count * n, 16, p + 16 * d, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> nz(p), at(p);
    std::vector<float> w(p);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r / n, row = r % n;
      const float* vr = V + cells.Offset(c, vd, 2, n * p) + row * p;
      const float* t = T + cells.Offset(c, td, 2, p * d);
      const int64_t jn = Nonzeros(vr, p, nz.data());
      for (int64_t j = 0; j < jn; ++j) {
        w[j] = vr[nz[j]];
        at[j] = nz[j] * d;
      }
      float* o = O + r * d;
      int64_t t0 = GatherRowTiles<kTile>(w.data(), jn, t, d, o, at.data(), 0);
      t0 = GatherRowTiles<1>(w.data(), jn, t, d, o, at.data(), t0);
      if (t0 < d) {
        std::fill(o + t0, o + d, 0.0f);
        for (int64_t j = 0; j < jn; ++j) Axpy(w[j], t + at[j] + t0, o + t0, d - t0);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error SparseRowsImpl(F32Buf v, F32Buf table, F32Ret out) {
  if (!Matrices({v.dimensions(), table.dimensions(), out->dimensions()}))
    return ffi::Error::InvalidArgument("sae_sparse_rows: ranks");
  return Guard("sae_sparse_rows", [&] { return SparseRowsBody(v, table, out); });
}

}  // namespace

SAE_FFI_TARGET(sae_sparse_rows, SaeSparseRows, SparseRowsImpl,
               ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
