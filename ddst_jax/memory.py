"""Peak host and device memory of this process, and the buffer sizes of a compiled function.

``memory_report()`` is cheap (no device sync, no allocation) and JSON-friendly: every value is
a float in MiB or ``None`` where the backend does not report it (XLA:CPU has no device
``memory_stats()``; ``memory_analysis()`` may be missing on some backends).

    >>> report = memory_report()
    >>> report["host_peak_rss_mb"] > 0
    True
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import jax

MB = float(2**20)

#: ``compiled.memory_analysis()`` fields reported by ``memory_report`` (as ``compiled_<name>_mb``).
COMPILED_FIELDS = ("argument", "output", "alias", "temp", "generated_code", "peak_memory")


def host_peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage`` ru_maxrss).

    Monotonic over the process's life: a later, smaller working set does not lower it.

    >>> host_peak_rss_mb() > 0
    True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / MB if sys.platform == "darwin" else peak / 1024.0


def device_memory_mb(device: jax.Device | None = None) -> dict[str, float | None]:
    """Device allocator statistics in MiB: ``device_peak_mb``, ``device_in_use_mb``.

    ``None`` values where the backend keeps no statistics (``memory_stats()`` is None on CPU).
    ``device`` defaults to this process's first local device.
    """
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    stats = stats or {}

    def mb(key: str) -> float | None:
        return stats[key] / MB if key in stats else None

    return {"device_peak_mb": mb("peak_bytes_in_use"), "device_in_use_mb": mb("bytes_in_use")}


def compiled_memory_mb(compiled: Any) -> dict[str, float | None]:
    """Buffer sizes XLA assigned to a compiled executable, in MiB (``compiled_<field>_mb``).

    ``compiled`` is a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``). Arguments
    and outputs are the live inputs/results; ``temp`` the scratch XLA allocates during a call;
    ``alias`` the bytes of donated inputs reused as outputs; ``peak_memory`` XLA's own peak
    estimate (newer jaxlibs). All ``None`` when the backend gives no analysis.

    >>> import jax.numpy as jnp
    >>> c = jax.jit(lambda x: x * 2).lower(jnp.zeros((2**18,), jnp.float32)).compile()
    >>> compiled_memory_mb(c)["compiled_argument_mb"]  # 2**18 float32 = 1 MiB
    1.0
    """
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - unimplemented on some backends
        analysis = None
    out: dict[str, float | None] = {}
    for name in COMPILED_FIELDS:
        value = getattr(analysis, f"{name}_size_in_bytes", None)
        if value is None:  # peak_memory has no "_size" in its name
            value = getattr(analysis, f"{name}_in_bytes", None)
        out[f"compiled_{name}_mb"] = None if value is None else value / MB
    return out


def live_bound_mb(report: dict[str, float | None]) -> float | None:
    """Upper bound of the MiB live during one call: arguments + outputs + temps - aliased.

    ``report`` holds ``compiled_*_mb`` entries (``compiled_memory_mb`` / ``memory_report``).
    Backend-independent, unlike XLA's own peak estimate (XLA:CPU's leaves the temps out).

    >>> live_bound_mb({"compiled_argument_mb": 4.0, "compiled_output_mb": 4.0,
    ...                "compiled_temp_mb": 1.5, "compiled_alias_mb": 4.0})
    5.5
    """
    mb = [report.get(f"compiled_{k}_mb") for k in ("argument", "output", "temp", "alias")]
    return None if None in mb else mb[0] + mb[1] + mb[2] - mb[3]


def memory_report(compiled: Any = None, device: jax.Device | None = None
                  ) -> dict[str, float | None]:
    """Host peak RSS, device peak / in-use, and ``compiled``'s buffer sizes, all in MiB.

    Keys: ``host_peak_rss_mb``, ``device_peak_mb``, ``device_in_use_mb`` and, when
    ``compiled`` is given, ``compiled_{argument,output,alias,temp,generated_code,peak_memory}_mb``.
    Values are ``None`` where the backend does not report them.

    >>> import jax.numpy as jnp
    >>> r = memory_report(jax.jit(lambda x: x + 1).lower(jnp.ones(4)).compile())
    >>> sorted(r)[:3]
    ['compiled_alias_mb', 'compiled_argument_mb', 'compiled_generated_code_mb']
    >>> r["compiled_argument_mb"] == 16 / 2**20  # 4 float32
    True
    """
    report: dict[str, float | None] = {"host_peak_rss_mb": host_peak_rss_mb()}
    report.update(device_memory_mb(device))
    if compiled is not None:
        report.update(compiled_memory_mb(compiled))
    return report


def format_mb(value: float | None, width: int = 9) -> str:
    """A right-aligned MiB cell: one decimal, or '-' when not reported.

    >>> format_mb(1.25, 6), format_mb(None, 6)
    ('   1.2', '     -')
    """
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"
