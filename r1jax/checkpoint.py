"""Crash-safe, sharding-aware checkpoints of a whole training state (orbax).

A checkpoint holds two things for one training step:

* ``state``: an arbitrary JAX pytree (params, optax state, ``step``, rng key, MoE router
  biases, ...), written with orbax's ``StandardSave`` (tensorstore/OCDBT, one file set per
  step). Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key data
  (``jax.random.key_data``) and re-wrapped on restore, so both typed keys and raw
  ``uint32`` keys round-trip; the key dtype name (e.g. ``key<fry>``) is recorded and checked.
* ``metadata``: a small JSON dict (data iterator position, config name, metric pointer, ...).

Both are written into the same step directory and committed together, so a restored state
and its metadata always belong to the same step.

Typical use::

    ckpt = open_checkpoints("runs/x/ckpt", max_to_keep=3, save_interval_steps=100)
    if latest_step(ckpt) is not None:
        state, meta = restore(ckpt, abstract_state)      # straight into target shardings
    for ...:
        state = train_step(state, batch)
        save(ckpt, int(state.step), state, {"epoch": e, "index": i})   # async, returns fast
    close(ckpt)                                           # waits for the last write

Crash safety
------------
Orbax writes step ``N`` into ``<dir>/N.orbax-checkpoint-tmp`` and only when every file of
every item is written (and ``commit_success.txt`` is in place) renames it to ``<dir>/N``.
A rename is atomic on POSIX filesystems, so a run killed at any moment leaves either the
complete ``N/`` or a temporary directory that orbax never lists as a step. On top of that
this module:

* removes stale ``*.orbax-checkpoint-tmp*`` directories when a writable handle is opened
  (synchronously, so no cleanup thread outlives the handle); read-only handles never
  delete anything, so an evaluator may watch the directory of a running trainer;
* verifies, before reading, that a committed step's layout matches the restore target
  (clear :class:`CheckpointMismatchError` naming the first differing key path);
* treats a committed step that cannot be read (file removed or truncated, e.g. by a
  crash during orbax's deletion of old steps, or by disk trouble) as corrupt: restoring
  that step explicitly raises :class:`CheckpointCorruptError` naming its directory, and
  ``restore(step=None)`` falls back to the newest step that does restore, with a
  :class:`CheckpointFallbackWarning`. Steps skipped that way are renamed (never deleted)
  to ``<step>.corrupt-<time>`` by a writable handle, so that the resumed run can save
  those step numbers again and nothing is overwritten.

Asynchronous saves: the arrays are copied off the devices before :func:`save` returns,
then a background thread writes and commits. :func:`close` (or leaving a ``with`` block)
waits for that; handles still open at interpreter exit are closed by an exit hook that runs
before Python shuts down the thread pools orbax writes with, so a script that forgets to
close still commits its last save and leaves no thread behind.

Multi-process runs (``jax.distributed.initialize``, arrays sharded over a mesh that spans
processes): every process opens the same directory, which they must all see (a shared
filesystem or bucket), and calls :func:`save`, :func:`wait`, :func:`restore` and
:func:`close` at the same points with the same arguments; orbax coordinates them with
barriers. Each process writes and reads only the shards on its own devices; the JSON
metadata is written by process 0 and read by all. Tested with two processes on one machine
(``tests/test_multihost.py``: save, restore into the same shardings, and a stopped
``examples/r1_zero.py`` run resumed, both processes agreeing). The corrupt-step renaming
and the tmp-dir cleanup are done by process 0 only; the fallback past an unreadable step
assumes every process finds the same steps unreadable and is not tested across processes.

Not covered: silent bit flips inside otherwise well-formed files are not detected (no
checksums beyond those of the storage format), and whether a committed step survives a
power loss (rather than a process kill) depends on the filesystem flushing the final
rename.
"""
from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 -- must register its exit hook before ours
import dataclasses
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointHandle",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointFallbackWarning",
    "open_checkpoints",
    "save",
    "wait",
    "close",
    "latest_step",
    "all_steps",
    "restore",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STATE_ITEM = "state"
_META_ITEM = "metadata"
_TMP_SUFFIX = ocp.utils.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp"
_TMP_DIR_RE = re.compile(r"^\d+" + re.escape(_TMP_SUFFIX))


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------


