// What every kernel family uses: the threads, the cell layout of a call, shape checks, error
// handling, the row types and the table of FFI targets (SAE_FFI_TARGET).

#pragma once

#ifdef __linux__
#include <sched.h>
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <initializer_list>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

int Threads() {
  static const int n = [] {
    if (const char* e = std::getenv("SAE_JAX_NATIVE_THREADS"); e && std::atoi(e) > 0)
      return std::atoi(e);
#ifdef __linux__  // the CPUs this process may run on (taskset, a container's share)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  return n;
}

// A second thread takes part only for at least this much work (in elements read or updated):
// handing a range to XLA's pool costs a few microseconds.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;

// The intra-op thread pool of the XLA computation that called the running handler (the
// handler's `Ctx<ffi::ThreadPool>`, set by `PoolScope`), or null outside one.
inline ffi::ThreadPool*& CurrentPool() {
  thread_local ffi::ThreadPool* pool = nullptr;
  return pool;
}
struct PoolScope {
  ffi::ThreadPool* saved;
  explicit PoolScope(ffi::ThreadPool* pool) : saved(CurrentPool()) { CurrentPool() = pool; }
  ~PoolScope() { CurrentPool() = saved; }
};

// The ranges of one ParallelFor handed to the pool: whoever runs a task takes the next untaken
// range, so the caller runs every range no pool thread has taken, and waits only for ranges
// under way (never for a task the pool has not started: no deadlock when every pool thread is
// busy, or is itself such a caller).
struct Ranges {
  std::atomic<int64_t> next{0}, done{0};
  int64_t count = 0;
  const std::function<void(int64_t)>* run = nullptr;  // valid while done < count
  std::atomic<bool> failed{false};
  std::exception_ptr error;

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      try {
        (*run)(c);
      } catch (...) {
        if (!failed.exchange(true)) error = std::current_exception();
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

// f(begin, end) over [0, n), split into contiguous ranges, one per thread; each thread gets at
// least min_per_thread items and kMinWorkPerThread work (an item's is work_per_item). The other
// threads are the running handler's XLA intra-op pool's (the caller is one of them); without one
// (outside a handler) f runs on the caller alone.
template <class F>
void ParallelFor(int64_t n, int64_t min_per_thread, int64_t work_per_item, F&& f) {
  const int64_t w = std::max<int64_t>(1, work_per_item);
  min_per_thread = std::max<int64_t>({int64_t{1}, min_per_thread, (kMinWorkPerThread + w - 1) / w});
  ffi::ThreadPool* pool = CurrentPool();
  int64_t t = std::min<int64_t>(Threads(), std::max<int64_t>(1, n / min_per_thread));
  t = pool ? std::min<int64_t>(t, pool->num_threads()) : 1;
  if (t <= 1) {
    f(int64_t{0}, n);
    return;
  }
  const std::function<void(int64_t)> run = [&f, n, t](int64_t c) { f(n * c / t, n * (c + 1) / t); };
  auto ranges = std::make_shared<Ranges>();
  ranges->count = t;
  ranges->run = &run;
  for (int64_t q = 1; q < t; ++q) pool->Schedule([ranges] { ranges->Work(); });
  ranges->Work();
  for (int spins = 0; ranges->done.load(std::memory_order_acquire) < t; ++spins)
    if (spins > 64) std::this_thread::yield();
  if (ranges->failed.load()) std::rethrow_exception(ranges->error);
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

// Whether an input of dims `in` (`trailing` matrix dims) broadcasts against the output's cells:
// the same rank, each leading dim 1 or the output's.
bool Fits(const Cells& cells, ffi::Span<const int64_t> in, int trailing) {
  if (in.size() != cells.lead.size() + trailing) return false;
  for (size_t a = 0; a < cells.lead.size(); ++a)
    if (in[a] != 1 && in[a] != cells.lead[a]) return false;
  return true;
}

constexpr int64_t kMaxEntries = (int64_t{1} << 31) - 64;  // int32 offsets in the scratch arrays

// f(), with any C++ exception (no memory, no thread) returned to XLA as an error.
template <class F>
ffi::Error Guard(const char* name, F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  }
}

// Rows come as float32 or as bfloat16 (their bits, uint16_t): a bfloat16 row is widened to float32
// as it is read, so the sums are float32 either way and the bfloat16 kernels move half the bytes.
inline float ToF32(float v) { return v; }
inline float ToF32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <ffi::DataType R>
using RowBuf = ffi::Buffer<R>;
template <ffi::DataType R>
using Row = ffi::NativeType<R>;
using F32Buf = ffi::Buffer<ffi::F32>;
using F32Ret = ffi::ResultBuffer<ffi::F32>;
using S32Buf = ffi::Buffer<ffi::S32>;

// The handlers: shape errors and C++ exceptions come back to XLA as errors, never a crash.
bool Matrices(std::initializer_list<ffi::Span<const int64_t>> dims) {
  for (auto d : dims)
    if (d.size() < 2) return false;
  return true;
}

// The FFI targets, each added where its handler is defined (SAE_FFI_TARGET): sae_jax/native.py
// registers every one the library lists (SaeTargetCount, SaeTargetName, SaeTargetHandler).
struct Target {
  const char* name;
  void* handler;
};
std::vector<Target>& Targets() {
  static std::vector<Target> targets;
  return targets;
}
struct AddTarget {
  AddTarget(const char* name, void* handler) { Targets().push_back({name, handler}); }
};

// The arguments the sae_gather_sum, sae_scatter* and sae_decode_err* targets start with, in order:
// the codes' values w (float32), the rows or table of row type R that the codes index, and the
// codes' latent indices idx (int32). Each target's binding adds its own after these.
template <ffi::DataType R>
auto BindCodes() {
  return ffi::Ffi::Bind().Arg<F32Buf>().template Arg<RowBuf<R>>().template Arg<S32Buf>();
}

}  // namespace

// A handler `impl` taking the computation's thread pool as one more, last, argument: the binding's
// `Ctx<ffi::ThreadPool>`, which `ParallelFor` uses while impl runs.
template <auto Impl>
struct Pooled;
template <class... A, ffi::Error (*Impl)(A...)>
struct Pooled<Impl> {
  static ffi::Error Call(A... a, ffi::ThreadPool pool) {
    PoolScope scope(&pool);
    return Impl(std::move(a)...);
  }
};

// The handler `symbol` (XLA_FFI_DEFINE_HANDLER_SYMBOL's) of the FFI target `name`, in the table;
// `impl` runs with the computation's thread pool (`Pooled`).
#define SAE_FFI_TARGET(name, symbol, impl, ...)                                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, Pooled<&impl>::Call, (__VA_ARGS__).Ctx<ffi::ThreadPool>()); \
  static const AddTarget symbol##Target(#name, reinterpret_cast<void*>(&symbol))
