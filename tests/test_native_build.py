"""The native kernels' build (sae_jax.native_build) and each of its fallbacks: no compiler, a
failing compiler (its first error, cached, and said once on stderr), an unwritable cache (a
private folder), a library planted by another user (never loaded), builds started together (one
compile), and the cache's pruning."""

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import pytest

from sae_jax import native, native_build

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels (CI runs on the CPU)")

FAKE_CXX = """#!/bin/sh
[ "$1" = --version ] && { echo "fakecc 1.0"; exit 0; }
echo run >> "$(dirname "$0")/runs"
echo "In file included from sparse_kernels.cc:23:" >&2
echo "topk.cc:3:5: error: 'boom' was not declared in this scope" >&2
echo "topk.cc:9:1: error: expected ';'" >&2
echo "    ^~~~" >&2
exit 1
"""
FIRST_ERROR = "fakecc failed: topk.cc:3:5: error: 'boom' was not declared in this scope"


@pytest.fixture
def fake_cxx(tmp_path, monkeypatch):
    """A compiler that fails with two errors and a caret line, counting its runs in `runs`."""
    cxx = tmp_path / "bin" / "fakecc"
    cxx.parent.mkdir()
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    return cxx


@pytest.fixture(scope="module")
def built():
    """This process's library, built as the module says (before any test's HOME or cache)."""
    assert native.available(), native.status()
    return native._STATE["lib"]._name


@pytest.fixture
def compiles(built, monkeypatch):
    """The compiler replaced by a copy of this process's library: the output paths it was asked
    for."""
    calls = []

    def fake(cxx, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for a second build to reach the lock
        shutil.copyfile(built, out)
    monkeypatch.setattr(native_build, "_compile", fake)
    return calls


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME in tmp_path, and no cache named by the user."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SAE_JAX_NATIVE_CACHE", raising=False)
    return tmp_path / "home"


def _private(lib: Path) -> bool:
    """Whether lib lies in a folder made for this process by native_build."""
    return (lib.parent.parent == Path(tempfile.gettempdir()) and lib.parent.name.startswith("sae_jax_native-")
            and (lib.parent.stat().st_mode & 0o777) == 0o700)


def test_without_a_compiler_the_kernels_fall_back_with_the_reason(monkeypatch):
    monkeypatch.setattr(native_build, "compiler", lambda: None)
    assert native._load() == "no C++ compiler (set CXX, or install g++)"


def test_a_failing_compiler_gives_its_first_error_once_a_day_per_key(fake_cxx, tmp_path, monkeypatch):
    """The first error line (not the caret line that ends the output); the failure is cached with
    the build's key: the compiler runs again for another key (here other flags), or a day later."""
    monkeypatch.setenv("SAE_JAX_NATIVE_CACHE", str(tmp_path / "cache"))
    runs = lambda: (tmp_path / "bin" / "runs").read_text().count("run")
    assert native._load() == FIRST_ERROR
    again = native._load()
    assert again.startswith(FIRST_ERROR + " (cached for a day: remove ")
    assert again.endswith(".failed to retry now)")
    assert runs() == 1
    monkeypatch.setenv("SAE_JAX_NATIVE_ARCH", "x86-64")
    assert native._load() == FIRST_ERROR and runs() == 2
    for failed in (tmp_path / "cache").glob("*.failed"):
        os.utime(failed, (time.time() - 2 * 86400,) * 2)
    assert native._load() == FIRST_ERROR and runs() == 3


def test_first_error_skips_context_and_caret_lines():
    stderr = "In file included from a.h:1:\n  x\n a.cc:2: error: no\n  ^\n"
    assert native_build.first_error(stderr) == "a.cc:2: error: no"
    assert native_build.first_error("ld: cannot open output file\n") == "ld: cannot open output file"
    assert native_build.first_error("") == "no message"


