// Per-row top-k:
//   sae_topk        pre (.., N, M), bias (.., P, M)     -> v (.., N, K), i (.., N, K)
//                   per row n the K largest entries of pre_n + bias_{n mod P}, in no particular
//                   order; ties: the lower index wins (lax.top_k's choice); NaN above +inf
//
// Part of sparse_kernels.cc's translation unit (included there, after the families it uses).

namespace {

// An entry as one integer key: larger key = better (the larger value; on equal values, the lower
// index), so that selection and sorting compare integers. Values map to unsigned integers in
// IEEE total order (negative ones bit-flipped).
inline uint64_t Key(float v, int64_t i) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;
  return (static_cast<uint64_t>(u) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}
inline int32_t KeyIndex(uint64_t key) { return static_cast<int32_t>(0xFFFFFFFFu - (key & 0xFFFFFFFFu)); }
inline float KeyValue(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u ^= (u >> 31) ? 0x80000000u : 0xFFFFFFFFu;  // back from the key's order to float bits
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

#if !defined(__AVX512F__) && defined(__AVX2__)
// AVX2 has no compress: a vpermd by a table row moves the lanes a mask selects to the front, in
// order. perm32[m]: the 32-bit lanes set in the 8-bit mask m; perm64[m]: the 64-bit lanes set in
// the 4-bit mask m (as pairs of 32-bit lanes).
struct CompressTables {
  alignas(32) int32_t perm32[256][8] = {};
  alignas(32) int32_t perm64[16][8] = {};
  CompressTables() {
    for (int m = 0; m < 256; ++m)
      for (int l = 0, c = 0; l < 8; ++l)
        if (m >> l & 1) perm32[m][c++] = l;
    for (int m = 0; m < 16; ++m)
      for (int l = 0, c = 0; l < 4; ++l)
        if (m >> l & 1) {
          perm64[m][c++] = 2 * l;
          perm64[m][c++] = 2 * l + 1;
        }
  }
};
const CompressTables kCompress;
inline __m256i Perm(const int32_t* row) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(row)); }
#endif

// Moves a's n keys greater than p to its front, the rest (p among them) after them, and returns
// how many are greater. tmp: room for n + 8 keys.
int64_t Partition(uint64_t* a, int64_t n, uint64_t p, uint64_t* tmp) {
  int64_t g = 0, l = 0, q = 0;
#ifdef __AVX512F__
  const __m512i pv = _mm512_set1_epi64(static_cast<long long>(p));
  for (; q + 8 <= n; q += 8) {  // compress in registers, then full stores (a: only read slots)
    const __m512i v = _mm512_loadu_si512(a + q);
    const __mmask8 gt = _mm512_cmpgt_epu64_mask(v, pv);
    _mm512_storeu_si512(a + g, _mm512_maskz_compress_epi64(gt, v));
    _mm512_storeu_si512(tmp + l, _mm512_maskz_compress_epi64(static_cast<__mmask8>(~gt), v));
    const int c = __builtin_popcount(gt);
    g += c;
    l += 8 - c;
  }
#elif defined(__AVX2__)
  const __m256i sign = _mm256_set1_epi64x(INT64_MIN);  // unsigned order as signed, sign flipped
  const __m256i pv = _mm256_xor_si256(_mm256_set1_epi64x(static_cast<long long>(p)), sign);
  for (; q + 4 <= n; q += 4) {  // the same with 4 keys and a table's permutation
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + q));
    const int gt = _mm256_movemask_pd(_mm256_castsi256_pd(_mm256_cmpgt_epi64(_mm256_xor_si256(v, sign), pv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + g), _mm256_permutevar8x32_epi32(v, Perm(kCompress.perm64[gt])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp + l),
                        _mm256_permutevar8x32_epi32(v, Perm(kCompress.perm64[~gt & 15])));
    const int c = __builtin_popcount(gt);
    g += c;
    l += 4 - c;
  }
#endif
  for (; q < n; ++q) {  // both stores, no branch (which the data would mispredict half the time)
    const uint64_t v = a[q];
    const int64_t gt = v > p;
    a[g] = v;  // g <= q: a slot already read
    tmp[l] = v;
    g += gt;
    l += 1 - gt;
  }
  std::memcpy(a + g, tmp, l * sizeof(uint64_t));
  return g;
}

