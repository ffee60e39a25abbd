"""Checkpoints of a whole train state: a thin wrapper over Orbax's CheckpointManager.

A step directory holds three Orbax items:

- ``state``: the train-state pytree (arrays, including PRNG keys).
- ``metadata``: a JSON dict from the caller (grid spec, run arguments).
- ``manifest``: one record per state leaf: its path, shape, dtype and a 64-bit
  fingerprint of its bits.

Orbax makes a save atomic (``<step>.orbax-checkpoint-tmp``, renamed when complete), so a
killed process leaves no half-written step. Files can still be damaged later (a full disk,
a bad copy), and tensorstore does not notice changed bytes in an uncompressed chunk, so
:meth:`Checkpointer.restore` checks every restored leaf's fingerprint against the
manifest; a damaged step is logged as one line and the next older one is tried.

PRNG keys: raw ``uint32`` keys are ordinary arrays; typed keys (``jax.random.key``)
come back typed when the abstract target says so.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from sae_jax._fingerprint import fingerprints
from sae_jax._trees import by_path, concrete_target, first_difference, leaf_records
from sae_jax.errors import UsageError

PyTree = Any

_ITEMS = ("state", "metadata", "manifest")
_FORMAT = 1

log = logging.getLogger(__name__)


class CheckpointError(UsageError):
    """No usable checkpoint, or one that does not fit the state being restored."""


class _Unusable(Exception):
    """A step that is partial or damaged; an older one may still be good."""


# --------------------------------------------------------------------------- Orbax noise


def _install_noise_filter() -> None:
    """Sends the echoes of a failed Orbax array read to the debug log, not stderr.

    When one read of a damaged checkpoint fails, Orbax closes its event loop while other
    reads are in flight, and each prints a traceback through ``sys.unraisablehook``.
    The failure itself is raised and handled. Everything else goes to the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_sae_jax_filter", False):
        return

    def hook(unraisable: Any) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        loop_closed = obj is None and isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        if loop_closed or "_read_array_index_and_device_put" in repr(obj):
            log.debug("ignored after a failed checkpoint read: %r", exc)
        else:
            previous(unraisable)

    hook._sae_jax_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _one_line(exc: BaseException) -> str:
    """The innermost cause's message, on one line, at most ~200 characters."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- Checkpointer


class Checkpointer:
    """Saves and restores ``(state, metadata)`` per step under one directory.

    Keeps the newest ``max_to_keep`` steps. Saves are asynchronous: :meth:`save`
    returns once the arrays are copied off the device, and the files are written in
    the background. Use as a context manager, or call :meth:`close`, so the last save
    is finished before the process exits.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, process_local: bool = False):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise UsageError(f"max_to_keep must be an integer >= 1, got {max_to_keep!r}")
        self.directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.directory}: {e.strerror}"
            ) from e
        if not os.access(self.directory, os.W_OK):
            raise CheckpointError(f"checkpoint directory {self.directory} is not writable")
        # process_local: only this process uses it (host arrays, no barriers with the others)
        alone, me = process_local and jax.process_count() > 1, jax.process_index()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            create=not alone,
            cleanup_tmp_directories=False,  # below: Orbax's thread could outlive close()
            enable_async_checkpointing=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                **({"primary_host": me, "active_processes": {me}} if alone else {})),
        )
        if not alone or me == 0:  # saves a killed process left half-written
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)
        self._warned: set[tuple[int, str]] = set()

    # -- saving

    def save(self, step: int, state: PyTree, metadata: Mapping[str, Any]) -> None:
        """Starts an atomic save of ``state`` and the JSON dict ``metadata`` as ``step``.

        An existing checkpoint with the same step (one left by an earlier run that was
        resumed from an older step) is replaced.
        """
        step = int(step)
        try:
            metadata = json.loads(json.dumps(dict(metadata), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata must be a JSON object: {e}") from e
        records = leaf_records(state)
        for record in records:
            if 0 in record["shape"]:
                raise ValueError(f"Orbax cannot save the empty array {record['path']}")
        for record, fp in zip(records, fingerprints(jax.tree.leaves(state))):
            record["fingerprint"] = fp
        manifest = {"format": _FORMAT, "leaves": records}
        if step in self._manager.all_steps():
            self._manager.wait_until_finished()
            log.warning("replacing the existing checkpoint for step %d in %s", step, self.directory)
            self._manager.delete(step)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                metadata=ocp.args.JsonSave(metadata),
                manifest=ocp.args.JsonSave(manifest),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until every started save is on disk; raises if one failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases Orbax's threads. Idempotent."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- reading

    def all_steps(self) -> list[int]:
        """Every step Orbax sees as committed, oldest first (complete or not)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step whose items are all present and whose JSON items parse.

        This reads no arrays. :meth:`restore` also checks the array contents and may
        fall back further.
        """
        for step in reversed(self.all_steps()):
            try:
                self._read_json_items(step)
                return step
            except _Unusable as e:
                self._warn(step, str(e))
        return None

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the newest complete step), reading no arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        try:
            return self._read_json_items(step)[0]
        except _Unusable as e:
            raise CheckpointError(f"checkpoint step {step} in {self.directory}: {e}") from None

    def restore(
        self, abstract_state: PyTree, step: int | None = None
    ) -> tuple[PyTree, dict[str, Any], int]:
        """Returns ``(state, metadata, step)`` from the newest usable step, or ``step``.

        ``abstract_state`` gives the pytree structure (registered dataclasses,
        NamedTuples, optax states come back as themselves) and, per leaf, shape, dtype
        and optionally sharding, e.g. ``jax.eval_shape(init_fn)`` with shardings added.
        Damaged steps are logged and skipped when ``step`` is None.

        Raises:
          CheckpointError: no usable step; ``step`` is damaged or missing; or the
            checkpoint's leaves differ from ``abstract_state``'s.
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory}")
            try:
                return self._restore_step(abstract_state, int(step))
            except _Unusable as e:
                msg = f"checkpoint step {step} in {self.directory} is unusable: {e}"
                raise CheckpointError(msg) from None
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        problems = []
        for candidate in reversed(steps):
            try:
                return self._restore_step(abstract_state, candidate)
            except _Unusable as e:
                self._warn(candidate, str(e))
                problems.append(f"step {candidate}: {e}")
        raise CheckpointError(f"no usable checkpoint in {self.directory} ({'; '.join(problems)})")

    def _warn(self, step: int, problem: str) -> None:
        if (step, problem) not in self._warned:
            self._warned.add((step, problem))
            log.warning("checkpoint step %d in %s is unusable, skipping it: %s",
                        step, self.directory, problem)

    def _read_json_items(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The step's (metadata, manifest) after checking every item is present."""
        step_dir = os.path.join(self.directory, str(step))
        if not os.path.isdir(step_dir):
            raise _Unusable("its directory is missing")
        for item in _ITEMS:
            if not os.path.isdir(os.path.join(step_dir, item)):
                raise _Unusable(f"item directory '{item}' is missing")
        if not os.path.isfile(os.path.join(step_dir, "state", "_METADATA")):
            raise _Unusable("the state's array index state/_METADATA is missing")
        metadata, manifest = (_read_json(os.path.join(step_dir, i, "metadata"), i) for i in _ITEMS[1:])
        if not isinstance(metadata, dict):
            raise _Unusable("metadata is not a JSON object")
        if not (isinstance(manifest, dict) and manifest.get("format") == _FORMAT
                and isinstance(manifest.get("leaves"), list)):
            raise _Unusable(f"manifest is not a format-{_FORMAT} sae_jax manifest")
        return metadata, manifest

    def _restore_by_path(self, abstract_state: PyTree, step: int) -> PyTree:
        """The step's arrays restored as saved (no target), placed by key path: a checkpoint
        written before `GroupState.world_index` (None by default) existed."""
        raw = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return by_path(raw.state, abstract_state)

    def _restore_step(self, abstract_state: PyTree, step: int) -> tuple[PyTree, dict, int]:
        metadata, manifest = self._read_json_items(step)
        saved = manifest["leaves"]
        wanted = leaf_records(abstract_state)
        strip = [{k: r.get(k) for k in ("path", "shape", "dtype")} for r in saved]
        if strip != wanted:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not fit the state to "
                f"restore: {first_difference(strip, wanted)}"
            )
        _install_noise_filter()
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(concrete_target(abstract_state))
                ),
            )
        except Exception as e:  # Orbax and tensorstore raise many types for bad files.
            gc.collect()  # report the failed reads' echoes now, to the filter
            if "tree structures do not match" not in str(e):
                raise _Unusable(f"cannot read its arrays ({_one_line(e)})") from None
            try:  # same leaves, other tree: a field that is None by default was added since
                state = self._restore_by_path(abstract_state, step)
            except Exception as e2:
                raise _Unusable(f"cannot read its arrays ({_one_line(e)}; {_one_line(e2)})") from None
        else:
            state = restored.state
        for record, fp in zip(saved, fingerprints(jax.tree.leaves(state))):
            if fp != record.get("fingerprint"):
                raise _Unusable(f"array {record['path']} does not match its saved checksum")
        return state, metadata, step


