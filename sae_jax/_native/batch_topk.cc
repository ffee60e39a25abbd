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

// A threshold for the n best of a cell's (B, M) matrix x_bj = pre[b * stride + j] + bias_j: the
// r-th largest of whole sample rows, spread evenly over the batch (samples are independent, so
// their entries are a sample of the matrix's with every latent in it; about kSampleEntries of
// them), r chosen so that about (over4 / 4) n entries reach it; -inf (every entry) where those
// would be half the matrix or more.
constexpr int64_t kBatchSampleEntries = int64_t{1} << 15;

float BatchThreshold(const float* pre, int64_t stride, const float* bias, int64_t b, int64_t m,
                     int64_t n, int64_t over4, TopkScratch& s) {
  const int64_t sr = std::min<int64_t>(b, std::max<int64_t>(1, kBatchSampleEntries / m));
  const int64_t ns = sr * m;
  if (over4 * n >= 2 * b * m) return -INFINITY;
  const int64_t r = std::min<int64_t>(ns - 1, over4 * n * ns / (4 * b * m));
  s.keys.resize(ns);
  s.tmp.resize(ns + 8);
  for (int64_t q = 0; q < sr; ++q) {
    const float* row = pre + (q * b / sr) * stride;
    uint64_t* key = s.keys.data() + q * m;  // distinct keys (the flat index), as SelectLargest needs
    for (int64_t j = 0, at = (q * b / sr) * m; j < m; ++j) key[j] = Key(row[j] + bias[j], at + j);
  }
  SelectLargest(s.keys.data(), ns, r + 1, s.tmp.data());
  return KeyValue(*std::min_element(s.keys.begin(), s.keys.begin() + r + 1));
}

// The latents j with x_j + bias_j not below t (NaN included), in increasing order, and those
// sums, written to idx and val (room for m + 16 each); their count. row: scratch for m sums.
int64_t BiasedCandidates(const float* x, const float* bias, int64_t m, float t, float* row, int32_t* idx,
                         float* val) {
  int64_t c = 0, q = 0;
#ifdef __AVX512F__
  const __m512 tv = _mm512_set1_ps(t);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; q + 16 <= m; q += 16) {  // one pass: sum, compare, compress (in registers, then stored)
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(x + q), _mm512_loadu_ps(bias + q));
    const __mmask16 hit = _mm512_cmp_ps_mask(v, tv, _CMP_NLT_UQ);
    if (hit) {
      _mm512_storeu_si512(idx + c, _mm512_maskz_compress_epi32(hit, iv));
      _mm512_storeu_ps(val + c, _mm512_maskz_compress_ps(hit, v));
      c += __builtin_popcount(hit);
    }
    iv = _mm512_add_epi32(iv, step);
  }
  for (; q < m; ++q) {
    const float v = x[q] + bias[q];
    idx[c] = static_cast<int32_t>(q);
    val[c] = v;
    c += !(v < t);
  }
#else
  for (; q < m; ++q) row[q] = x[q] + bias[q];
  c = Candidates(row, m, t, idx);
  for (int64_t e = 0; e < c; ++e) val[e] = row[idx[e]];
#endif
  return c;
}

// The candidates of a range of samples: each sample's entries not below a threshold (NaN
// included), in latent order, one sample after another (their number: the samples' counts).
struct BatchCandidates {
  std::vector<int32_t> idx;
  std::vector<float> val;
  std::vector<float> row;  // scratch: one sample's sums
};

// A cell's working memory, kept by each calling thread from one call to the next: a call that
// allocated and zeroed it afresh (as large blocks are, with their page faults) took about as
// long as its selection.
struct BatchScratch {
  TopkScratch s;
  std::vector<BatchCandidates> part;
  std::vector<int64_t> count, first, at;
  std::vector<uint64_t> keys, sel, tmp;

  // After a call: gives back everything once it holds more than 64 MiB (what an unusually large
  // call took, such as one where every entry became a candidate).
  void Trim() {
    size_t bytes = (keys.capacity() + sel.capacity() + tmp.capacity() + s.keys.capacity() + s.tmp.capacity()) * 8;
    for (const BatchCandidates& c : part) bytes += (c.idx.capacity() + c.val.capacity() + c.row.capacity()) * 4;
    if (bytes > (size_t{64} << 20)) *this = BatchScratch();
  }
};

