"""Timing and stand-in helpers shared by the benchmark scripts (no absl flags here)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` starting ``round_index`` places later (wrapping).

    Interleaved benchmarks run their variants in this order in round r, so no variant always
    runs first: a call right after other jitted work runs up to ~8% slower on a shared CPU.

    >>> rotated(["a", "b", "c"], 4)
    ['b', 'c', 'a']
    """
    items = list(items)
    k = round_index % len(items) if items else 0
    return items[k:] + items[:k]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def interleaved_times(calls: dict[Hashable, Callable[[], Any]], reps: int
                      ) -> tuple[dict[Hashable, list[float]], dict[Hashable, list[float]]]:
    """Wall and process-CPU seconds of every call, ``reps`` rounds in a rotating order.

    Each call's result is waited for (``jax.block_until_ready``) inside its timing. Returns
    ``(wall, cpu)``, each ``{key: [seconds per round]}``.
    """
    wall: dict[Hashable, list[float]] = {key: [] for key in calls}
    cpu: dict[Hashable, list[float]] = {key: [] for key in calls}
    for r in range(reps):
        for key in rotated(list(calls), r):
            c0, t0 = cpu_seconds(), time.perf_counter()
            jax.block_until_ready(calls[key]())
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(cpu_seconds() - c0)
    return wall, cpu


def stand_in_grads(params: Any, key: jax.Array) -> Any:
    """i.i.d. normal arrays like ``params``: only their ranking matters to RigL's grow score."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [
        jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        for i, x in enumerate(leaves)])
