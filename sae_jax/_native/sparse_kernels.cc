// CPU kernels for the TopK sparse decoder (sae_jax/sparse.py) and the SynthSAEBench sampler, as XLA FFI
// custom calls.
//
// XLA:CPU's TopK is a single-threaded partial sort over an index array and its row gathers and
// scatter-adds run far below the machine's GEMM rate; these kernels do the same work in one pass
// over each row, on every core (sae_jax/native.py compiles this file on first use).
//
// Every array may carry leading "cell" dimensions (a vmapped group); an input whose leading
// dimension is 1 where the output's is not is shared by every cell (vmap_method="expand_dims").
//
// One translation unit, one library: the kernel families, each in its own file (with its
// kernels' equations), included in an order where each uses only those before it.
//   common.h        threads, cell layouts, shape checks, errors, the table of FFI targets
//   vectors.h       F16: 16 float lanes (AVX-512, AVX2 or portable), what the kernels are written in
//   topk.cc         sae_topk
//   batch_topk.cc   sae_batch_topk
//   unit_rows.cc    sae_unit_rows, sae_row_norms, sae_unit_rows_vjp
//   gather.cc       sae_gather_sum, sae_dots
//   scatter.cc      sae_scatter, sae_scatter_unit
//   decode_err.cc   sae_decode_err, sae_decode_err_scaled
//   adam.cc         sae_adam_check, sae_adam_apply
//   sparse_rows.cc  sae_sparse_rows (the SynthSAEBench sampler's x = V W)
//   synth.cc        sae_synth_solo, sae_synth_groups (the SynthSAEBench sampler's draws)
// (the row kernels also as _bf16 twins). sae_jax/native.py registers every target in the table.

#include "common.h"
#include "vectors.h"

#include "topk.cc"
#include "batch_topk.cc"
#include "unit_rows.cc"
#include "gather.cc"
#include "scatter.cc"
#include "decode_err.cc"
#include "adam.cc"
#include "sparse_rows.cc"
#include "synth.cc"

// The table of FFI targets: how many, and the i-th's name and handler (null past the end).
extern "C" int64_t SaeTargetCount() { return static_cast<int64_t>(Targets().size()); }
extern "C" const char* SaeTargetName(int64_t i) {
  return i >= 0 && i < SaeTargetCount() ? Targets()[i].name : nullptr;
}
extern "C" void* SaeTargetHandler(int64_t i) {
  return i >= 0 && i < SaeTargetCount() ? Targets()[i].handler : nullptr;
}
