"""The benchmark scripts run end to end at tiny sizes and print the tables they promise.

Each script runs as its own process, as a user runs it (``python -m benchmarks.X``): absl
flags are process-wide, and some scripts (conv_layers, input_pipeline) define theirs at import.
Nothing here asserts a timing; the machine is shared and the sizes are tiny.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import ddst_jax.sparsity.optim as sp_optim
from benchmarks import overheads
from ddst_jax import memory, train
from ddst_jax import sparsity as sp
from ddst_jax.gan import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"g_ch": 8, "d_ch": 8, "batch_g": 4, "batch_d": 2, "n_dis": 1}


def _cli(module: str, *args: str) -> str:
    """stdout of ``python -m benchmarks.<module> args`` (one process, single CPU device)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           # Compile-bound at these sizes: XLA's CPU optimisations cost more than they save.
           "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    cache = jax.config.jax_compilation_cache_dir  # conftest's: re-runs skip the compiles
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _flags(**values) -> list[str]:
    return [f"--{k}={v}" for k, v in values.items()]


# ----------------------------------------------------------------------------- overheads.py


def test_overheads_cli_prints_every_overhead_row():
    out = _cli("overheads", "--methods=adapt", "--reps=1", "--iso_reps=1", *_flags(**TINY))
    header, table, variants, mem = out.strip().split("\n\n")
    assert header.startswith("backend=cpu G ch 8 / D ch 8")
    assert "BR every 10, dT_G 500, dT_D 1000" in header  # the config's schedule, untouched
    lines = table.splitlines()
    for column in overheads.COLUMNS:
        assert column in lines[0]
    names = [line[:14].strip() for line in lines[1:]]
    assert names == ["masking", "BR", "G mask update", "D decision", "EMA"]
    verdicts = [line.split()[-1] for line in lines[1:]]
    assert all(v in ("ok", "over") for v in verdicts[:-1]) and verdicts[-1] == "-"  # EMA
    timed = [line.split()[:2] for line in variants.splitlines()[1:]]
    assert timed[:5] == [["dense", "ordinary"], ["adapt", "ordinary"], ["adapt", "+BR"],
                         ["adapt", "+BR+G"], ["adapt", "+BR+G"]]
    ts = [int(line[40:47]) for line in variants.splitlines()[1:6]]  # the iteration's t
    assert ts == [2, 2, 10, 500, 1000]
    assert {line.split()[1] for line in variants.splitlines()[6:]} == {
        "apply_masks", "BR", "EMA", "G", "D"}
    assert [line.split()[0] for line in mem.splitlines()[1:3]] == ["dense", "adapt"]
    assert "host peak RSS" in mem


def test_event_plan_separates_coinciding_events():
    events = {"BR": 10, "G mask update": 500, "D decision": 1000}
    pairs = overheads.event_pairs(events, 100_000)
    f = frozenset
    assert pairs == {"BR": (f({"BR"}), f()),
                     "G mask update": (f({"BR", "G mask update"}), f({"BR"})),
                     "D decision": (f(events), f({"BR", "G mask update"}))}
    assert overheads.first_step_with(f(), events, 100_000) == 2
    assert overheads.first_step_with(f({"G mask update"}), events, 600) is None  # always + BR
    # No update at the final iteration (is_update_step), so t = total runs BR only.
    assert overheads.fired(1000, events, 1000) == f({"BR"})


