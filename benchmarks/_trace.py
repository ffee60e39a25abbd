"""Where a compiled program's time goes, read from a trace of one call (jax.profiler's Perfetto
trace): each executed HLO instruction's wall time, summed by kind.

Timing parts of a step one by one, each jitted alone, misleads: a part called alone writes its
output into freshly allocated memory (page faults on a 64 MB pre-activation matrix), and a
loop-invariant part is hoisted out of a scan. The trace times the parts inside the step itself.
Independent instructions may run at the same time on XLA's threads, so the parts' sum can exceed
the step's wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

import jax

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = .*?\b([a-z][\w-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.-]+) .*\{$")
KERNELS = {"sae_topk": "top-k (native)", "sae_gather_sum": "decoder gather (native)",
           "sae_dots": "decoder VJP: dot products (native)", "sae_scatter": "scatter-adds (native)",
           "sae_decode_err": "fused gather, error, dots (native)",
           "sae_decode_err_scaled": "fused gather, error, dots (native)",
           "sae_scatter_unit": "scatter-adds (native)", "sae_row_norms": "unit-norm atoms and VJP (native)",
           "sae_unit_rows": "unit-norm atoms and VJP (native)",
           "sae_unit_rows_vjp": "unit-norm atoms and VJP (native)",
           "sae_adam_check": "Adam step (native, both steps)", "sae_adam_apply": "Adam step (native, both steps)"}


def kinds(hlo_text: str) -> dict[str, str]:
    """{instruction name: kind} for a compiled module's text: 'GEMM' (a dot, or a fusion that
    holds one), a native kernel (`KERNELS`), 'copy', else 'XLA elementwise, reductions, other'."""
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if m := _COMP.match(line):
            current = bodies.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)

    def has_dot(comp: str, seen=()) -> bool:
        for line in bodies.get(comp, ()):
            if " dot(" in line or "convolution(" in line:
                return True
            for called in re.findall(r"(?:calls|to_apply)=%([\w.-]+)", line):
                if called not in seen and has_dot(called, seen + (comp,)):
                    return True
        return False

    out = {}
    for lines in bodies.values():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, op = m.group(1), m.group(2)
            target = re.search(r'custom_call_target="([^"]+)"', line)
            called = re.findall(r"calls=%([\w.-]+)", line)
            if target:
                t = target.group(1).removesuffix("_bf16")  # the bfloat16-row twins: the same part
                out[name] = KERNELS.get(t, f"custom call {t}")
            elif op == "dot" or (op == "fusion" and any(has_dot(c) for c in called)):
                out[name] = "GEMM"
            elif op == "copy":
                out[name] = "copy"
            elif op not in ("while", "conditional", "call", "parameter", "tuple",
                            "get-tuple-element", "bitcast", "constant"):
                out[name] = "XLA elementwise, reductions, other"
    return out


def breakdown(compiled, args: tuple, calls_per_step: float = 1.0) -> dict[str, float]:
    """{kind: seconds per step} from a trace of one call of `compiled(*args)` (already warm),
    divided by `calls_per_step` (the scan's length). Time the step itself separately: the trace
    slows it, and its own wall-time events missed part of a step that ran native kernels."""
    names = kinds(compiled.as_text())
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        try:
            jax.block_until_ready(compiled(*args))
        finally:
            jax.profiler.stop_trace()
        trace = json.load(gzip.open(glob.glob(f"{d}/**/*.json.gz", recursive=True)[0]))
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e["name"] in names:
            out[names[e["name"]]] += e["dur"] * 1e-6 / calls_per_step
    return dict(out)
