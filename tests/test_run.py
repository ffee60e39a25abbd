"""The run layer: early errors close what they opened, extending a run with --resume, and the
README's two-process command on the loopback address."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from sae_jax import checkpoint, cli, recipes

ENV = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
SMALL = ["toy", "--d", "16", "--features", "32", "--l1", "0.1,0.3,1", "--ratios", "1,2",
         "--no-progress", "--no-figures", "--eval-samples", "512"]


def _load(out):
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    with np.load(os.path.join(out, "dictionaries.npz")) as z:
        return res, {k: z[k] for k in z.files}


@pytest.mark.parametrize("second", [
    [],  # no checkpoint at all
    ["--lr", "0.002"],  # different arguments
    ["--steps", "50"],  # the checkpoint is past --steps
])
def test_every_early_resume_error_closes_the_checkpointer(tmp_path, monkeypatch, capsys, second):
    opened, closed = [], []
    real_init, real_close = checkpoint.Checkpointer.__init__, checkpoint.Checkpointer.close
    monkeypatch.setattr(checkpoint.Checkpointer, "__init__",
                        lambda self, *a, **k: (opened.append(self), real_init(self, *a, **k))[1])
    monkeypatch.setattr(checkpoint.Checkpointer, "close",
                        lambda self: (closed.append(self), real_close(self))[1])
    base = [*SMALL[:9], "--no-progress", "--no-figures", "--steps", "100", "--checkpoint-every", "100",
            "--out", str(tmp_path)]
    if second:
        assert cli.main(base) == 0
    assert cli.main([*base, "--resume", *second]) == 2
    assert "--resume" in capsys.readouterr().err
    assert opened and all(c in closed for c in opened)


@pytest.mark.slow
def test_refused_resume_prints_exactly_one_line(tmp_path):
    """The stray 'cannot schedule new futures after shutdown' traceback came about one run in
    seven, from Orbax's temporary-directory cleanup thread outliving the refused run."""
    tiny = ["toy", "--d", "8", "--features", "16", "--l1", "0.1", "--ratios", "1", "--steps", "100",
            "--no-progress", "--no-figures"]
    assert _run(*tiny, "--checkpoint-every", "100", "--out", str(tmp_path / "done")).returncode == 0
    runs = [(str(tmp_path / f"none{i}"), []) for i in range(4)] + \
           [(str(tmp_path / "done"), ["--lr", "0.01"]) for _ in range(4)]
    procs = [subprocess.Popen([sys.executable, "-m", "sae_jax.cli", *tiny, "--resume", *extra, "--out", out],
                              stderr=subprocess.PIPE, text=True, env=ENV) for out, extra in runs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sae-jax: error: --resume"), err


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sae_jax.cli", *args], capture_output=True, text=True,
                          timeout=600, env=ENV)