def test_a_cpu_run_without_the_kernels_says_why_once_on_stderr(fake_cxx, tmp_path):
    """A dense (ReLU) grid on the CPU goes without the native kernels (its Adam step would use
    them): one line on stderr with the compiler's first error; none under SAE_JAX_NATIVE=0."""
    run = [sys.executable, "-m", "sae_jax.cli", "toy", "--steps", "4", "--ratios", "1", "--arch", "relu_l1",
           "--eval-samples", "128", "--no-figures"]
    env = dict(os.environ, CXX=str(fake_cxx), SAE_JAX_NATIVE_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(run + ["--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-500:]
    lines = [line for line in out.stderr.splitlines() if "native CPU kernels" in line]
    assert lines == [f"sae_jax: native CPU kernels unavailable ({FIRST_ERROR}); using XLA's kernels (slower)"]
    off = subprocess.run(run + ["--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300,
                         env=dict(env, SAE_JAX_NATIVE="0"))
    assert off.returncode == 0 and "native CPU kernels" not in off.stderr, off.stderr[-500:]


@pytest.mark.parametrize("cache", ["default", "named"])
def test_an_unwritable_cache_builds_in_a_private_folder(cache, home, compiles, tmp_path, monkeypatch):
    """A home (or a named cache) that cannot be made: the library is built in a fresh folder of
    this process's, not in a fixed shared path."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    if cache == "default":
        monkeypatch.setenv("HOME", str(blocker))
    else:
        monkeypatch.setenv("SAE_JAX_NATIVE_CACHE", str(blocker / "cache"))
    first, second = native_build.library("g++"), native_build.library("g++")
    assert _private(first) and _private(second) and first.parent != second.parent
    assert len(compiles) == 2


def test_a_library_planted_in_another_users_cache_is_not_loaded(home, compiles, monkeypatch):
    """~/.cache/sae_jax/native and the library in it owned by another uid (this process's uid
    mocked): the kernels are loaded from a private build instead, the planted one left alone."""
    root = home / ".cache" / "sae_jax" / "native"
    root.mkdir(parents=True)
    planted = root / f"sparse_kernels-{native_build.build_key('g++')}.so"
    planted.write_bytes(b"not a library")
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)
    assert "is owned by uid" in native_build.unsafe(planted)
    loaded, registered = [], []
    monkeypatch.setattr(ctypes.cdll, "LoadLibrary",
                        lambda path: loaded.append(Path(path)) or ctypes.CDLL(path))
    monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda name, *a, **k: registered.append(name))
    assert native._load() == ""
    assert len(loaded) == 1 and loaded[0] != planted and _private(loaded[0])
    assert planted.read_bytes() == b"not a library"
    assert set(registered) == set(native.targets(native._STATE["lib"]))


def test_a_library_others_can_write_is_built_over(home, compiles):
    """A library in the user's own cache that others could have written is not loaded: built over
    (closed to others); a cache folder left open to others is closed first."""
    root = home / ".cache" / "sae_jax" / "native"
    root.mkdir(parents=True, mode=0o777)
    root.chmod(0o777)
    planted = root / f"sparse_kernels-{native_build.build_key('g++')}.so"
    planted.write_bytes(b"not a library")
    planted.chmod(0o666)
    assert native_build.library("g++") == planted
    assert len(compiles) == 1 and planted.read_bytes() != b"not a library"
    assert native_build.unsafe(planted) == "" and native_build.unsafe(root) == ""
    assert native_build.library("g++") == planted and len(compiles) == 1  # now a cache hit


def test_builds_started_together_compile_once(home, compiles):
    """Processes (here threads, each with its own lock file handle) that start a build together:
    one compiles under the lock, the others wait for it and load its library."""
    libs = []
    threads = [threading.Thread(target=lambda: libs.append(native_build.library("g++"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(compiles) == 1 and len(set(libs)) == 1
    assert libs[0].parent == home / ".cache" / "sae_jax" / "native"


def test_a_build_prunes_the_cache_to_the_most_recently_used_libraries(tmp_path):
    """Old libraries (other jax versions, CPUs) beyond the newest KEEP_BUILDS go, as do builds
    that never finished; recent files stay, whatever their number (another process may be
    about to load one)."""
    now = time.time()
    libs = []
    for i in range(native_build.KEEP_BUILDS + 3):
        p = tmp_path / f"sparse_kernels-{i:016x}.so"
        p.write_bytes(b"")
        os.utime(p, (now - 10 * 86400 - i, now - 10 * 86400 - i))  # i = 0 the most recent
        libs.append(p)
    fresh = tmp_path / "sparse_kernels-ffffffffffffffff.so"
    fresh.write_bytes(b"")
    partial_old, partial_new = tmp_path / "tmpold.so", tmp_path / "tmpnew.so"
    for p in (partial_old, partial_new):
        p.write_bytes(b"")
    os.utime(partial_old, (now - 2 * 86400, now - 2 * 86400))
    other = tmp_path / "notes.txt"
    other.write_text("kept")

    removed = native_build.prune(tmp_path)
    left = set(tmp_path.iterdir())
    # the fresh one counts among the KEEP_BUILDS, so the oldest four old libraries go
    assert set(removed) == set(libs[native_build.KEEP_BUILDS - 1:]) | {partial_old}
    assert left == set(libs[:native_build.KEEP_BUILDS - 1]) | {fresh, partial_new, other}
    assert native_build.prune(tmp_path, keep=0, stale_s=1e9) == []  # nothing stale: nothing goes