// Moves the k largest of a's n distinct keys to its front, in no particular order (a quickselect
// on a median of three; each partition in vector registers). It replaced std::nth_element and a
// heap, whose branches took about 40% of the top-k's time: the top-k of a (4096, 2, 4096) matrix
// went from about 29 to 20 ms at k 128 (interleaved in one process on the AMD EPYC). tmp: room
// for n + 8 keys.
void SelectLargest(uint64_t* a, int64_t n, int64_t k, uint64_t* tmp) {
  int64_t lo = 0, hi = n;  // the answer: a[0, lo) and the k - lo largest of a[lo, hi)
  while (hi - lo > 16 && lo < k) {
    const uint64_t x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
    const uint64_t p = std::max(std::min(x, y), std::min(std::max(x, y), z));
    const int64_t g = Partition(a + lo, hi - lo, p, tmp);
    if (lo + g >= k) {
      hi = lo + g;
    } else {  // all g are in, and so is p, the largest of the rest
      lo += g;
      std::swap(a[lo], *std::find(a + lo, a + hi, p));
      ++lo;
    }
  }
  if (lo < k) std::sort(a + lo, a + hi, std::greater<uint64_t>());
}

// The indices q with x[q] not below t (NaN included), in increasing order, written to out (room
// for m + 16); their count.
int64_t Candidates(const float* x, int64_t m, float t, int32_t* out) {
  int64_t c = 0, q = 0;
#ifdef __AVX512F__
  const __m512 tv = _mm512_set1_ps(t);
  __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (; q + 16 <= m; q += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + q), tv, _CMP_NLT_UQ);
    if (hit) {
      // compress in a register, then a full store (out has 16 spare slots): the memory form
      // of vpcompressd is microcoded and slow on AMD Zen 4
      _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi32(hit, iv));
      c += __builtin_popcount(hit);
    }
    iv = _mm512_add_epi32(iv, step);
  }
#elif defined(__AVX2__)
  const __m256 tv = _mm256_set1_ps(t);
  __m256i iv = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  for (; q + 8 <= m; q += 8) {  // every block stored, no branch: 1 in 16 entries is a candidate
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + q), tv, _CMP_NLT_UQ));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c),
                        _mm256_permutevar8x32_epi32(iv, Perm(kCompress.perm32[hit])));
    c += __builtin_popcount(hit);
    iv = _mm256_add_epi32(iv, step);
  }
#else
  for (; q + 16 <= m; q += 16)  // most blocks hold no candidate
    for (uint32_t hit = NotBelow(F16::Load(x + q), t); hit; hit &= hit - 1)
      out[c++] = static_cast<int32_t>(q + __builtin_ctz(hit));
#endif
  for (; q < m; ++q) {
    out[c] = static_cast<int32_t>(q);
    c += !(x[q] < t);
  }
  return c;
}

// Scratch space of one thread.
struct TopkScratch {
  std::vector<float> row;
  std::vector<int32_t> cand;
  std::vector<uint64_t> keys, tmp;
};

// A threshold for the k best of m entries x[0, m) (x: a pointer, or a function of the index):
// the r-th largest of a strided sample of them, r chosen so that about (over4 / 4) k of the m
// reach it; -inf (every entry) where the sample would be under 8 per pick. The sample holds
// about 4k entries, at most max_samples.
template <class Value>
float SampledThreshold(Value x, int64_t m, int64_t k, TopkScratch& s, int64_t over4 = 8,
                       int64_t max_samples = INT64_MAX) {
  const int64_t stride = std::max(m / (4 * k), m / std::max<int64_t>(1, max_samples));
  if (stride < 2) return -INFINITY;
  const int64_t ns = m / stride;
  const int64_t r = std::min<int64_t>(ns - 1, over4 * k * ns / (4 * m));
  s.keys.resize(ns);
  s.tmp.resize(ns + 8);
  for (int64_t q = 0; q < ns; ++q) {
    if constexpr (std::is_pointer_v<Value>) {
      s.keys[q] = Key(x[q * stride], q);
    } else {
      s.keys[q] = Key(x(q * stride), q);
    }
  }
  SelectLargest(s.keys.data(), ns, r + 1, s.tmp.data());
  return KeyValue(*std::min_element(s.keys.begin(), s.keys.begin() + r + 1));
}

