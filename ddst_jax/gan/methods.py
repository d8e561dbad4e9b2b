"""The paper's training methods as static specifications (docs/method.md section 6)."""

from __future__ import annotations

import dataclasses

from ddst_jax.sparsity.dst import SCOPES
from ddst_jax.sparsity.masks import validate_density
from ddst_jax.sparsity.optim import check_policy

METHODS = ("dense", "static", "sdst", "adapt", "dda")
SETTINGS = ("relaxed", "strict")
D_MODES = ("balance", "strong")
REGROW = ("rigl", "set")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What is sparse and what moves, for one run.

    Attributes:
      name: one of ``METHODS``.
      masked: False only for the dense method (no masks are multiplied in at all).
      g_dynamic: G's mask is updated by drop-and-grow every dT_G iterations.
      d_control: the D-density controller kind: ``"static"``, ``"relaxed"``, ``"strict"`` or
        ``"dda"`` (see ``ddst_jax.control``).
      g_density: d_G.
      d_density: d_D at the start.
      d_cap: d_D's cap (1.0 relaxed, d_max strict).
      regrow: ``"rigl"`` (largest |grad|) or ``"set"`` (random).
      scope: drop-and-grow ranking scope, ``"global"`` or ``"layer"``.
      policy: optimizer-state policy, ``"paper"`` or ``"rigl"``.
    """

    name: str
    masked: bool
    g_dynamic: bool
    d_control: str
    g_density: float
    d_density: float
    d_cap: float
    regrow: str
    scope: str
    policy: str


def resolve_method(
    method: str,
    *,
    g_density: float,
    setting: str = "relaxed",
    d_mode: str = "balance",
    d_density: float | None = None,
    d_max: float = 0.5,
    regrow: str = "rigl",
    scope: str = "global",
    policy: str = "paper",
) -> MethodSpec:
    """Turn a method name and its options into a ``MethodSpec``, validating every field.

    - ``dense``: no masks.
    - ``static``: G and D masks fixed; d_D from ``d_mode`` (balance: d_G; strong: the cap).
    - ``sdst``: G dynamic; D static at d_D from ``d_mode``.
    - ``adapt``: G dynamic; D starts at d_G and is moved by BR (``setting`` relaxed / strict).
    - ``dda``: G static; D starts at d_G, moved by BR with the DDA band.

    ``d_density`` overrides the d_D that ``d_mode`` implies (static / sdst only).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; use one of {METHODS}.")
    if setting not in SETTINGS:
        raise ValueError(f"Unknown setting {setting!r}; use one of {SETTINGS}.")
    if d_mode not in D_MODES:
        raise ValueError(f"Unknown d_mode {d_mode!r}; use one of {D_MODES}.")
    if regrow not in REGROW:
        raise ValueError(f"Unknown regrow criterion {regrow!r}; use one of {REGROW}.")
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; use one of {SCOPES}.")
    check_policy(policy)
    d_max = validate_density(d_max, "d_max")
    cap = 1.0 if setting == "relaxed" else d_max
    if method == "dense":
        return MethodSpec("dense", False, False, "static", 1.0, 1.0, 1.0, regrow, scope, policy)
    g_density = validate_density(g_density, "g_density")
    if method in ("static", "sdst"):
        d = (g_density if d_mode == "balance" else cap) if d_density is None else d_density
        d = validate_density(d, "d_density")
        return MethodSpec(method, True, method == "sdst", "static", g_density, d, cap, regrow,
                          scope, policy)
    if d_density is not None:
        raise ValueError(f"`d_density` is set by the controller for method {method!r}; unset it.")
    if g_density > cap:
        raise ValueError(f"g_density {g_density} exceeds the D cap {cap} of the {setting} "
                         "setting, where D starts at d_G; raise d_max or lower g_density.")
    kind = setting if method == "adapt" else "dda"
    return MethodSpec(method, True, method == "adapt", kind, g_density, g_density, cap, regrow,
                      scope, policy)
