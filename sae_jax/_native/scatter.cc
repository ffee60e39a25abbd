// The decoder's deterministic scatter-add (and, fused with it, the unit-norm VJP of its rows):
//   sae_scatter     w (.., N, J), r (.., N, D), i (.., N, J) -> out (.., L, D), col (.., L)
//                   out_l = sum_{(n,j): i_nj = l} w_nj r_n,  col_l = sum_{(n,j): i_nj = l} w_nj
//                   (entries summed in increasing (n, j): the result does not depend on threads)
//   sae_scatter_unit  w, r, i as sae_scatter, D (.., L, D), n (.., L, 1); eps -> out, col: out_l
//                   as sae_scatter's, then sae_unit_rows_vjp's dL/dD_l for cotangent out_l
//   (the _bf16 twins: r bfloat16, each element widened to float32 as it is read; float32 sums
//   and outputs)
//
// Indices outside [0, L) are dropped.
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

// The scatter-add walks one cell's (row, slot) entries grouped by blocks of rows, and within a
// block by latent, in increasing latent order: a block's rows (B_b x D floats, sized to stay in the
// L2 cache) are read at random while the output streams through once per block in address order.
// (decode_err.cc indexes a large table's entries the same way.) The gather and the dot products go
// row by row instead (gather.cc).
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

}  // namespace

// The sae_scatter, sae_scatter_unit targets, once per row type (float32, or bfloat16: _bf16).
#define SAE_SCATTER_TARGETS(suffix, Suffix, R)                                               \
  SAE_FFI_TARGET(sae_scatter##suffix, SaeScatter##Suffix, ScatterImpl<ffi::R>,               \
                 BindCodes<ffi::R>()                                                         \
                     .Ret<ffi::Buffer<ffi::F32>>()                                           \
                     .Ret<ffi::Buffer<ffi::F32>>());                                         \
  SAE_FFI_TARGET(sae_scatter_unit##suffix, SaeScatterUnit##Suffix, ScatterUnitImpl<ffi::R>,  \
                 BindCodes<ffi::R>()                                                         \
                     .Arg<ffi::Buffer<ffi::F32>>()                                           \
                     .Arg<ffi::Buffer<ffi::F32>>()                                           \
                     .Attr<float>("eps")                                                     \
                     .Ret<ffi::Buffer<ffi::F32>>()                                           \
                     .Ret<ffi::Buffer<ffi::F32>>())

SAE_SCATTER_TARGETS(, , F32);
SAE_SCATTER_TARGETS(_bf16, Bf16, BF16);