// v with room for at least n elements (it only grows, so a kept vector is not zeroed again).
template <class T>
T* Room(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// The n best entries of one cell's (B, M) matrix x_bj = pre[b * stride + j] + bias_j in the order
// of `Key` (flat index b M + j: ties go to the lower one, as lax.top_k's over the flattened
// matrix), laid out by sample: sample b's entries, in increasing latent order, fill ceil(c_b / J)
// consecutive rows of J slots, the rows of sample 0 first; slots and rows past them hold value 0,
// latent 0, sample 0. A threshold from sample rows (`BatchThreshold`), candidates per sample on
// every core, an exact selection among them (as `TopkRow`'s: when fewer than n candidates reach
// the threshold, every entry is one), then each sample's rows written.
void BatchTopkCell(const float* pre, int64_t stride, const float* bias, int64_t b, int64_t m,
                   int64_t n, int64_t rows, int64_t J, float* ov, int32_t* oi, int32_t* os,
                   float* othr) {
  thread_local BatchScratch scratch;
  TopkScratch& s = scratch.s;
  std::vector<BatchCandidates>& part = scratch.part;
  std::vector<int64_t>&count = scratch.count, &first = scratch.first, &at = scratch.at;
  std::vector<uint64_t>&keys = scratch.keys, &sel = scratch.sel, &tmp = scratch.tmp;
  // about 1.5 n candidates: a threshold from 2^15 entries places 1.5 n to well within n's
  // distance (its shortfall below n, when every entry becomes a candidate, is rare)
  const float t = BatchThreshold(pre, stride, bias, b, m, n, 6, s);
  // ranges of samples, each with its candidates (several per thread, whatever their number)
  const int64_t parts = std::min<int64_t>(b, std::max<int64_t>(8, 4 * Threads()));
  if (static_cast<int64_t>(part.size()) < parts) part.resize(parts);
  count.assign(b + 1, 0);
  auto gather = [&](float thr) {
    ParallelFor(parts, 1, b * m / parts, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        BatchCandidates& c = part[p];
        for (int64_t r = p * b / parts, used = 0; r < (p + 1) * b / parts; ++r) {
          count[r] = BiasedCandidates(pre + r * stride, bias, m, thr, Room(c.row, m),
                                      Room(c.idx, used + m + 16) + used, Room(c.val, used + m + 16) + used);
          used += count[r];
        }
      }
    });
  };
  auto collect = [&] {  // every candidate's key, samples in order
    keys.clear();
    for (int64_t p = 0, r = 0; p < parts; ++p)
      for (int64_t q = 0, e = (p + 1) * b / parts; r < e; ++r)
        for (int64_t end = q + count[r]; q < end; ++q)
          keys.push_back(Key(part[p].val[q], r * m + part[p].idx[q]));
  };
  gather(t);
  collect();
  const uint64_t tkey = Key(t, 0) & ~uint64_t{0xFFFFFFFFu};
  if (t != -INFINITY &&
      std::count_if(keys.begin(), keys.end(), [&](uint64_t k) { return k >= tkey; }) < n) {
    gather(-INFINITY);  // an unlucky sample: every entry is a candidate
    collect();
  }
  sel.assign(keys.begin(), keys.end());
  Room(tmp, sel.size() + 8);
  SelectLargest(sel.data(), static_cast<int64_t>(sel.size()), n, tmp.data());
  const uint64_t last = *std::min_element(sel.begin(), sel.begin() + n);  // the n-th best
  *othr = KeyValue(last);
  // each sample's first row (after the prefix sum), and its first candidate in `keys`
  first.assign(b + 1, 0);
  at.assign(b + 1, 0);
  for (int64_t r = 0, q = 0; r < b; ++r) {
    at[r] = q;
    int64_t c = 0;
    for (int64_t end = q + count[r]; q < end; ++q) c += keys[q] >= last;
    first[r + 1] = first[r] + (c + J - 1) / J;
  }
  std::fill(ov, ov + rows * J, 0.0f);
  std::fill(oi, oi + rows * J, 0);
  std::fill(os, os + rows, 0);
  for (int64_t r = 0; r < b; ++r) {
    int64_t slot = first[r] * J;
    for (int64_t q = at[r], end = at[r] + count[r]; q < end; ++q) {
      if (keys[q] < last) continue;
      ov[slot] = KeyValue(keys[q]);
      oi[slot++] = static_cast<int32_t>(KeyIndex(keys[q]) - r * m);
    }
    for (int64_t q = first[r]; q < first[r + 1]; ++q) os[q] = static_cast<int32_t>(r);
  }
  scratch.Trim();
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