// Whether at least k of the c candidates x[cand[q]] are at or above t in key order (then the k
// best entries are all candidates: an entry left out is below t).
bool EnoughCandidates(const float* x, const int32_t* cand, int64_t c, float t, int64_t k) {
  const uint64_t tkey = Key(t, 0) & ~uint64_t{0xFFFFFFFFu};
  int64_t above = 0;
  for (int64_t q = 0; q < c; ++q) above += Key(x[cand[q]], 0) >= tkey;
  return above >= k;
}

// The k best of a row (pre + bias) in the order of `Key`: every entry not below a sampled
// threshold t (`SampledThreshold`; NaN included) as a candidate; an exact selection among them.
// Exact: the selection goes ahead only when at least k candidates are at or above t in key
// order; otherwise (an unlucky sample) every entry is a candidate.
void TopkRow(const float* pre, const float* bias, int64_t m, int64_t k, TopkScratch& s, float* ov,
             int32_t* oi) {
  s.row.resize(m);
  float* x = s.row.data();
  for (int64_t q = 0; q < m; ++q) x[q] = pre[q] + bias[q];
  int64_t c = m;
  s.cand.resize(m + 16);
  if (const float t = SampledThreshold(static_cast<const float*>(x), m, k, s); t != -INFINITY) {
    c = Candidates(x, m, t, s.cand.data());
    if (!EnoughCandidates(x, s.cand.data(), c, t, k)) c = m;
  }
  s.keys.resize(c);
  for (int64_t q = 0; q < c; ++q) {
    const int64_t i = c == m ? q : s.cand[q];
    s.keys[q] = Key(x[i], i);
  }
  s.tmp.resize(c + 8);
  if (c > k) SelectLargest(s.keys.data(), c, k, s.tmp.data());  // the k best first, unordered
  for (int64_t q = 0; q < k; ++q) {
    oi[q] = KeyIndex(s.keys[q]);
    ov[q] = x[oi[q]];
  }
}

ffi::Error TopkBody(ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> bias,
                    ffi::ResultBuffer<ffi::F32> vals, ffi::ResultBuffer<ffi::S32> idx) {
  auto pd = pre.dimensions(), bd = bias.dimensions(), vd = vals->dimensions();
  if (pd.size() < 2 || pd.size() != vd.size() || bd.size() != pd.size())
    return ffi::Error::InvalidArgument("sae_topk: ranks");
  const int64_t m = Dim(pd, 1), k = Dim(vd, 1), n = Dim(pd, 2), nb = Dim(bd, 2);
  Cells cells(vd, 2);
  if (k < 1 || k > m || Dim(bd, 1) != m || nb < 1 || Dim(vd, 2) != n || !Fits(cells, pd, 2) ||
      !Fits(cells, bd, 2) || m > kMaxEntries)
    return ffi::Error::InvalidArgument("sae_topk: shapes");
  const float *X = pre.typed_data(), *Bs = bias.typed_data();
  float* ov = vals->typed_data();
  int32_t* oi = idx->typed_data();
  ParallelFor(cells.count * n, 16, m, [&](int64_t a, int64_t b) {
    TopkScratch scratch;
    for (int64_t r = a; r < b; ++r) {
      const int64_t c = r / n, row = r % n;
      TopkRow(X + cells.Offset(c, pd, 2, n * m) + row * m,
              Bs + cells.Offset(c, bd, 2, nb * m) + (row % nb) * m, m, k, scratch, ov + r * k,
              oi + r * k);
    }
  });
  return ffi::Error::Success();
}

ffi::Error TopkImpl(F32Buf pre, F32Buf bias, F32Ret vals, ffi::ResultBuffer<ffi::S32> idx) {
  if (!Matrices({pre.dimensions(), bias.dimensions(), vals->dimensions()}))
    return ffi::Error::InvalidArgument("sae_topk: ranks");
  return Guard("sae_topk", [&] { return TopkBody(pre, bias, vals, idx); });
}

}  // namespace

SAE_FFI_TARGET(sae_topk, SaeTopk, TopkImpl,
               ffi::Ffi::Bind()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Arg<ffi::Buffer<ffi::F32>>()
                   .Ret<ffi::Buffer<ffi::F32>>()
                   .Ret<ffi::Buffer<ffi::S32>>());
