// CPU kernels for the TopK sparse decoder (sae_jax/sparse.py), as XLA FFI custom calls.
//
// XLA:CPU's TopK is a single-threaded partial sort over an index array and its row gathers and
// scatter-adds run far below the machine's GEMM rate; these kernels do the same work in one pass
// over each row, on every core (sae_jax/native.py compiles this file on first use).
//
// Every array may carry leading "cell" dimensions (a vmapped group); an input whose leading
// dimension is 1 where the output's is not is shared by every cell (vmap_method="expand_dims").
//
//   sae_topk        pre (.., N, M)                       -> v (.., N, K), i (.., N, K)
//                   per row the K largest entries, descending; ties: the lower index first
//                   (lax.top_k's order)
//   sae_gather_sum  w (.., N, J), T (.., S, D), i (.., N, J) -> out (.., N, D)
//                   out_n = sum_j w_nj T[i_nj]
//   sae_dots        r (.., N, D), T (.., S, D), i (.., N, J) -> out (.., N, J)
//                   out_nj = r_n . T[i_nj]
//   sae_scatter     w (.., N, J), r (.., N, D), i (.., N, J) -> out (.., L, D), col (.., L)
//                   out_l = sum_{(n,j): i_nj = l} w_nj r_n,  col_l = sum_{(n,j): i_nj = l} w_nj
//                   (entries summed in increasing (n, j): the result does not depend on threads)
//
// Indices outside [0, S) (gathers) or [0, L) (scatter) are clipped (gathers) or dropped (scatter).

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