class CheckpointError(Exception):
    """Base class of the errors raised by :mod:`r1jax.checkpoint`."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (committed) checkpoint exists where one was requested."""


class CheckpointCorruptError(CheckpointError):
    """A committed step directory exists but cannot be read back."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """The checkpoint's tree layout, shapes or dtypes differ from the restore target."""


class CheckpointFallbackWarning(UserWarning):
    """``restore(step=None)`` skipped unreadable newer steps and used an older one."""


# ----------------------------------------------------------------------------------------
# Handle
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class CheckpointHandle:
    """An open checkpoint directory; create with :func:`open_checkpoints`.

    Usable as a context manager (``with open_checkpoints(d) as ckpt: ...``), which calls
    :func:`close` on exit. Treat the fields as read-only.
    """

    directory: pathlib.Path
    manager: ocp.CheckpointManager
    read_only: bool
    closed: bool = False

    def __enter__(self) -> "CheckpointHandle":
        return self

    def __exit__(self, *exc_info) -> None:
        close(self)


def _new_manager(directory: pathlib.Path, *, max_to_keep: int | None, save_interval_steps: int,
                 async_save: bool, read_only: bool) -> ocp.CheckpointManager:
    """Builds the orbax manager with explicit handlers for the two items."""
    policy_kwargs: dict[str, Any] = {}
    managers = getattr(ocp, "checkpoint_managers", None)
    has_policies = managers is not None and hasattr(managers, "LatestN")
    if read_only:
        policy_kwargs["read_only"] = True
    else:
        if max_to_keep is not None:
            if has_policies:
                policy_kwargs["preservation_policy"] = managers.LatestN(n=max_to_keep)
            else:  # older orbax
                policy_kwargs["max_to_keep"] = max_to_keep
        if has_policies:
            # Orbax's default also saves the first step into an empty directory; we save
            # exactly the multiples of save_interval_steps (and on a preemption signal).
            policy_kwargs["save_decision_policy"] = managers.AnySavePolicy([
                managers.FixedIntervalPolicy(save_interval_steps),
                managers.PreemptionCheckpointingPolicy(),
            ])
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else save_interval_steps,
        create=False,  # created on the first save, so that restore can report a missing dir
        cleanup_tmp_directories=False,  # done synchronously by open_checkpoints
        enable_async_checkpointing=async_save,
        **policy_kwargs,
    )
    return ocp.CheckpointManager(
        directory,
        options=options,
        item_handlers={
            _STATE_ITEM: ocp.StandardCheckpointHandler(),
            _META_ITEM: ocp.JsonCheckpointHandler(),
        },
    )


def _remove_stale_tmp_dirs(directory: pathlib.Path) -> list[str]:
    """Deletes uncommitted ``<step>.orbax-checkpoint-tmp*`` dirs; returns their names."""
    if not directory.is_dir() or jax.process_index() != 0:
        return []
    removed = []
    for child in sorted(directory.iterdir()):
        if child.is_dir() and not child.is_symlink() and _TMP_DIR_RE.match(child.name):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    if removed:
        logger.warning("Removed uncommitted (interrupted) checkpoint directories in %s: %s",
                       directory, ", ".join(removed))
    return removed


def open_checkpoints(directory: str | os.PathLike, max_to_keep: int | None = 3,
                     save_interval_steps: int = 1, async_save: bool = True, *,
                     read_only: bool = False) -> CheckpointHandle:
    """Opens (lazily creating) a directory of step checkpoints.

    Args:
      directory: root directory; step ``N`` lives in ``<directory>/N``. It is created by the
        first :func:`save`, not here.
      max_to_keep: keep only the newest ``max_to_keep`` committed steps (older ones are
        deleted after a newer one is committed); ``None`` keeps all.
      save_interval_steps: :func:`save` only writes steps that are a multiple of this
        (unless ``force=True``, or a multi-host preemption signal was received).
      async_save: if True, :func:`save` returns once the arrays are copied off the
        devices and the files are written by a background thread; call :func:`wait` or
        :func:`close` to block until committed.
      read_only: never write or delete anything (no tmp-dir cleanup, no corrupt-step
        renaming); :func:`save` raises. Use this to read a directory another process
        writes to.

    Returns:
      A :class:`CheckpointHandle`. Close it with :func:`close` (also registered to run
      at interpreter exit, so a forgotten handle still commits its last save).

    A writable handle removes uncommitted temporary step directories left by a killed run.
    """
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    if save_interval_steps < 1:
        raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    path = pathlib.Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"checkpoint directory {path} exists but is not a directory")
    if not read_only:
        _remove_stale_tmp_dirs(path)
    manager = _new_manager(path, max_to_keep=max_to_keep,
                           save_interval_steps=save_interval_steps,
                           async_save=async_save, read_only=read_only)
    handle = CheckpointHandle(directory=path, manager=manager, read_only=read_only)
    _OPEN_HANDLES.add(handle)
    return handle