def _read_json(path: str, item: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise _Unusable(f"{item} is unreadable ({_one_line(e)})") from None


# --------------------------------------------------------------------------- metadata


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_MISSING = object()


def metadata_mismatches(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] | None = None
) -> list[str]:
    """One line per key whose value differs between a checkpoint and this run.

    Nested dicts are compared per leaf under dotted keys (``grid.l1``). ``current``
    goes through the same JSON round trip as saved metadata, so tuples equal lists.
    ``keys`` limits the comparison (a dotted key or a prefix of one); by default every
    key of either side is compared. An empty list means the run may resume.
    """
    flat_saved = _flatten(saved)
    flat_current = _flatten(json.loads(json.dumps(dict(current))))
    names = sorted(set(flat_saved) | set(flat_current))
    if keys is not None:
        wanted = list(keys)
        names = [n for n in names if any(n == k or n.startswith(k + ".") for k in wanted)]
    lines = []
    for name in names:
        a, b = flat_saved.get(name, _MISSING), flat_current.get(name, _MISSING)
        if a != b:
            lines.append(f"{name}: the checkpoint has {_show(a)}, this run has {_show(b)}")
    return lines


def _show(value: Any) -> str:
    return "nothing" if value is _MISSING else json.dumps(value)


def latest_run_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``run_config`` of the newest complete checkpoint under ``directory`` (None when there
    is none); reads no arrays."""
    if not os.path.isdir(directory):
        return None
    with Checkpointer(directory, process_local=True) as ckpt:
        return None if ckpt.latest_step() is None else dict(ckpt.read_metadata().get("run_config", {}))


def resume(ckpt: Checkpointer, template: PyTree, run_config: Mapping[str, Any],
           may_grow: Iterable[str] = (), check: Any = None) -> tuple[PyTree, dict[str, Any], int]:
    """``(state, metadata, step)`` of the newest usable checkpoint, shaped like ``template``;
    refused (one line, no array read) when there is none, when ``check(metadata)`` raises, or
    when its ``run_config`` differs, except for ``may_grow`` keys that grew (extended runs)."""
    if ckpt.latest_step() is None:
        raise CheckpointError(f"--resume: no complete checkpoint under {ckpt.directory}")
    meta = ckpt.read_metadata()
    if check is not None:
        check(meta)
    saved, current = dict(meta.get("run_config", {})), dict(run_config)
    for key in [k for k in may_grow if k in saved and k in current and saved[k] < current[k]]:
        saved.pop(key), current.pop(key)
    diffs = metadata_mismatches(saved, current)
    if diffs:
        raise CheckpointError("--resume with different arguments: " + "; ".join(diffs[:3]))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), template)
    return ckpt.restore(abstract)