int Threads() {
  static const int n = [] {
    if (const char* e = std::getenv("SAE_JAX_NATIVE_THREADS"); e && std::atoi(e) > 0)
      return std::atoi(e);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return n;
}

// f(begin, end) over [0, n), split into one contiguous range per thread.
template <class F>
void ParallelFor(int64_t n, int64_t min_per_thread, F&& f) {
  int64_t t = std::min<int64_t>(Threads(), std::max<int64_t>(1, n / std::max<int64_t>(1, min_per_thread)));
  if (t <= 1) {
    f(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < t; ++w) pool.emplace_back([&f, n, t, w] { f(n * w / t, n * (w + 1) / t); });
  f(int64_t{0}, n / t);
  for (auto& th : pool) th.join();
}

// The cell layout of one call: the output's leading dimensions, and for each input the offset
// (in elements) of the matrix a given output cell reads.
struct Cells {
  std::vector<int64_t> lead;  // output leading dims
  int64_t count = 1;

  explicit Cells(ffi::Span<const int64_t> out_dims, int trailing) {
    for (size_t a = 0; a + trailing < out_dims.size(); ++a) lead.push_back(out_dims[a]);
    for (int64_t d : lead) count *= d;
  }
  // Element offset of cell c's matrix in an input of dims `dims` (its leading dims are the
  // output's or 1), where one matrix holds `inner` elements.
  int64_t Offset(int64_t c, ffi::Span<const int64_t> dims, int trailing, int64_t inner) const {
    int64_t rank_lead = static_cast<int64_t>(dims.size()) - trailing;
    int64_t off = 0, stride = inner;
    for (int64_t a = static_cast<int64_t>(lead.size()) - 1, b = rank_lead - 1; a >= 0; --a, --b) {
      int64_t coord = c % lead[a];
      c /= lead[a];
      if (b < 0) continue;
      if (dims[b] != 1) off += coord * stride;
      stride *= dims[b];
    }
    return off;
  }
};

int64_t Dim(ffi::Span<const int64_t> d, int from_end) { return d[d.size() - from_end]; }

// ----------------------------------------------------------------------------- top-k
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

// The r-th largest (0-based) of n floats: a min-heap of the r + 1 largest seen.
float RankValue(const float* a, int64_t n, int64_t r, std::vector<float>& heap) {
  heap.assign(a, a + r + 1);
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  for (int64_t q = r + 1; q < n; ++q) {
    if (a[q] > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
      heap.back() = a[q];
      std::push_heap(heap.begin(), heap.end(), std::greater<float>());
    }
  }
  return heap.front();
}

// Scratch space of one thread.
struct TopkScratch {
  std::vector<float> sample, heap;
  std::vector<int32_t> cand;
  std::vector<uint64_t> keys;
};

// The k best of a row: a threshold t, the r-th largest of a strided sample of about 4k entries
// (r chosen so that about 2k of the row's m entries reach it); every entry >= t as a candidate;
// an exact selection among the candidates. If fewer than k entries reach t (an unlucky sample,
// NaN), every entry is a candidate. Exact either way: an entry left out is below t, and at
// least k entries are not.
void TopkRow(const float* x, int64_t m, int64_t k, TopkScratch& s, float* ov, int32_t* oi) {
  int64_t c = m;
  s.cand.resize(m);
  const int64_t stride = m / (4 * k);
  if (stride >= 2) {
    const int64_t ns = m / stride;
    s.sample.resize(ns);
    for (int64_t q = 0; q < ns; ++q) s.sample[q] = x[q * stride];
    const float t = RankValue(s.sample.data(), ns, std::min<int64_t>(ns - 1, 2 * k * ns / m), s.heap);
    c = 0;
    for (int64_t q = 0; q < m; ++q) {
      s.cand[c] = static_cast<int32_t>(q);
      c += x[q] >= t;
    }
  }
  if (c < k) c = m;
  s.keys.resize(c);
  for (int64_t q = 0; q < c; ++q) {
    const int64_t i = c == m ? q : s.cand[q];
    s.keys[q] = Key(x[i], i);
  }
  std::nth_element(s.keys.begin(), s.keys.begin() + (k - 1), s.keys.end(), std::greater<uint64_t>());
  std::sort(s.keys.begin(), s.keys.begin() + k, std::greater<uint64_t>());  // best first
  for (int64_t q = 0; q < k; ++q) {
    oi[q] = KeyIndex(s.keys[q]);
    ov[q] = x[oi[q]];
  }
}

ffi::Error TopkImpl(ffi::Buffer<ffi::F32> pre, ffi::ResultBuffer<ffi::F32> vals,
                    ffi::ResultBuffer<ffi::S32> idx) {
  auto pd = pre.dimensions();
  auto vd = vals->dimensions();
  if (pd.size() < 2 || pd.size() != vd.size()) return ffi::Error::InvalidArgument("sae_topk: ranks");
  const int64_t m = Dim(pd, 1), k = Dim(vd, 1);
  if (k < 1 || k > m) return ffi::Error::InvalidArgument("sae_topk: k must be in [1, m]");
  const int64_t rows = pre.element_count() / m;
  const float* x = pre.typed_data();
  float* ov = vals->typed_data();
  int32_t* oi = idx->typed_data();
  ParallelFor(rows, 16, [&](int64_t a, int64_t b) {
    TopkScratch scratch;
    for (int64_t r = a; r < b; ++r) TopkRow(x + r * m, m, k, scratch, ov + r * k, oi + r * k);
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- gathers
inline int64_t Clip(int32_t i, int64_t s) { return i < 0 ? 0 : (i >= s ? s - 1 : i); }

// a . b in kLanes partial sums (a fixed order the compiler can keep in vector registers).
constexpr int64_t kLanes = 16;
inline float Dot(const float* a, const float* b, int64_t d) {
  float part[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= d; e += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[e + l] * b[e + l];
  float acc = 0.0f;
  for (; e < d; ++e) acc += a[e] * b[e];
  for (int64_t l = 0; l < kLanes; ++l) acc += part[l];
  return acc;
}

ffi::Error GatherSumImpl(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> table,
                         ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  auto wd = w.dimensions(), td = table.dimensions(), id = idx.dimensions(), od = out->dimensions();
  const int64_t n = Dim(od, 2), d = Dim(od, 1), jn = Dim(wd, 1), s = Dim(td, 2);
  if (Dim(td, 1) != d || Dim(id, 1) != jn || Dim(wd, 2) != n || Dim(id, 2) != n)
    return ffi::Error::InvalidArgument("sae_gather_sum: shapes");
  Cells cells(od, 2);
  const float *W = w.typed_data(), *T = table.typed_data();
  const int32_t* I = idx.typed_data();
  float* O = out->typed_data();
  ParallelFor(cells.count * n, 64, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const int64_t c = r / n, row = r % n;
      const float* wr = W + cells.Offset(c, wd, 2, n * jn) + row * jn;
      const int32_t* ir = I + cells.Offset(c, id, 2, n * jn) + row * jn;
      const float* t = T + cells.Offset(c, td, 2, s * d);
      float* o = O + r * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t j = 0; j < jn; ++j) {
        const float wj = wr[j];
        const float* src = t + Clip(ir[j], s) * d;
        for (int64_t e = 0; e < d; ++e) o[e] += wj * src[e];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error DotsImpl(ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::F32> table,
                    ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out) {
  auto rd = rows.dimensions(), td = table.dimensions(), id = idx.dimensions(), od = out->dimensions();
  const int64_t n = Dim(od, 2), jn = Dim(od, 1), d = Dim(rd, 1), s = Dim(td, 2);
  if (Dim(td, 1) != d || Dim(rd, 2) != n || Dim(id, 2) != n || Dim(id, 1) != jn)
    return ffi::Error::InvalidArgument("sae_dots: shapes");
  Cells cells(od, 2);
  const float *R = rows.typed_data(), *T = table.typed_data();
  const int32_t* I = idx.typed_data();
  float* O = out->typed_data();
  ParallelFor(cells.count * n, 64, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) {
      const int64_t c = r / n, row = r % n;
      const float* x = R + cells.Offset(c, rd, 2, n * d) + row * d;
      const int32_t* ir = I + cells.Offset(c, id, 2, n * jn) + row * jn;
      const float* t = T + cells.Offset(c, td, 2, s * d);
      for (int64_t j = 0; j < jn; ++j) {
        O[r * jn + j] = Dot(x, t + Clip(ir[j], s) * d, d);
      }
    }
  });
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- scatter-add
ffi::Error ScatterImpl(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::S32> idx,
                       ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> col) {
  auto wd = w.dimensions(), rd = rows.dimensions(), id = idx.dimensions(), od = out->dimensions();
  const int64_t L = Dim(od, 2), d = Dim(od, 1), n = Dim(wd, 2), jn = Dim(wd, 1);
  if (Dim(rd, 1) != d || Dim(rd, 2) != n || Dim(id, 2) != n || Dim(id, 1) != jn)
    return ffi::Error::InvalidArgument("sae_scatter: shapes");
  Cells cells(od, 2);
  const float *W = w.typed_data(), *R = rows.typed_data();
  const int32_t* I = idx.typed_data();
  float *O = out->typed_data(), *C = col->typed_data();
  // Per cell, the entries grouped by target row (counting sort; (n, j) order kept in a group).
  const int64_t nn = n * jn;
  std::vector<int64_t> start(cells.count * (L + 1));
  std::vector<int32_t> order(cells.count * nn);
  ParallelFor(cells.count, 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      const int32_t* ic = I + cells.Offset(c, id, 2, nn);
      int64_t* st = start.data() + c * (L + 1);
      int32_t* ord = order.data() + c * nn;
      std::fill(st, st + L + 1, 0);
      for (int64_t e = 0; e < nn; ++e)
        if (ic[e] >= 0 && ic[e] < L) ++st[ic[e] + 1];
      for (int64_t l = 0; l < L; ++l) st[l + 1] += st[l];
      std::vector<int64_t> fill(st, st + L);
      for (int64_t e = 0; e < nn; ++e)
        if (ic[e] >= 0 && ic[e] < L) ord[fill[ic[e]]++] = static_cast<int32_t>(e);
    }
  });
  ParallelFor(cells.count * L, 64, [&](int64_t a, int64_t b) {
    for (int64_t q = a; q < b; ++q) {
      const int64_t c = q / L, l = q % L;
      const int64_t* st = start.data() + c * (L + 1);
      const int32_t* ord = order.data() + c * nn;
      const float* wc = W + cells.Offset(c, wd, 2, nn);
      const float* rc = R + cells.Offset(c, rd, 2, n * d);
      float* o = O + q * d;
      std::fill(o, o + d, 0.0f);
      float sum = 0.0f;
      for (int64_t p = st[l]; p < st[l + 1]; ++p) {
        const int64_t e = ord[p];
        const float we = wc[e];
        const float* src = rc + (e / jn) * d;
        sum += we;
        for (int64_t t = 0; t < d; ++t) o[t] += we * src[t];
      }
      C[q] = sum;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeTopk, TopkImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeGatherSum, GatherSumImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeDots, DotsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeScatter, ScatterImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