def wait(handle: CheckpointHandle) -> None:
    """Blocks until every pending asynchronous save is committed (re-raises its error)."""
    _check_open(handle)
    handle.manager.wait_until_finished()


def close(handle: CheckpointHandle) -> None:
    """Waits for pending saves, then releases orbax's threads. Idempotent."""
    if handle.closed:
        return
    handle.closed = True
    _OPEN_HANDLES.discard(handle)
    handle.manager.close()


# Handles not closed explicitly are closed at interpreter exit, which waits for their last
# asynchronous save to commit instead of leaving it as an (ignored) temporary directory.
_OPEN_HANDLES: set[CheckpointHandle] = set()


def _close_open_handles() -> None:
    for handle in list(_OPEN_HANDLES):
        try:
            close(handle)
        except Exception:  # noqa: BLE001 -- best effort at exit
            logger.exception("closing checkpoint handle for %s at exit failed", handle.directory)


# Orbax's writer threads use thread pools, which refuse new work once the interpreter starts
# shutting down -- before plain ``atexit`` hooks run. ``threading._register_atexit`` hooks run
# in reverse registration order before that, so register after concurrent.futures.thread.
_register_early_atexit = getattr(threading, "_register_atexit", atexit.register)
_register_early_atexit(_close_open_handles)


def _check_open(handle: CheckpointHandle) -> None:
    if not isinstance(handle, CheckpointHandle):
        raise TypeError(f"expected a CheckpointHandle from open_checkpoints, got {type(handle)}")
    if handle.closed:
        raise CheckpointError(f"checkpoint handle for {handle.directory} is closed")


# ----------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------


def all_steps(handle: CheckpointHandle) -> list[int]:
    """Steps of the directory, ascending: the committed step directories (temporary
    directories of interrupted saves never count) plus the steps this handle has saved.

    A step whose asynchronous save is still in flight counts as soon as :func:`save`
    returns; call :func:`wait` first to be sure it is committed. A read-only handle
    re-lists the directory on every call (another process may be writing to it); a
    writable one relies on its own bookkeeping since it was opened.
    """
    _check_open(handle)
    if handle.read_only:
        handle.manager.reload()
    return sorted(int(s) for s in handle.manager.all_steps())


def latest_step(handle: CheckpointHandle) -> int | None:
    """The newest committed step, or None if there is none.

    This is what ``restore(step=None)`` tries first; if that step turns out to be
    unreadable, restore falls back to an older one (see :func:`restore`).
    """
    steps = all_steps(handle)
    return steps[-1] if steps else None


# ----------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _orbax_path(keypath) -> tuple[str, ...]:
    return tuple(ocp.utils.tuple_path_from_keypath(keypath))


