"""Checkpoints of the whole train state, over `orbax.checkpoint.CheckpointManager`.

Layout under a run's workdir::

    workdir/checkpoints/<step>/state     the train-state pytree (any sharding, typed PRNG keys)
    workdir/checkpoints/<step>/metadata  a JSON dict (iteration, data position, config, ...)
    workdir/best/<step>/...              the same, for the single best-metric checkpoint

Orbax writes each step into a temporary directory and renames it once complete, so a step that
`all_steps` lists is never half-written by an interrupted save. Saves run in the background:
call `wait_until_finished` (or `close`) before the process exits.

Multi-process runs: every process must call `save`, `save_best` and `restore` with the same
arguments (orbax coordinates the processes, each writes its own shards); `restore` is a
collective too. Decide to stop on all processes together (`StopFlag.requested_anywhere`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# Stopping cleanly on SIGTERM / Ctrl-C lives in ddst_jax.stopping; re-exported here.
from ddst_jax.stopping import StopFlag, install_stop_handler  # noqa: F401

_STATE = "state"
_METADATA = "metadata"


class CheckpointError(RuntimeError):
    """A checkpoint on disk cannot be restored into the requested target."""


class _UnreadableCheckpointError(CheckpointError):
    """The files of one step are damaged or incomplete; an older step may still be good."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns.

    Attributes:
        state: the train state, with the structure, dtypes and shardings of the target.
        metadata: the JSON dict saved with it (tuples come back as lists).
    """

    state: Any
    metadata: dict[str, Any]


def abstract_state(state: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Restore target for `state`: a `jax.ShapeDtypeStruct` per leaf.

    Args:
        state: a pytree of arrays or of `ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
        sharding: if given, every leaf is restored with this sharding (e.g. a replicated
            `NamedSharding` over the mesh); otherwise each leaf keeps its own, if any.

    Returns:
        The same tree with `ShapeDtypeStruct` leaves.
    """

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        own = getattr(x, "sharding", None)
        chosen = own if sharding is None else sharding
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=chosen)

    return jax.tree.map(leaf, state)


