// BatchTopK's selection over a whole batch, laid out by sample (uses topk.cc's selection):
//   sae_batch_topk  pre (B, C, M), bias (C, M); n -> v (C, R, J), i (C, R, J), s (C, R), t (C, 1)
//                   per cell c the n largest entries of the (B, M) matrix pre[:, c] + bias_c
//                   (ties: the lower flat index),
//                   by sample: sample b's c_b entries (latent order) fill ceil(c_b / J)
//                   consecutive rows of J slots, samples in order; s_r the sample of row r; slots
//                   and rows past them 0; t the n-th largest value (R >= ceil(n / J) + B)
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

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

ffi::Error BatchTopkImpl(F32Buf pre, F32Buf bias, int64_t n, F32Ret vals, ffi::ResultBuffer<ffi::S32> idx,
                         ffi::ResultBuffer<ffi::S32> sample, F32Ret thr) {
  return Guard("sae_batch_topk", [&] { return BatchTopkBody(pre, bias, n, vals, idx, sample, thr); });
}

}  // namespace

SAE_FFI_TARGET(sae_batch_topk, SaeBatchTopk, BatchTopkImpl,
               ffi::Ffi::Bind()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Attr<int64_t>("n")
                   .Ret<ffi::Buffer<ffi::F32>>()
                   .Ret<ffi::Buffer<ffi::S32>>()
                   .Ret<ffi::Buffer<ffi::S32>>()
                   .Ret<ffi::Buffer<ffi::F32>>());