@pytest.mark.parametrize("policy", ["paper", "rigl"])
def test_apply_masks_count_matches_a_trace_of_the_ordinary_iteration(policy, monkeypatch):
    config = overheads.make_config("static", **TINY)  # n_dis 1: the scan body is traced once
    config.sparsity.optimizer_policy = policy
    setup = train.build_setup(config, train.validate_config(config))
    state = jax.eval_shape(lambda: steps.init_state(setup, jax.random.key(0)))
    g_tree = jax.tree_util.tree_structure(state.g_params)
    calls = {"G": 0, "D": 0}
    original = sp.apply_masks

    def counting(params, masks):
        calls["G" if jax.tree_util.tree_structure(params) == g_tree else "D"] += 1
        return original(params, masks)

    monkeypatch.setattr(sp, "apply_masks", counting)  # steps' effective weights
    monkeypatch.setattr(sp_optim, "apply_masks", counting)  # sparse_update's re-zeroing

    def ordinary(state, real, labels, key):  # train_iteration without its scheduled branches
        noise = steps.draw_noise(setup, key)
        d = steps.d_steps(setup, state, real, labels, noise)
        return steps.g_step(setup, state, d.d_params, d.d_state, d.g_state, noise)

    real = jax.ShapeDtypeStruct((1, 2, 32, 32, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    jax.eval_shape(ordinary, state, real, labels, jax.random.key(1))
    assert (calls["G"], calls["D"]) == overheads.apply_masks_per_iteration(setup)


# ----------------------------------------------------------------------------- mask_update.py


def test_mask_update_cli_prints_every_row_with_memory_columns():
    out = _cli("mask_update", "--g_ch=8", "--d_ch=8", "--reps=1")
    header, *lines = out.strip().splitlines()
    assert header.startswith("backend=cpu sngan32 G ch 8 / D ch 8")
    assert lines[0].split()[:2] == ["row", "N"] and lines[0].rstrip().endswith("RSS peak MB")
    rows = [line[:15].strip() for line in lines[1:]]
    assert rows == ["G global rigl", "G global set", "G layer rigl", "D resize grow",
                    "D resize prune"]
    cells = [line[15:].split() for line in lines[1:]]
    assert len({c[0] for c in cells[:3]}) == 1 and len({c[0] for c in cells[3:]}) == 1  # N
    assert cells[4][2] == "same"  # D prune reuses D grow's executable
    assert all(c[-2] == "-" for c in cells)  # CPU keeps no device allocator statistics
    assert all(float(c[-1]) > 0 for c in cells)  # host peak RSS


# ----------------------------------------------------------------------------- existing scripts


def test_gan_steps_cli_tiny():
    out = _cli("gan_steps", "--g_ch=8", "--d_ch=8", "--batch=2", "--reps=1", "--impls=xla,gemm")
    rows = [(line[:12].strip(), line[12:].split()[0]) for line in out.strip().splitlines()[2:]]
    assert rows == [(step, impl) for impl in ("xla", "gemm")
                    for step in ("D step", "D step 2fwd", "G step")]


def test_conv_layers_cli_tiny():
    out = _cli("conv_layers", "--batch=2", "--reps=1", "--shapes=4:3:5:3,4:3:5:1")
    lines = out.strip().splitlines()
    assert lines[1].split() == ["layer", "impl", "fwd", "fwd+dx", "fwd+dW", "fwd+both"]
    rows = [(line[:22].strip(), line.split()[3]) for line in lines[2:]]
    assert rows == [("4x4 3->5 k3", "xla"), ("4x4 3->5 k3", "gemm"), ("4x4 3->5 k1", "xla"),
                    ("4x4 3->5 k1", "gemm")]


def test_train_throughput_cli_tiny():
    out = _cli("train_throughput", "--methods=adapt", "--reps=1", "--g_ch=8", "--d_ch=8",
               "--batch_g=4", "--batch_d=2")
    lines = out.strip().splitlines()
    assert "iter s" in lines[1] and "+BR+mask upd s" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["adapt"]


# ----------------------------------------------------------------------------- ddst_jax.memory


def test_memory_report_on_cpu_and_with_device_statistics():
    compiled = jax.jit(lambda x: x * 2).lower(jnp.zeros((2**18,), jnp.float32)).compile()
    r = memory.memory_report(compiled, device=jax.devices("cpu")[0])
    assert r["host_peak_rss_mb"] > 0
    assert r["device_peak_mb"] is None and r["device_in_use_mb"] is None  # CPU: no stats
    assert r["compiled_argument_mb"] == r["compiled_output_mb"] == 1.0
    assert set(r) == {"host_peak_rss_mb", "device_peak_mb", "device_in_use_mb",
                      *(f"compiled_{k}_mb" for k in memory.COMPILED_FIELDS)}

    class Accelerator:  # what GPU/TPU devices return
        def memory_stats(self):
            return {"peak_bytes_in_use": 3 * 2**20, "bytes_in_use": 2**20}

    assert memory.device_memory_mb(Accelerator()) == {"device_peak_mb": 3.0,
                                                      "device_in_use_mb": 1.0}


def test_memory_report_without_an_analysis():
    class NoAnalysis:
        def memory_analysis(self):
            raise NotImplementedError

    r = memory.memory_report(NoAnalysis())
    assert all(r[f"compiled_{k}_mb"] is None for k in memory.COMPILED_FIELDS)


# ----------------------------------------------------------------------------- common.py


def test_rotated_order_and_interleaved_times():
    from benchmarks import common

    assert common.rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert common.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert common.rotated([], 3) == []
    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in "abc"}
    wall, cpu = common.interleaved_times(calls, 3)
    assert order == list("abc" "bca" "cab")  # every round starts one variant later
    assert all(len(wall[k]) == len(cpu[k]) == 3 and min(wall[k]) >= 0 for k in "abc")


def test_stand_in_grads_are_normal_draws_shaped_like_params():
    from benchmarks import common

    params = {"a": jnp.zeros((3, 2)), "b": {"kernel": jnp.zeros((4,), jnp.bfloat16)}}
    grads = common.stand_in_grads(params, jax.random.key(0))
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert grads["a"].shape == (3, 2) and grads["b"]["kernel"].dtype == jnp.bfloat16
    assert not bool(jnp.all(grads["a"] == grads["a"][0, 0]))  # random, not a constant


# ----------------------------------------------------------------------------- eval_speed.py


def test_eval_speed_metric_rows_and_table():
    # The Inception rows need a ~1 min compile per resize mode; they run with the script.
    from benchmarks import eval_speed

    rows = eval_speed.metric_rows(40, dim=16)  # 2048-d sqrtm alone takes ~10 s
    assert [r["row"] for r in rows] == ["FID (eigh) n=40", "FID (sqrtm) n=40", "KID n=40",
                                        "PRDC n=40"]
    # PRDC is O(N^2): its 50k figure is its own time scaled by (50000 / 40)^2.
    prdc = rows[-1]
    assert prdc["eval_50k_hours"] == pytest.approx(prdc["seconds"] * 1250**2 / 3600)
    table = eval_speed.format_table(
        [{"row": "inception tf1", "seconds": 2.0, "images_per_s": 100.0,
          "eval_50k_hours": 2 * 50_000 / 100.0 / 3600}] + rows)
    lines = table.splitlines()
    assert lines[0].split() == ["row", "median", "s", "images/s", "50k", "eval", "h"]
    assert lines[1].split() == ["inception", "tf1", "2.00", "100.0", "0.28"]
    assert len(lines) == 6 and all(line.split()[-2] == "-" for line in lines[2:])


# ----------------------------------------------------------------------------- accelerator.py


def test_accelerator_cli_tiny_rows_agree_exactly_on_cpu():
    # The rows a lent device needs most; their programs are the overheads test's (cached).
    # The conv and Inception rows are checked in-process below; all rows: BUILD_NOTES.
    from benchmarks import accelerator

    out = _cli("accelerator", "--tiny", "--json", "--only=agreement,dense-float32,adapt-float32")
    header, columns, *table, last = out.strip().splitlines()
    assert header.startswith("cpu ") and "G 8 / D 8, batch G 4 / D 2, n_dis 1" in header
    assert columns.split()[:4] == ["check", "setting", "value", "unit"]
    rows = json.loads(last)["rows"]
    assert len(table) == len(rows)
    assert [r["check"] for r in rows] == [
        "agreement loss/d", "agreement loss/g", "agreement BR", "agreement masks", "it/s",
        "it/s", *["masking overhead"] * 3, *["mask update overhead"] * 2, "peak device memory"]
    assert not [r for r in rows if "skipped" in r["note"] or "failed" in r["note"]]
    # No accelerator here: both sides of the comparison are the CPU, so they agree exactly,
    # over iterations that measure BR, update G's masks and resize D.
    assert [r["value"] for r in rows[:4]] == [0.0, 0.0, 0.0, 0]
    assert "t=2,10,500,1000, cpu vs cpu" in rows[0]["setting"]
    assert rows[3]["note"].endswith("the decision at t=1000 resized D")
    assert [r["setting"] for r in rows[4:6]] == ["dense float32", "adapt float32"]
    assert all(r["value"] > 0 and r["compile_s"] > 0 for r in rows[4:6])
    by_method = {r["setting"].split()[0]: r for r in rows[6:11]}
    assert math.isfinite(by_method["adapt"]["value"])  # masking, then G's update, for ADAPT
    assert by_method["static"]["value"] is None and "needs the dense" in by_method["sdst"]["note"]
    assert rows[-1]["value"] == "n/a"  # CPU keeps no allocator statistics
    plan, _ = accelerator.plan_tasks(accelerator.PLANS["tiny"], {})  # all rows, none measured
    assert [t.key for t in plan] == list(accelerator.RUN_ORDER)
    assert sorted(accelerator.RUN_ORDER) == sorted(accelerator.TABLE_ORDER)
    assert len(accelerator.TABLE_ORDER) == 11


def test_accelerator_conv_and_inception_rows(monkeypatch):
    from benchmarks import accelerator, eval_speed, gan_steps
    from ddst_jax.gan import conv

    def stand_in_steps(batch, g_ch, d_ch):  # one 3x3 convolution's gradient per "step"
        x = jnp.ones((batch, 4, 4, 2))

        def step(w):
            f = conv.conv_fn("auto")
            return jax.grad(lambda w: jnp.sum(f(x, w, (1, 1), "SAME", dimension_numbers=(
                "NHWC", "HWIO", "NHWC")) ** 2))(w)

        w = jnp.ones((3, 3, 2, g_ch))
        return {"D step": (step, w), "D step 2fwd": (step, w), "G step": (step, w)}

    monkeypatch.setattr(gan_steps, "make_steps", stand_in_steps)
    rows = accelerator.conv_rows(batch=2, g_ch=3, d_ch=3, reps=1)
    chosen = conv.resolve_impl("auto")  # 8 devices in this session: lax.conv
    other = "gemm" if chosen == "xla" else "xla"
    assert [r["setting"] for r in rows] == [f"G step, batch 2: auto = {chosen}",
                                            f"D step 2fwd, batch 2: auto = {chosen}"]
    assert all(r["value"] > 0 and r["note"].startswith(f"{other}: ") for r in rows)

    def stand_in_rows(variables, batch, batches, reps, size, modes):
        assert (batch, batches, reps, size, modes) == (2, 1, 1, 32, ("pytorch",))
        return [{"row": "inception pytorch", "seconds": 1.0, "images_per_s": 2.0,
                 "eval_50k_hours": 0.5, "compile_s": 3.0}]

    monkeypatch.setattr(eval_speed, "random_variables", lambda key: None)
    monkeypatch.setattr(eval_speed, "inception_rows", stand_in_rows)
    (fid,) = accelerator.inception_rows(2, 1, 1)
    assert (fid["value"], fid["unit"], fid["compile_s"]) == (2.0, "images/s", 3.0)
    assert fid["note"] == "random-initialised weights of the real shapes; 50k eval 30 min"


def test_accelerator_budget_skips_rows_not_started_and_failures_stay_rows():
    from benchmarks import accelerator

    ticks = iter([0.0, 0.0, 5.0, 5.0, 12.0, 12.0])  # start, then (before, after) each task

    def boom():
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory\nmore detail")

    tasks = [accelerator.Task("a", "it/s", "dense", lambda: [accelerator.row("it/s", "a", 1.0)]),
             accelerator.Task("b", "it/s", "adapt", boom),
             accelerator.Task("c", "conv path", "G", lambda: pytest.fail("ran past the budget"))]
    out = accelerator.run_tasks(tasks, budget_s=10.0, clock=lambda: next(ticks))
    assert out["a"][0]["value"] == 1.0
    assert out["b"][0]["note"] == "failed: MemoryError: RESOURCE_EXHAUSTED: out of memory"
    assert out["c"][0]["note"] == "skipped: 12 s of the 10 s budget spent"
    assert out["c"][0]["check"] == "conv path" and out["c"][0]["value"] is None


def test_accelerator_overheads_need_their_rows_and_diffs_treat_nan():
    from benchmarks import accelerator

    results = {("dense", "float32"): {"plain_s": 2.0},
               ("adapt", "float32"): {"plain_s": 2.2, "br_s": 2.3, "update_s": 7.3}}
    rows = {(r["check"], r["setting"].split()[0]): r
            for r in accelerator.overhead_rows(results, g_update_every=500)}
    assert rows["masking overhead", "adapt"]["value"] == pytest.approx(0.1)
    assert rows["mask update overhead", "adapt"]["value"] == pytest.approx(5.0 / 500 / 2.0)
    assert rows["masking overhead", "static"]["value"] is None
    assert "needs the dense" in rows["mask update overhead", "sdst"]["note"]
    assert accelerator.max_abs_diff([1.0, 2.0], [1.0, float("nan")]) == math.inf
    assert accelerator.max_abs_diff([float("nan")], [float("nan")]) == 0.0
    assert accelerator.flag_error(["x", "extra"], 1.0).startswith("error: unexpected")
    assert accelerator.flag_error(["x"], float("nan")).startswith("error: --budget_s=nan")
    assert accelerator.flag_error(["x"], 1.0, ["conv", "dense float32"]) == (
        "error: --only: no rows named dense float32; use some of agreement, dense-float32, "
        "static-float32, sdst-float32, adapt-float32, dense-bfloat16, static-bfloat16, "
        "sdst-bfloat16, adapt-bfloat16, conv, inception.")
    assert accelerator.flag_error(["x"], 1.0, ["conv", "adapt-bfloat16"]) is None


def test_config_runs_table_marks_a_failed_config_and_the_cli_refuses_unknown_names():
    from benchmarks import config_runs

    lines = config_runs.table([
        {"config": "stl10", "model": "sngan48", "size": 48, "seconds": 146.04, "ok": True},
        {"config": "tiny_imagenet", "model": "biggan64", "size": 64, "seconds": 9.0, "ok": False},
    ]).splitlines()
    assert lines[1].split() == ["stl10", "sngan48", "48", "146.0", "ok"]
    assert lines[2].split()[-1] == "FAILED"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.config_runs", "--configs=nope"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --configs: unknown ['nope']")