class Checkpointer:
    """Periodic checkpoints (latest `max_to_keep` steps) and one best-metric checkpoint.

    Example::

        ckpt = Checkpointer(workdir)
        restored = ckpt.restore(abstract_state(state, replicated))
        if restored is not None:
            state, meta = restored
        ...
        ckpt.save(it, state, {"iteration": it, "data_position": pos, "finished": False})
        ckpt.save_best(it, state, fid)
        ckpt.close()
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        *,
        max_to_keep: int | None = 3,
        best_metric: str = "fid",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        """Opens (creating if needed) the checkpoint directories of a run.

        Args:
            workdir: the run directory; checkpoints go to `workdir/checkpoints` and
                `workdir/best`.
            max_to_keep: how many periodic checkpoints to keep (newest steps); None keeps all.
            best_metric: name of the metric `save_best` ranks by (stored with the checkpoint).
            best_mode: "min" (lower is better, as for FID) or "max".
            async_save: write in a background thread; arrays are copied to host first, so
                the caller may donate or overwrite its buffers as soon as `save` returns.
        """
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}.")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}.")
        self.workdir = epath.Path(workdir)
        self.best_metric = best_metric
        self.best_mode = best_mode
        self._periodic = _manager(
            self.workdir / "checkpoints",
            async_save,
            preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        )
        # Ranked by metric, not step: a resumed run may find a better value at a lower step.
        # `best_fn` makes orbax store each step's metrics; BestN sorts ascending and keeps
        # the last n, so "min" sorts in reverse.
        get_metric = lambda metrics: metrics[best_metric]
        self._best = _manager(
            self.workdir / "best",
            async_save,
            best_fn=get_metric,
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.BestN(
                get_metric_fn=get_metric, reverse=best_mode == "min", n=1
            ),
        )
        self._best_value = self._read_best_value()

    # Periodic checkpoints.

    def save(
        self,
        step: int,
        state: Any,
        metadata: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving `state` and `metadata` as checkpoint `step` (all processes call this).

        Every call writes, whatever the newest step on disk (the caller decides when to save),
        except when `step` already exists.

        Args:
            step: the checkpoint's step number (e.g. the training iteration), >= 0.
            state: any pytree of arrays (typed PRNG keys, bool masks, optax states included).
            metadata: a JSON-serializable dict saved alongside.
            force: replace an existing checkpoint of the same step (it is deleted first);
                otherwise that step is left alone and nothing is written.

        Returns:
            Whether a save was started.
        """
        return _save(self._periodic, step, state, metadata, force=force)

    def restore(
        self,
        target: Any,
        *,
        step: int | None = None,
        fallback_to_previous: bool = False,
    ) -> Restored | None:
        """Restores a periodic checkpoint into the structure, dtypes and shardings of `target`.

        Args:
            target: the abstract train state (`abstract_state(...)` or `jax.eval_shape`
                output; a leaf carrying a sharding comes back with that sharding).
            step: the step to restore; None for the latest.
            fallback_to_previous: if the chosen step is unreadable (damaged files, missing
                items), log a warning and try the next older step instead of failing.

        Returns:
            `Restored(state, metadata)`, or None when there is no checkpoint at all.

        Raises:
            CheckpointError: the checkpoint is unreadable, or does not match `target`. The
                files on disk are never modified by a failed restore.
        """
        return _restore(self._periodic, target, step, fallback_to_previous)

    def latest_step(self) -> int | None:
        """The newest periodic step on disk (or being saved), or None."""
        return self._periodic.latest_step()

    def all_steps(self) -> list[int]:
        """All periodic steps on disk, ascending."""
        return sorted(self._periodic.all_steps())

    # The best checkpoint.

    def save_best(
        self,
        step: int,
        state: Any,
        metric: float,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Saves `state` to the best slot if `metric` beats the best so far (all processes).

        The best slot is separate from the periodic checkpoints and holds a single step.

        Args:
            step: the step the metric was measured at.
            state: the pytree to keep (e.g. the full state, or only the EMA generator).
            metric: the value of `best_metric` (e.g. FID); non-finite values never win.
            metadata: a JSON-serializable dict saved alongside.

        Returns:
            Whether a save was started.
        """
        value = float(metric)
        if not math.isfinite(value):
            logging.warning("Not saving best checkpoint at step %d: %s=%s.", step,
                            self.best_metric, value)
            return False
        best = self._best_value
        if best is not None and not (value < best if self.best_mode == "min" else value > best):
            return False
        saved = _save(self._best, step, state, metadata, force=True,
                      metrics={self.best_metric: value})
        if saved:
            self._best_value = value
        return saved

    def restore_best(self, target: Any) -> Restored | None:
        """Restores the best checkpoint into `target` (see `restore`); None if there is none."""
        return _restore(self._best, target, None, False)

    def best_step(self) -> int | None:
        """The step held in the best slot, or None."""
        return self._best.best_step()

    def best_value(self) -> float | None:
        """The metric of the checkpoint in the best slot, or None."""
        return self._best_value

    def _read_best_value(self) -> float | None:
        step = self._best.latest_step()
        if step is None:
            return None
        try:
            return float(self._best.metrics(self._best.best_step())[self.best_metric])
        except Exception as e:  # unreadable or ranked by another metric: let any value win
            logging.warning("Cannot read %s of the best checkpoint in %s (%s); the next "
                            "save_best will replace it.", self.best_metric, self._best.directory,
                            e)
            return None

    # Lifetime.

    def wait_until_finished(self) -> None:
        """Blocks until every started save is on disk (renamed into place)."""
        self._periodic.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._periodic.close()
        self._best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _manager(directory: epath.Path, async_save: bool, **options: Any) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        # Keep opening side-effect free: deleting "*.orbax-checkpoint-tmp" leftovers here could
        # remove a save in progress of another process (e.g. an eval job watching the run).
        # Orbax ignores leftovers and replaces one when it saves that step again.
        cleanup_tmp_directories=False,
        create=True,
        **options,
    )
    # Registering the handlers up front lets `item_metadata` work before any restore.
    handlers = {_STATE: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(
        directory, item_names=(_STATE, _METADATA), item_handlers=handlers, options=options
    )


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return manager.directory / str(step)


def _checked_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"Checkpoint metadata must be a dict, got {type(metadata).__name__}.")
    try:
        json.dumps(dict(metadata))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"Checkpoint metadata must be JSON-serializable ({e}); convert arrays with "
            "`.tolist()` or `int(...)` and a ConfigDict with `.to_dict()`."
        ) from e
    return dict(metadata)


def _save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    metadata: Mapping[str, Any] | None,
    *,
    force: bool,
    metrics: Mapping[str, float] | None = None,
) -> bool:
    if not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"Checkpoint step must be a non-negative int, got {step!r}.")
    step = int(step)
    meta = _checked_metadata(metadata)
    if step in manager.all_steps():
        if not force:
            logging.warning("Checkpoint %s already exists; not overwriting it (pass force=True "
                            "to replace it).", _step_dir(manager, step))
            return False
        manager.wait_until_finished()
        manager.delete(step)
    args = ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(meta)}
    )
    # force=True: skip orbax's "only newer than the latest step" rule, so that a run resumed
    # from an older step (after a fallback) can still checkpoint, e.g. on preemption.
    return bool(manager.save(step, args=args, force=True,
                             metrics=None if metrics is None else dict(metrics)))


def _restore(
    manager: ocp.CheckpointManager,
    target: Any,
    step: int | None,
    fallback: bool,
) -> Restored | None:
    manager.wait_until_finished()  # a step still being written cannot be read back
    steps = sorted(manager.all_steps(), reverse=True)
    if step is None:
        if not steps:
            return None
        candidates = steps
    else:
        if step not in steps:
            raise CheckpointError(
                f"No checkpoint for step {step} in {manager.directory}; available steps: "
                f"{sorted(steps)}. Pass one of those, or step=None for the latest."
            )
        candidates = [s for s in steps if s <= step]
    if not fallback:
        candidates = candidates[:1]
    failures: list[_UnreadableCheckpointError] = []
    for s in candidates:
        try:
            restored = _restore_step(manager, s, target)
        except _UnreadableCheckpointError as e:
            failures.append(e)
            if fallback and s != candidates[-1]:
                logging.warning("%s Trying the previous checkpoint.", e)
            continue
        if failures:
            logging.warning("Restored the older checkpoint %s instead; unreadable steps left on "
                            "disk untouched: %s.", _step_dir(manager, s),
                            [f.step for f in failures])
        return restored
    if len(failures) == 1:
        raise failures[0]
    raise CheckpointError(
        f"None of the checkpoints {candidates} in {manager.directory} could be restored:\n"
        + "\n".join(str(f) for f in failures)
    )


def _unreadable(
    manager: ocp.CheckpointManager, step: int, cause: str
) -> _UnreadableCheckpointError:
    path = _step_dir(manager, step)
    return _UnreadableCheckpointError(
        f"Checkpoint {path} is unreadable ({cause}). It is damaged or incomplete: delete that "
        "directory (or restore with fallback_to_previous=True) to resume from the previous "
        "step, or start from a fresh --workdir.",
        step,
    )


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any) -> Restored:
    try:
        stored = manager.item_metadata(step)[_STATE]
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise _unreadable(manager, step, f"{type(e).__name__}: {_first_line(e)}") from e
    if stored is None:
        raise _unreadable(manager, step, "its 'state' item is missing")
    mismatch = _describe_mismatch(getattr(stored, "tree", stored), target)
    if mismatch:
        raise CheckpointError(
            f"Checkpoint {_step_dir(manager, step)} does not match the requested state: "
            f"{mismatch}. It was written by a different model or configuration: resume with "
            "the configuration that wrote it, or start from a fresh --workdir."
        )
    args = ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(target), _METADATA: ocp.args.JsonRestore()}
    )
    try:
        restored = manager.restore(step, args=args)
    except Exception as e:
        raise _unreadable(manager, step, f"{type(e).__name__}: {_first_line(e)}") from e
    metadata = restored[_METADATA]
    if not isinstance(metadata, dict):
        raise _unreadable(manager, step, "its 'metadata' item is missing")
    return Restored(restored[_STATE], metadata)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _leaf_spec(leaf: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) as stored on disk; typed PRNG keys are stored as their key data."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        return None
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _dtype_kind(dtype: np.dtype) -> str:
    for kind in (np.bool_, np.integer, np.floating, np.complexfloating):
        if jnp.issubdtype(dtype, kind):
            return kind.__name__
    return str(dtype)


def _describe_mismatch(stored_tree: Any, target: Any, show: int = 5) -> str | None:
    """A short description of how `target` differs from the stored tree, or None."""
    stored = ocp.tree.to_flat_dict(stored_tree)
    wanted = ocp.tree.to_flat_dict(target)
    name = lambda path: "/".join(str(k) for k in path)
    problems = []
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing:
        problems.append(f"{len(missing)} target leaves are not in the checkpoint "
                        f"({', '.join(name(p) for p in missing[:show])}"
                        f"{', ...' if len(missing) > show else ''})")
    if extra:
        problems.append(f"{len(extra)} checkpoint leaves are not in the target "
                        f"({', '.join(name(p) for p in extra[:show])}"
                        f"{', ...' if len(extra) > show else ''})")
    for path in sorted(set(wanted) & set(stored)):
        want, have = _leaf_spec(wanted[path]), _leaf_spec(stored[path])
        if want is None or have is None:
            continue
        # Orbax casts on restore, and a Python-int counter is stored as int64 but traced as
        # int32; only a change of kind (bool/int/float) means a different state layout.
        if want[0] != have[0] or _dtype_kind(want[1]) != _dtype_kind(have[1]):
            problems.append(f"{name(path)} is {have[1]}{list(have[0])} in the checkpoint but "
                            f"{want[1]}{list(want[0])} in the target")
            if len(problems) >= show + 2:
                break
    return "; ".join(problems) or None