@pytest.mark.slow
def test_extending_a_run_equals_the_longer_run(tmp_path):
    """2,000 steps then --resume --steps 4,000 equals 4,000 steps: the small preset's L1 warm-up,
    and a fast recipe whose step-dependent schedules are given explicitly."""
    tiny = ["toy", "--d", "8", "--features", "16", "--mean-active", "2", "--l1", "0.1,1", "--ratios", "1",
            "--batch-size", "32", "--no-progress", "--no-figures", "--eval-samples", "256",
            "--check-every", "500", "--checkpoint-every", "500"]
    for name, extra in (("report", ["--l1-warmup", "1000"]),
                        ("fast", ["--recipe", "fast", "--batch-size", "32", "--lr-decay-steps", "4000",
                                  "--resample-until", "3000"])):
        full, ext = str(tmp_path / f"{name}_full"), str(tmp_path / f"{name}_ext")
        assert _run(*tiny, *extra, "--steps", "4000", "--out", full).returncode == 0
        assert _run(*tiny, *extra, "--steps", "2000", "--out", ext).returncode == 0
        r = _run(*tiny, *extra, "--steps", "4000", "--out", ext, "--resume")
        assert r.returncode == 0, r.stderr
        (ra, da), (rb, db) = _load(full), _load(ext)
        for k in da:
            np.testing.assert_array_equal(da[k], db[k], err_msg=f"{name} {k}")
        assert [c["mmcs"] for c in ra["cells"]] == [c["mmcs"] for c in rb["cells"]]
        assert rb["config"]["steps"] == 4000
    # The fast recipe's own schedules follow --steps: extending it is refused, naming them.
    out = str(tmp_path / "fast_derived")
    assert _run(*tiny, "--recipe", "fast", "--steps", "1000", "--out", out).returncode == 0
    r = _run(*tiny, "--recipe", "fast", "--steps", "2000", "--out", out, "--resume")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--resample-until" in r.stderr and "--lr-decay-steps" in r.stderr, r.stderr


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(out: str, port: int, extra: list[str]) -> list[subprocess.Popen]:
    """The README's commands (several hosts), both on the loopback address."""
    procs = []
    for i in (0, 1):
        env = {**ENV, "JAX_NUM_CPU_DEVICES": "2", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-m", "sae_jax.cli", *SMALL, *extra, "--distributed",
                                       "--out", out], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_two_processes_on_loopback_match_one_process_and_resume(tmp_path):
    args = ["--steps", "400", "--checkpoint-every", "100", "--check-every", "100"]
    one = str(tmp_path / "one")
    r = subprocess.run([sys.executable, "-m", "sae_jax.cli", *SMALL, *args, "--out", one],
                       capture_output=True, text=True, timeout=600, env={**ENV, "JAX_NUM_CPU_DEVICES": "1"})
    assert r.returncode == 0, r.stderr
    two = str(tmp_path / "two")
    procs = _two_processes(two, _port(), args)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]  # process 0 alone writes
    (ra, da), (rb, db) = _load(one), _load(two)
    for k in da:
        np.testing.assert_allclose(da[k], db[k], atol=1e-4, err_msg=k)
    for ca, cb in zip(ra["cells"], rb["cells"]):
        for key in ("mmcs", "recon_loss", "l0", "fvu"):
            assert ca[key] == pytest.approx(cb[key], rel=1e-4, abs=1e-6), key
        assert ca["dead"] == cb["dead"]
    assert {k: ra["suggested"][k] for k in ("ratio", "l1", "cell")} == \
           {k: rb["suggested"][k] for k in ("ratio", "l1", "cell")}

    # Killed both mid-run, then --resume on both continues to the same result.
    killed = str(tmp_path / "killed")
    long = ["--steps", "1500", "--checkpoint-every", "100", "--check-every", "100"]
    procs = _two_processes(killed, _port(), long)
    ckpts = os.path.join(killed, "checkpoints", "grid")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(ckpts) and "300" in os.listdir(ckpts)):
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not os.path.exists(os.path.join(killed, "results.json"))
    procs = _two_processes(killed, _port(), [*long, "--resume"])
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert _load(killed)[0]["config"]["steps"] == 1500


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])  # 0 hosts the coordination service
def test_killing_one_process_stops_the_other_with_one_line(tmp_path, victim):
    out = str(tmp_path / "run")
    procs = _two_processes(out, _port(), ["--steps", "20000", "--checkpoint-every", "100",
                                          "--check-every", "100"])
    ckpts = os.path.join(out, "checkpoints", "grid")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(ckpts) and "200" in os.listdir(ckpts)):
        time.sleep(0.2)
    procs[victim].send_signal(signal.SIGKILL)
    t0 = time.time()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=150)
    assert survivor.returncode == 1 and time.time() - t0 < 120
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "another process" in lines[0], err[-3000:]


def test_appendix_grid_writes_its_cells_figure_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["toy", "--d", "8", "--features", "16", "--mean-active", "2", "--l1", "0.1,1",
                     "--ratios", "1", "--appendix", "--steps", "100", "--batch-size", "32",
                     "--eval-samples", "256", "--no-progress", "--checkpoint-every", "0", "--out", str(out)])
    assert code == 0
    res, _ = _load(out)
    dn = res["denoising"]
    noise = list(recipes.PRESETS["small"].denoise_noise)
    assert res["config"]["denoise_noise"] == noise
    assert dn["world"]["correlated"] is False and dn["world"]["decay"] == 1.0
    assert sorted((c["l1"], c["noise"]) for c in dn["cells"]) == sorted((a, n) for a in (0.1, 1.0) for n in noise)
    assert all(c["dict_size"] == 16 and c["mmcs"] is not None for c in dn["cells"])
    assert (out / "figures" / "appendix_denoising.png").stat().st_size > 1000
    assert "appendix_denoising.png" in (out / "REPORT.md").read_text()


def test_layout_no_cycles_no_cli_imports_no_long_modules():
    """The acceptance rules of the run layer, checked on the source: no import cycle inside
    sae_jax (typing-only imports aside), no module imports the CLI, none over 400 lines."""
    import ast
    import pathlib

    root = pathlib.Path(cli.__file__).parent
    mods = {p.stem: p for p in root.glob("*.py")}
    graph = {}
    for name, path in mods.items():
        src = path.read_text()
        assert len(src.splitlines()) <= 400, name
        deps, tree = set(), ast.parse(src)
        typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(top.test) for b in top.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "sae_jax":
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sae_jax."):
                deps.add(node.module.split(".")[1])
        graph[name] = deps - {name}
    assert not [m for m, d in graph.items() if "cli" in d]

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(graph.get(n, ()))
        return seen
    assert not [m for m in graph if m in reach(m)]