def _slash(path: tuple[str, ...]) -> str:
    return "/".join(path) if path else "<root>"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, jax.Array)) and np.ndim(obj) == 0:
        return np.asarray(obj).item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _plain_json(metadata: Mapping[str, Any] | None, step: int) -> dict[str, Any]:
    """A deep, JSON-round-tripped copy of the user metadata (numpy scalars become Python)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata for step {step} must be a dict, got {type(metadata).__name__}")
    bad_keys = [k for k in metadata if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"metadata keys for step {step} must be strings, got {bad_keys[:3]!r}")
    try:
        return json.loads(json.dumps(dict(metadata), default=_json_default))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"metadata for step {step} must be JSON-serialisable (str keys; str, int, float, "
            f"bool, None, list and dict values): {err}") from err


def _to_storable(state: Any) -> tuple[Any, dict[str, str]]:
    """Replaces typed PRNG keys by their uint32 key data; returns (tree, {path: key dtype})."""
    key_dtypes: dict[str, str] = {}

    def convert(keypath, leaf):
        if _is_typed_key(leaf):
            key_dtypes[_slash(_orbax_path(keypath))] = str(leaf.dtype)
            return jax.random.key_data(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, state), key_dtypes


def save(handle: CheckpointHandle, step: int, state: Any,
         metadata: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
    """Starts saving ``state`` and ``metadata`` as step ``step``.

    With ``async_save=True`` this returns once the arrays are copied off the devices (so
    the caller may donate or delete the state's buffers right away) while a background
    thread writes and commits; errors of that write surface at the next :func:`save`,
    :func:`wait` or :func:`close`. A save waits for the previous one to finish first.

    Args:
      handle: from :func:`open_checkpoints` (not read-only).
      step: the step number (non-negative int); must be newer than every saved step.
      state: any pytree of arrays / numpy arrays / Python scalars; typed PRNG keys allowed.
      metadata: JSON-serialisable dict (numpy scalars are converted), stored with the step.
      force: save even if ``step`` is not a multiple of ``save_interval_steps``.

    Returns:
      True if a save was started, False if skipped by ``save_interval_steps`` or because
      ``step`` is not newer than the latest saved step.

    Raises:
      TypeError: metadata is not a JSON-able dict.
      CheckpointError: read-only handle, or ``step`` already exists on disk.
    """
    _check_open(handle)
    if handle.read_only:
        raise CheckpointError(f"checkpoint handle for {handle.directory} is read-only")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    user_meta = _plain_json(metadata, step)
    storable, key_dtypes = _to_storable(state)
    payload = {"format_version": FORMAT_VERSION, "step": step, "user": user_meta,
               "prng_key_dtypes": key_dtypes}
    handle.directory.mkdir(parents=True, exist_ok=True)
    try:
        return bool(handle.manager.save(
            step,
            args=ocp.args.Composite(**{
                _STATE_ITEM: ocp.args.StandardSave(storable),
                _META_ITEM: ocp.args.JsonSave(payload),
            }),
            force=force,
        ))
    except ocp.checkpoint_manager.StepAlreadyExistsError as err:
        raise CheckpointError(
            f"cannot save step {step}: {handle.directory / str(step)} already exists") from err


# ----------------------------------------------------------------------------------------
# Restore
# ----------------------------------------------------------------------------------------


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _key_data_sharding(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding:
    """Sharding of the uint32 key data of a key array with ``sharding`` (trailing dims
    replicated)."""
    if sharding is None:
        return _default_sharding()
    if isinstance(sharding, (jax.sharding.NamedSharding, jax.sharding.SingleDeviceSharding)):
        return sharding  # a NamedSharding spec shorter than ndim replicates trailing dims
    raise TypeError(f"unsupported sharding {sharding!r} for a PRNG key restore target; use "
                    "a NamedSharding or SingleDeviceSharding")


def _abstract_leaf(leaf: Any) -> Any:
    """Restore-target leaf for orbax: ShapeDtypeStruct with sharding, or a numpy/Python leaf."""
    if _is_typed_key(leaf):
        if isinstance(leaf, jax.Array):
            data = jax.random.key_data(leaf)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype,
                                    sharding=_key_data_sharding(getattr(leaf, "sharding", None)))
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding if leaf.sharding is not None else _default_sharding()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return leaf  # numpy arrays and Python scalars are restored as such


def _wrap_key(data: jax.Array, like: Any) -> jax.Array:
    if isinstance(like, jax.Array):
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(like))
    try:
        return jax.random.wrap_key_data(data, dtype=like.dtype)
    except TypeError:  # jax without the dtype= argument
        return jax.random.wrap_key_data(data, impl=like.dtype._impl)  # noqa: SLF001


def _describe(leaf: Any, original: Any = None) -> str:
    if original is not None and _is_typed_key(original):
        return (f"a {original.dtype} PRNG key of shape {tuple(original.shape)} "
                f"(key data {_describe(leaf)})")
    shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
    dtype = getattr(leaf, "dtype", None)
    return f"shape {shape} {np.dtype(dtype).name if dtype is not None else type(leaf).__name__}"


def _leaf_differs(expected: Any, found: Any) -> bool:
    found_shape = getattr(found, "shape", None)
    if found_shape is not None and tuple(found_shape) != tuple(np.shape(expected)):
        return True
    if isinstance(expected, (bool, int, float, complex)):
        return False  # Python scalars: the stored width depends on jax_enable_x64
    found_dtype = getattr(found, "dtype", None)
    exp_dtype = getattr(expected, "dtype", None)
    return (found_dtype is not None and exp_dtype is not None
            and np.dtype(found_dtype) != np.dtype(exp_dtype))


def _check_layout(abstract: Any, target: Any, stored_tree: Any, step_dir: pathlib.Path) -> None:
    """Raises CheckpointMismatchError naming the first key path where they differ."""
    stored = ocp.tree.to_flat_dict(stored_tree)
    target_leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    originals = {_orbax_path(kp): (jax.tree_util.keystr(kp), leaf)
                 for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = []
    seen = set()
    for keypath, leaf in target_leaves:
        path = _orbax_path(keypath)
        seen.add(path)
        name, original = originals.get(path, (_slash(path), None))
        if path not in stored:
            problems.append(f"{name} is in the target but not in the checkpoint "
                            f"(target {_describe(leaf, original)})")
        elif _leaf_differs(leaf, stored[path]):
            problems.append(f"at {name} the target expects {_describe(leaf, original)} but "
                            f"the checkpoint has {_describe(stored[path])}")
    for path, leaf in stored.items():
        if path not in seen:
            problems.append(f"{_slash(path)} is in the checkpoint ({_describe(leaf)}) but not "
                            "in the target")
    if problems:
        more = f" ({len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
        raise CheckpointMismatchError(
            f"checkpoint {step_dir} does not match the restore target: {problems[0]}{more}")


def _check_key_dtypes(target: Any, saved: Mapping[str, str], step_dir: pathlib.Path) -> None:
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        if not _is_typed_key(leaf):
            continue
        path = _slash(_orbax_path(keypath))
        if path in saved and saved[path] != str(leaf.dtype):
            raise CheckpointMismatchError(
                f"checkpoint {step_dir} does not match the restore target: at "
                f"{jax.tree_util.keystr(keypath)} the target expects a {leaf.dtype} PRNG key but "
                f"the checkpoint holds a {saved[path]} key")


def _short(err: BaseException) -> str:
    """First line of an error (tensorstore errors embed a long spec), for messages."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(" See full TensorStore details")[0]
    return f"{type(err).__name__}: {text[:300]}"


def _restore_step(handle: CheckpointHandle, step: int, target: Any) -> tuple[Any, dict]:
    """Restores one committed step; CheckpointCorruptError if it cannot be read."""
    step_dir = handle.directory / str(step)
    abstract = jax.tree_util.tree_map(_abstract_leaf, target)
    try:
        stored = handle.manager.item_metadata(step)[_STATE_ITEM]
    except Exception as err:  # noqa: BLE001 -- any read failure means unreadable
        raise CheckpointCorruptError(
            f"checkpoint step {step} at {step_dir} is unreadable (tree metadata): "
            f"{_short(err)}") from err
    if stored is None:
        raise CheckpointCorruptError(
            f"checkpoint step {step} at {step_dir} is unreadable: no '{_STATE_ITEM}' item")
    _check_layout(abstract, target, getattr(stored, "tree", stored), step_dir)
    try:
        restored = handle.manager.restore(step, args=ocp.args.Composite(**{
            _STATE_ITEM: ocp.args.StandardRestore(abstract),
            _META_ITEM: ocp.args.JsonRestore(),
        }))
        state, payload = restored[_STATE_ITEM], restored[_META_ITEM]
    except Exception as err:  # noqa: BLE001
        # Orbax abandons the other pending array reads of a failed restore; finalise them now
        # (each logs an "Exception ignored" traceback) rather than at some later collection.
        traceback.clear_frames(err.__traceback__)
        gc.collect()
        raise CheckpointCorruptError(
            f"checkpoint step {step} at {step_dir} is corrupt or truncated: "
            f"{_short(err)}") from err
    if not isinstance(payload, Mapping) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointCorruptError(
            f"checkpoint step {step} at {step_dir} has no valid r1jax metadata "
            f"(expected format_version {FORMAT_VERSION}, found {payload!r:.200})")
    _check_key_dtypes(target, payload.get("prng_key_dtypes", {}), step_dir)
    state = jax.tree_util.tree_map(
        lambda like, x: _wrap_key(x, like) if _is_typed_key(like) else x, target, state)
    return state, dict(payload.get("user", {}))


def _quarantine(handle: CheckpointHandle, steps: list[int]) -> None:
    """Renames unreadable step dirs aside so their step numbers can be saved again."""
    if handle.read_only or jax.process_index() != 0:
        return
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for step in steps:
        src = handle.directory / str(step)
        dst = handle.directory / f"{step}.corrupt-{stamp}"
        n = 1
        while dst.exists():
            n += 1
            dst = handle.directory / f"{step}.corrupt-{stamp}-{n}"
        try:
            src.rename(dst)
            warnings.warn(f"moved unreadable checkpoint {src} to {dst}",
                          CheckpointFallbackWarning, stacklevel=3)
        except OSError as err:
            warnings.warn(f"could not move unreadable checkpoint {src} aside: {err}",
                          CheckpointFallbackWarning, stacklevel=3)
    handle.manager.reload()


def _no_checkpoint_message(directory: pathlib.Path) -> str:
    if not directory.exists():
        return f"no checkpoint found in {directory}: the directory does not exist"
    tmp = sorted(p.name for p in directory.iterdir() if _TMP_SUFFIX in p.name)
    extra = (f" (ignored {len(tmp)} uncommitted temporary dir(s): {', '.join(tmp[:3])})"
             if tmp else "")
    return f"no checkpoint found in {directory}: it holds no committed step directory{extra}"


def restore(handle: CheckpointHandle, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores a step straight into the target's shardings.

    Args:
      handle: from :func:`open_checkpoints`.
      target: the state's structure, either abstract (pytree of ``jax.ShapeDtypeStruct``,
        with ``.sharding`` e.g. a ``NamedSharding`` on a mesh; ``sharding=None`` means the
        default device) or a concrete example state (its arrays' shapes, dtypes and
        shardings are used, its values ignored). Numpy / Python scalar leaves come back as
        numpy / Python values. A typed PRNG key leaf (concrete or ``ShapeDtypeStruct`` with a
        key dtype) comes back as a typed key; a ``uint32`` leaf as raw key data, whichever
        form was saved.
      step: the step to restore; None means the newest committed step that can be read.

    Returns:
      ``(state, metadata)``: the state with the target's tree structure and shardings, and
      the metadata dict saved with that step.

    Raises:
      CheckpointNotFoundError: the directory is missing, holds no committed step, or
        ``step`` is not one of them.
      CheckpointMismatchError: the stored tree differs from the target (names the first
        differing key path and both shapes/dtypes). Never triggers a fallback.
      CheckpointCorruptError: ``step`` was given and its directory cannot be read; or
        ``step=None`` and no committed step can be read.

    With ``step=None`` an unreadable newest step is skipped with a
    :class:`CheckpointFallbackWarning` and the next older one is tried, so a run resumes
    from the newest complete checkpoint. When an older step succeeds, a writable handle
    renames the skipped directories to ``<step>.corrupt-<time>`` (kept for inspection) so
    the resumed run can save those steps again. Which step was restored is whatever the
    state records (e.g. ``state.step``); the warnings name it too.

    Waits for this handle's pending saves first and re-lists the directory.
    """
    _check_open(handle)
    handle.manager.wait_until_finished()
    handle.manager.reload()
    steps = all_steps(handle)
    if not steps:
        raise CheckpointNotFoundError(_no_checkpoint_message(handle.directory))
    if step is not None:
        step = int(step)
        if step not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {handle.directory}; committed steps: {steps}")
        return _restore_step(handle, step, target)
    failed: list[CheckpointCorruptError] = []
    for candidate in reversed(steps):
        try:
            result = _restore_step(handle, candidate, target)
        except CheckpointCorruptError as err:
            warnings.warn(f"{err}; falling back to an older checkpoint",
                          CheckpointFallbackWarning, stacklevel=2)
            failed.append(err)
            continue
        if failed:
            warnings.warn(f"restored step {candidate} from {handle.directory} after skipping "
                          f"unreadable newer step(s) {sorted(steps[-len(failed):])}",
                          CheckpointFallbackWarning, stacklevel=2)
            _quarantine(handle, [s for s in steps if s > candidate])
        return result
    raise CheckpointCorruptError(
        f"none of the {len(steps)} committed checkpoint(s) in {handle.directory} could be "
        "restored:\n" + "\n".join(f"  {e}" for e in failed))
