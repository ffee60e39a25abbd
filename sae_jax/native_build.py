"""The native kernels' library (`sae_jax.native`): built on first use, cached, never loaded from
a folder someone else controls.

The library is built with the machine's C++ compiler (`$CXX`, else g++, else c++) against the
headers jaxlib ships (`jax.ffi.include_dir()`), with `-O3 -march=native` (`$SAE_JAX_NATIVE_ARCH`
in place of native: e.g. x86-64-v3 for a library shared by a cluster's CPUs), from
`_native/sparse_kernels.cc`, which includes the kernel families (one translation unit). Its key
covers every file in `_native/`, jax's and jaxlib's versions, the compiler, the flags and the
CPU's flags.

Where: `$SAE_JAX_NATIVE_CACHE` when set (the user's choice, e.g. a cluster's shared folder: used
as it is), else `~/.cache/sae_jax/native`, which is used only while this user owns it and no one
else can write to it (made so when it is this user's); a library there is loaded only on the same
terms, else built over. When that folder cannot be used or written, the library is built in a
private folder made for the process (`tempfile.mkdtemp`, removed at exit): no fixed shared path.

A build holds a lock on its folder (`build.lock`): processes started together wait for the one
building, then load its library. A compiler's failure is kept where its library would be
(`sparse_kernels-<key>.failed`, holding the first error): later processes report it without
compiling again for `STALE_S` (a day), until that file is removed, or until the key changes. A
build prunes the folder to the `KEEP_BUILDS` most recently used libraries (`prune`).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import jax

try:
    import fcntl
except ImportError:  # no POSIX file locks: builds are not serialised
    fcntl = None

log = logging.getLogger(__name__)
SOURCES = Path(__file__).with_name("_native")
SOURCE = SOURCES / "sparse_kernels.cc"  # the translation unit: it includes the rest
PREFIX = "sparse_kernels-"
LOCK = "build.lock"
KEEP_BUILDS = 8  # the cache keeps this many libraries (one per jax version, CPU, compiler ...)
STALE_S = 24 * 3600  # and removes no file used within this many seconds; a failure is retried after it


class BuildFailed(RuntimeError):
    """The compiler failed (the message: its first error); cached, so not retried."""


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return "?"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))),
                os.uname().machine)


def _flags() -> list[str]:
    arch = os.environ.get("SAE_JAX_NATIVE_ARCH") or "native"
    return ["-O3", f"-march={arch}", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w"]


def build_key(cxx: str) -> str:
    """The cache key of a build by `cxx`: every source, the versions, the compiler, the flags."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, errors="replace",
                             timeout=60).stdout
    sources = [f"{p.name}\n{p.read_text()}" for p in sorted(SOURCES.iterdir()) if p.suffix in (".cc", ".h")]
    return hashlib.sha256("\n".join([*sources, jax.__version__, _jaxlib_version(), jax.ffi.include_dir(),
                                     version, " ".join(_flags()), _cpu_flags()]).encode()).hexdigest()[:16]


def first_error(stderr: str) -> str:
    """The compiler's first error line (else its first line), at most 300 characters."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    line = next((s for s in lines if re.search(r"\berror\b", s, re.IGNORECASE)), lines[0] if lines else "")
    return (line[:297] + "...") if len(line) > 300 else (line or "no message")


def _compile(cxx: str, out: Path) -> None:
    """Compiles the library into `out`: BuildFailed where the compiler fails."""
    try:
        r = subprocess.run([cxx, *_flags(), f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)],
                           capture_output=True, text=True, errors="replace", timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:  # not the source's fault: not cached
        raise RuntimeError(f"{Path(cxx).name} did not run: {e}") from e
    if r.returncode:
        raise BuildFailed(f"{Path(cxx).name} failed: {first_error(r.stderr)}")


def unsafe(path: Path) -> str:
    """'' where this user owns `path` and no one else can write to it, else why not."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} can be written by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _default_root() -> tuple[Path | None, str]:
    """~/.cache/sae_jax/native, made if missing and closed to others where this user owns it;
    else (None, why it cannot be used)."""
    home = Path(os.path.expanduser("~"))
    if not home.is_absolute():
        return None, "no home directory"
    root = home / ".cache" / "sae_jax" / "native"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = root.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o022:
            root.chmod(stat.S_IMODE(st.st_mode) & ~0o022)
        why = unsafe(root)
    except OSError as e:
        return None, str(e)
    return (None, why) if why else (root, "")


def _private_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="sae_jax_native-"))  # mode 0700, a fresh name
    atexit.register(shutil.rmtree, root, True)
    return root


def library(cxx: str) -> Path:
    """The compiled library (see the module's docstring for where it is looked for and built);
    BuildFailed where the compiler fails."""
    key = build_key(cxx)
    explicit = os.environ.get("SAE_JAX_NATIVE_CACHE")
    root, why = (Path(explicit), "") if explicit else _default_root()
    if root is not None:
        try:
            if explicit:
                root.mkdir(parents=True, exist_ok=True)
            return _build_in(root, key, cxx, check=not explicit)
        except OSError as e:  # a folder that cannot be written
            why = str(e)
    private = _private_root()
    log.info("the native kernels' cache is not used (%s); building them in %s", why, private)
    return _build_in(private, key, cxx, check=False)


def _build_in(root: Path, key: str, cxx: str, check: bool) -> Path:
    """The library in `root`, built under the folder's lock unless there (or its failure cached).
    check: load only files this user owns and no one else can write (`unsafe`)."""
    lib, failed = root / f"{PREFIX}{key}.so", root / f"{PREFIX}{key}.failed"

    def cached() -> Path | None:
        if lib.exists() and not (check and unsafe(lib)):
            _touch(lib)
            return lib
        if (failed.exists() and not (check and unsafe(failed))
                and time.time() - failed.stat().st_mtime < STALE_S):
            why = failed.read_text(errors="replace").strip() or "the build failed"
            raise BuildFailed(f"{why} (cached for a day: remove {failed} to retry now)")
        return None

    if found := cached():
        return found
    with _locked(root):
        if found := cached():  # built by the process that held the lock
            return found
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
        try:
            try:
                _compile(cxx, Path(tmp))
            except BuildFailed as e:
                failed.write_text(f"{e}\n")
                raise
            os.chmod(tmp, 0o755)
            os.replace(tmp, lib)  # over any library that failed the check
            if failed.exists():  # a failure over a day old, now mended
                failed.unlink()
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    prune(root)
    return lib


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive lock on root/build.lock while inside (none without fcntl)."""
    fd = os.open(root / LOCK, os.O_RDONLY | os.O_CREAT, 0o644)  # read-only: another user's lock file too
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache, which nothing prunes either
        pass


def prune(root: Path, keep: int = KEEP_BUILDS, stale_s: float = STALE_S) -> list[Path]:
    """Removes from the cache folder the libraries (and cached failures) beyond the `keep` most
    recently used (a cache hit marks its file used) and the temporary files of builds that never
    finished, where unused for `stale_s` seconds (a library another process may be about to load
    is kept). Returns what it removed."""
    now, removed = time.time(), []

    def age(p: Path) -> float:
        try:
            return now - p.stat().st_mtime
        except OSError:
            return 0.0
    builds = sorted([*root.glob(f"{PREFIX}*.so"), *root.glob(f"{PREFIX}*.failed")], key=age)
    partial = [p for p in root.glob("*.so") if not p.name.startswith(PREFIX)]
    for p in builds[keep:] + partial:
        if age(p) > stale_s:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
