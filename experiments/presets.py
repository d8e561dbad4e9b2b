"""Named method presets: one per method row of the paper (docs/method.md sections 6 and 7).

A preset is a set of config overrides (dotted field names) that selects a method; the G density
is given separately. ``apply_preset(config, name, g_density)`` returns a new config with them;
``preset_label(config)`` goes the other way (the preset a run's config selects, or a label that
says how the run differs from every preset).

=========================  =========  ========  ========  ======  =======================
preset                     method     setting   d_mode    regrow  D density
=========================  =========  ========  ========  ======  =======================
dense                      dense      -         -         -       1.0 (no masks)
static_balance             static     -         balance   -       d_G
static_strong_relaxed      static     relaxed   strong    -       1.0
static_strong_strict       static     strict    strong    -       d_max (0.5)
sdst_balance_{set,rigl}    sdst       -         balance   set/rigl d_G
sdst_strong_relaxed_{..}   sdst       relaxed   strong    set/rigl 1.0
sdst_strong_strict_{..}    sdst       strict    strong    set/rigl d_max (0.5)
adapt_relaxed              adapt      relaxed   -         rigl    d_G, moved by BR, cap 1.0
adapt_strict               adapt      strict    -         rigl    d_G, moved by BR, cap d_max
dda                        dda        relaxed   -         -       d_G, moved by BR (G static)
=========================  =========  ========  ========  ======  =======================

"Balance" (d_D = d_G) does not depend on the setting, so it has one preset (setting relaxed).
Every preset sets the same fields (``PRESET_FIELDS``), so applying one fully replaces another.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import ml_collections

#: The paper's G densities (docs/method.md section 7).
G_DENSITIES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)

#: The config fields every preset sets.
PRESET_FIELDS: tuple[str, ...] = (
    "sparsity.method", "sparsity.setting", "sparsity.d_mode", "sparsity.regrow",
    "sparsity.d_density",
)


def _preset(method: str, setting: str = "relaxed", d_mode: str = "balance",
            regrow: str = "rigl") -> dict[str, Any]:
    return {"sparsity.method": method, "sparsity.setting": setting, "sparsity.d_mode": d_mode,
            "sparsity.regrow": regrow, "sparsity.d_density": None}


PRESETS: dict[str, dict[str, Any]] = {
    "dense": _preset("dense"),
    "static_balance": _preset("static"),
    "static_strong_relaxed": _preset("static", "relaxed", "strong"),
    "static_strong_strict": _preset("static", "strict", "strong"),
    "sdst_balance_set": _preset("sdst", regrow="set"),
    "sdst_balance_rigl": _preset("sdst", regrow="rigl"),
    "sdst_strong_relaxed_set": _preset("sdst", "relaxed", "strong", "set"),
    "sdst_strong_relaxed_rigl": _preset("sdst", "relaxed", "strong", "rigl"),
    "sdst_strong_strict_set": _preset("sdst", "strict", "strong", "set"),
    "sdst_strong_strict_rigl": _preset("sdst", "strict", "strong", "rigl"),
    "adapt_relaxed": _preset("adapt", "relaxed"),
    "adapt_strict": _preset("adapt", "strict"),
    "dda": _preset("dda", "relaxed"),
}

#: Row names as the paper prints them.
DISPLAY_NAMES: dict[str, str] = {
    "dense": "Dense",
    "static_balance": "Static-Balance",
    "static_strong_relaxed": "Static-Strong (relaxed)",
    "static_strong_strict": "Static-Strong (strict)",
    "sdst_balance_set": "SDST-Balance-SET",
    "sdst_balance_rigl": "SDST-Balance-RigL",
    "sdst_strong_relaxed_set": "SDST-Strong-SET (relaxed)",
    "sdst_strong_relaxed_rigl": "SDST-Strong-RigL (relaxed)",
    "sdst_strong_strict_set": "SDST-Strong-SET (strict)",
    "sdst_strong_strict_rigl": "SDST-Strong-RigL (strict)",
    "adapt_relaxed": "ADAPT relaxed",
    "adapt_strict": "ADAPT strict",
    "dda": "DDA",
}

#: Paper Table 1 (relaxed setting; ADAPT strict with d_max 0.5 alongside), docs/method.md section 7.
TABLE1: tuple[str, ...] = (
    "dense", "static_balance", "sdst_strong_relaxed_rigl", "adapt_relaxed", "adapt_strict")

#: The d_max of the paper's strict setting.
PAPER_D_MAX = 0.5


def _unknown(name: str) -> ValueError:
    return ValueError(f"Unknown preset {name!r}; use one of: {', '.join(PRESETS)}.")


def check_name(name: str) -> str:
    """``name`` if it is a preset, else a ``ValueError`` listing every preset."""
    if name not in PRESETS:
        raise _unknown(name)
    return name


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def apply_preset(config: ml_collections.ConfigDict, name: str,
                 g_density: float | None = None) -> ml_collections.ConfigDict:
    """A copy of ``config`` running preset ``name`` at G density ``g_density``.

    Args:
      config: a benchmark config (``experiments/configs/*.py``); it is not modified.
      name: a key of ``PRESETS``.
      g_density: d_G in (0, 1]; required except for ``dense`` (which sets 1.0).

    Raises:
      ValueError: unknown preset (the message lists them) or a missing / invalid g_density.
    """
    overrides = PRESETS.get(name)
    if overrides is None:
        raise _unknown(name)
    if name == "dense":
        g_density = 1.0 if g_density is None else g_density
    elif g_density is None:
        raise ValueError(f"Preset {name!r} needs a G density, e.g. one of {G_DENSITIES}.")
    if not 0.0 < float(g_density) <= 1.0:
        raise ValueError(f"g_density must lie in (0, 1], got {g_density}.")
    out = copy.deepcopy(config)
    for field, value in {**overrides, "sparsity.g_density": float(g_density)}.items():
        _set(out, field, value)
    return out


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    node = config
    for p in dotted.split("."):
        try:
            node = node[p]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def preset_label(config: Mapping[str, Any] | ml_collections.ConfigDict) -> tuple[str, list[str]]:
    """The preset a run's config selects, and how the run departs from it.

    Works on a ConfigDict or on the plain dict of a run's ``config.json``. Returns ``(name,
    modifiers)``: ``name`` the closest preset, ``modifiers`` the method-defining fields that
    differ from the preset as the paper ran it (an explicit d_D, a regrow criterion that is not
    part of the name, a strict cap other than 0.5, layer scope, the RigL optimizer policy, or a
    layer-density distribution other than ERK). Schedules (dT_G, dT_D, band, iterations) are
    not part of a preset. An empty ``modifiers`` means the run is that preset exactly.
    """
    method = _get(config, "sparsity.method", "adapt")
    setting = _get(config, "sparsity.setting", "relaxed")
    d_mode = _get(config, "sparsity.d_mode", "balance")
    regrow = _get(config, "sparsity.regrow", "rigl")
    mods: list[str] = []
    if method == "dense":
        return "dense", mods
    if method in ("static", "sdst"):
        name = f"{method}_{d_mode}" if d_mode == "balance" else f"{method}_{d_mode}_{setting}"
        if method == "sdst":
            name += f"_{regrow}"
        d_density = _get(config, "sparsity.d_density")
        if d_density is not None:
            mods.append(f"d_D={d_density:g}")
        strict_cap = d_mode == "strong" and setting == "strict" and d_density is None
    elif method == "adapt":
        name, strict_cap = f"adapt_{setting}", setting == "strict"
        if regrow != "rigl":
            mods.append(f"regrow={regrow}")
    elif method == "dda":
        name, strict_cap = "dda", setting == "strict"
        if setting != "relaxed":
            mods.append(f"setting={setting}")
    else:
        return str(method), [f"method={method}"]
    d_max = _get(config, "control.d_max", PAPER_D_MAX)
    if strict_cap and d_max != PAPER_D_MAX:
        mods.append(f"d_max={d_max:g}")
    if method != "static" and _get(config, "sparsity.scope", "global") != "global":
        mods.append(f"scope={_get(config, 'sparsity.scope')}")
    if _get(config, "sparsity.optimizer_policy", "paper") != "paper":
        mods.append(f"opt={_get(config, 'sparsity.optimizer_policy')}")
    if _get(config, "sparsity.distribution", "erk") != "erk":
        mods.append(f"dist={_get(config, 'sparsity.distribution')}")
    check_name(name)
    return name, mods


def label(config: Mapping[str, Any] | ml_collections.ConfigDict) -> str:
    """``preset_label`` as one string: ``'adapt_relaxed'`` or ``'adapt_relaxed[regrow=set]'``."""
    name, mods = preset_label(config)
    return f"{name}[{', '.join(mods)}]" if mods else name


def display_name(label_: str) -> str:
    """The paper's row name of a preset label (modifiers kept)."""
    name, bracket, rest = label_.partition("[")
    return DISPLAY_NAMES.get(name, name) + (f" [{rest}" if bracket else "")
