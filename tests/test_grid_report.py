"""Method presets, the run grid and the paper-style report (experiments.{presets,grid,report})."""

import functools
import io
import json
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from ddst_jax import sparsity, train
from ddst_jax.metrics import flops as ddst_flops
from experiments import flops as flops_cli
from experiments import grid, paper_results, presets, report
from experiments.configs import cifar10, cifar10_biggan, stl10, tiny_imagenet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"cifar10": cifar10, "stl10": stl10, "cifar10_biggan": cifar10_biggan,
           "tiny_imagenet": tiny_imagenet}


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("benchmark", sorted(CONFIGS))
def test_every_preset_and_density_gives_a_valid_config(benchmark):
    base = CONFIGS[benchmark].get_config(None)
    for name in presets.PRESETS:
        for d in presets.G_DENSITIES:
            config = presets.apply_preset(base, name, d)
            spec = train.validate_config(config, device_count=1, process_count=1)
            assert presets.label(config) == name
            if name == "dense":
                assert not spec.masked
                continue
            assert spec.g_density == d
            strong = "strong" in name
            if name.startswith(("static", "sdst")):
                cap = 0.5 if "strict" in name else 1.0
                assert spec.d_density == (cap if strong else d)
                assert spec.g_dynamic == name.startswith("sdst")
            else:
                assert spec.d_density == d  # ADAPT and DDA start at d_D = d_G
            if name.startswith("sdst"):
                assert spec.regrow == name.rsplit("_", 1)[1]
    assert base.sparsity.method == "adapt" and base.sparsity.g_density == 0.1  # not modified


def test_preset_replaces_every_method_field_and_names_unknown_ones():
    base = cifar10.get_config(None)
    base.sparsity.d_density = 0.7
    base.sparsity.regrow = "set"
    config = presets.apply_preset(base, "adapt_strict", 0.2)
    assert config.sparsity.d_density is None and config.sparsity.regrow == "rigl"
    assert presets.apply_preset(base, "dense").sparsity.g_density == 1.0
    with pytest.raises(ValueError, match="Unknown preset 'adapt'.*adapt_relaxed.*dda"):
        presets.apply_preset(base, "adapt", 0.1)
    with pytest.raises(ValueError, match="needs a G density"):
        presets.apply_preset(base, "static_balance")


def test_label_of_a_run_that_is_no_preset():
    config = presets.apply_preset(cifar10.get_config(None), "adapt_strict", 0.1)
    assert presets.label(config) == "adapt_strict"
    config.sparsity.regrow = "set"
    config.control.d_max = 0.4
    assert presets.label(config) == "adapt_strict[regrow=set, d_max=0.4]"
    assert presets.display_name(presets.label(config)) == "ADAPT strict [regrow=set, d_max=0.4]"


# ----------------------------------------------------------------------------- grid


def _parse_command(argv, config_file):
    """Parse a grid command's flags as the runner does; returns (workdir, config)."""
    assert argv[1:3] == ("-m", "experiments.cifar10")
    args = ["runner", *argv[3:]]
    values = flags.FlagValues()
    # The overrides are read from sys_argv (default: sys.argv), as in the runner.
    config_flags.DEFINE_config_file("config", config_file, "", flag_values=values,
                                    lock_config=True, sys_argv=args)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    values(args)
    return values.workdir, values.config


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags' loader
def test_table1_commands_have_own_workdirs_and_parse(tmp_path):
    runs = grid.build_grid("cifar10", "1", root=str(tmp_path),
                           extra=["--config.train.iterations=1000"])
    # Table 1: dense + 4 methods x 4 densities.
    assert len(runs) == 1 + 4 * 4
    assert len({r.workdir for r in runs}) == len(runs)
    assert os.path.join(str(tmp_path), "cifar10", "adapt_relaxed_g0.1") in {r.workdir for r in runs}
    config_file = os.path.join(REPO_ROOT, "experiments/configs/cifar10.py")
    seen = set()
    for run in runs:
        workdir, config = _parse_command(run.argv, config_file)
        assert workdir == run.workdir
        train.validate_config(config, device_count=1, process_count=1)
        assert config.train.iterations == 1000
        assert presets.label(config) == run.preset
        seen.add((run.preset, None if run.preset == "dense" else config.sparsity.g_density))
    assert seen == {("dense", None)} | {(m, d) for m in presets.TABLE1 if m != "dense"
                                        for d in presets.G_DENSITIES}


def test_grid_cli_prints_one_command_per_run_and_rejects_bad_input():
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "experiments.grid", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=False)

    out = cli("--benchmark=stl10", "--table=all", "--densities=0.1,0.5", "--seeds=0,1",
              "--extra=--config=experiments/configs/stl10.py:smoke --config.eval.every=0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 * (1 + (len(presets.PRESETS) - 1) * 2)
    assert all(line.startswith("python -m experiments.stl10 --workdir=runs/stl10/")
               for line in lines)
    assert "--workdir=runs/stl10/sdst_strong_strict_set_g0.5_s1" in out.stdout
    bad = cli("--table=2")
    assert bad.returncode == 2 and "Unknown table '2'" in bad.stderr
    bad = cli("--extra=--config.sparsity.g_density=0.3")
    assert bad.returncode == 2 and "may not set --config.sparsity.g_density" in bad.stderr


def test_launch_stops_at_the_first_failure(tmp_path):
    def cmd(code, marker):
        return ["python", "-c", f"open({str(tmp_path / marker)!r}, 'w'); raise SystemExit({code})"]

    log = io.StringIO()
    with pytest.raises(grid.LaunchError, match=r"(?s)run 2/3 failed \(exit status 3\).*1 later"):
        grid.launch([cmd(0, "a"), cmd(3, "b"), cmd(0, "c")], stdout=log)
    assert log.getvalue().startswith("[1/3] ") and "[3/3]" not in log.getvalue()
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# ----------------------------------------------------------------------------- report


@functools.cache
def _abstract_params(model_json):
    model = flops_cli.model_flops(json.loads(model_json))
    return model.g_params, model.d_params


def _erk(params, density):
    """Per-kernel ERK densities keyed like the runner's density log."""
    tree = sparsity.layer_densities(params, density, "erk")
    return {"/".join(p): v for p, v in ddst_flops.flatten_densities(tree).items()
            if p[-1] == "kernel"}


def _fake_run(root, name, *, benchmark="cifar10", preset, g_density=None, fid, inception,
              finished=True, iterations=2000):
    """A run directory as ddst_jax.train writes it, with known numbers and tiny models."""
    workdir = root / name
    workdir.mkdir(parents=True)
    config = presets.apply_preset(CONFIGS[benchmark].get_config(None), preset, g_density)
    config.model.g_ch, config.model.d_ch, config.model.z_dim = 16, 16, 16
    config.train.iterations = iterations
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    d = 1.0 if g_density is None else g_density
    g_params, d_params = _abstract_params(config.model.to_json())
    # ERK masks at the start; G changes at 500 (dT_G), D grows by 0.05 at 1000 (dT_D relaxed).
    dens = [(0, d, d), (500, d, d), (1000, d, min(1.0, d + 0.05))]
    rows = [{"iteration": it, "step": it, "g": _erk(g_params, g), "d": _erk(d_params, dd),
             "changed": ["g", "d"] if i == 0 else (["g", "d"] if it == 1000 else ["g"])}
            for i, (it, g, dd) in enumerate(dens)]
    if preset == "dense":
        rows = [{"iteration": 0, "g": {}, "d": {}}]
    elif not preset.startswith(("sdst", "adapt")):
        rows = rows[:1]  # static masks
    elif preset.startswith("sdst"):
        for r in rows:
            r["d"] = rows[0]["d"]
        rows = rows[:2]
    (workdir / "density_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = [{"step": s, "br/windowed": 0.4 + s / 10000, "density/d": d} for s in (100, 1000)]
    metrics += [{"step": 1000, "eval/fid": fid + 5.0, "eval/is": inception - 1.0},
                {"step": 2000 if finished else 1500, "eval/fid": fid, "eval/is": inception}]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    summary = {"finished": finished, "iteration": 2000 if finished else 1500,
               "method": {"name": config.sparsity.method}, "g_density": d, "d_density": d,
               "final": {}, "best_fid": fid, "best_fid_iteration": 2000 if finished else 1500}
    (workdir / "summary.json").write_text(json.dumps(summary))
    return str(workdir)


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, {
        "adapt": _fake_run(root, "c/adapt_relaxed_g0.1", preset="adapt_relaxed", g_density=0.1,
                           fid=14.0, inception=8.5),
        "static": _fake_run(root, "c/static_balance_g0.2", preset="static_balance",
                            g_density=0.2, fid=20.0, inception=7.25),
        "dense": _fake_run(root, "c/dense", preset="dense", fid=11.0, inception=8.75),
        "sdst": _fake_run(root, "s/sdst_strong_relaxed_rigl_g0.5", benchmark="stl10",
                          preset="sdst_strong_relaxed_rigl", g_density=0.5, fid=31.0,
                          inception=9.0),
        "unfinished": _fake_run(root, "c/adapt_strict_g0.1", preset="adapt_strict",
                                g_density=0.1, fid=77.77, inception=1.0, finished=False),
    }


def _row(text, name):
    lines = [line for line in text.splitlines() if line.startswith(name + "  ")]
    return lines


def test_report_tables_paper_numbers_difference_and_png(fake_runs, tmp_path, capsys):
    root, runs = fake_runs
    out = tmp_path / "out"
    assert report.main([str(root), f"--out={out}"]) == 0
    text = capsys.readouterr().out
    cifar, _, stl = text.partition("== STL-10 SNGAN (stl10)")
    assert cifar.startswith("== CIFAR-10 SNGAN (cifar10): 3 finished runs ==")
    fid_cifar = cifar.split("Inception Score")[0]
    # FID cells: ours (paper, ours - paper); the columns are d_G = 10/20/30/50%.
    adapt, = _row(fid_cifar, "ADAPT relaxed")
    assert adapt.split()[2:8] == ["14.00", "(14.19,", "-0.19)", "-", "(13.19,", "-)"]
    static, = _row(fid_cifar, "Static-Balance")
    assert "20.00 (19.04, +0.96)" in static and static.split()[1:4] == ["-", "(26.75,", "-)"]
    dense, = _row(fid_cifar, "Dense")
    assert dense.count("11.00 (10.74, +0.26)") == 4  # one dense number in every column
    assert "ADAPT strict" not in cifar and "77.77" not in text  # unfinished: not in tables
    sdst, = _row(stl.split("Inception Score")[0], "SDST-Strong-RigL (relaxed)")
    assert sdst.endswith("31.00 (30.18, +0.82)")
    # IS at the best-FID evaluation, no paper number.
    is_adapt, = _row(cifar.split("Inception Score")[1].split("Normalised")[0], "ADAPT relaxed")
    assert "8.50 (-, -)" in is_adapt
    # FLOPs: experiments.flops.run_report's paper-convention number.
    flops_part = cifar.split("Normalised training FLOPs")[1]
    expected = flops_cli.run_report(runs["adapt"])["paper"]["normalised_percent"]
    assert 0 < expected < 100
    assert f"{expected:.2f} (-, -)" in _row(flops_part, "ADAPT relaxed")[0]
    assert "100.00 (-, -)" in _row(flops_part, "Dense")[0]
    static_flops = float(_row(flops_part, "Static-Balance")[0].split()[4])  # d_G = 20% column
    assert 10 < static_flops < 40  # ERK masks at 20%: far below dense
    assert "FLOPs unavailable" not in text and "no FID" not in text
    assert "Unfinished runs" in text and f"{runs['unfinished']}: cifar10 adapt_strict" in text
    assert "iteration 1500 of 2000" in text
    for name in ("cifar10_curves.png", "stl10_curves.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.txt").read_text().strip() == text.strip()


def test_report_json(fake_runs, tmp_path, capsys):
    root, runs = fake_runs
    assert report.main([runs["adapt"], runs["unfinished"], runs["sdst"], "--json",
                        f"--out={tmp_path}"]) == 0
    result = json.loads(capsys.readouterr().out)
    benches = {b["benchmark"]: b for b in result["benchmarks"]}
    assert set(benches) == {"cifar10", "stl10"}
    fid = {r["method"]: r["cells"] for r in benches["cifar10"]["tables"]["fid"]}
    assert set(fid) == {"adapt_relaxed"}
    cell = fid["adapt_relaxed"]["0.1"]
    assert cell["ours"] == 14.0 and cell["paper"] == 14.19 and cell["n"] == 1
    assert cell["diff"] == pytest.approx(-0.19)
    assert fid["adapt_relaxed"]["0.2"] == {"ours": None, "std": None, "ci95": None,
                                           "paper": 13.19, "diff": None, "n": 0,
                                           "workdirs": []}
    assert [u["workdir"] for u in result["unfinished"]] == [runs["unfinished"]]
    assert os.path.exists(benches["stl10"]["plot"])


def test_report_without_runs_is_an_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), f"--out={tmp_path}"]) == 2
    assert "No run directory" in capsys.readouterr().err


def test_paper_numbers_match_the_spec_table():
    spec = os.path.join(os.path.dirname(REPO_ROOT), "shared", "SPEC.md")
    if not os.path.exists(spec):
        pytest.skip("SPEC.md not available")
    rows = {"dense": "| dense |", "static_balance": "| Static-Balance |",
            "sdst_strong_relaxed_rigl": "| SDST-Strong-RigL |",
            "adapt_relaxed": "| ADAPT relaxed |", "adapt_strict": "| ADAPT strict (d_max 0.5) |"}
    with open(spec, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for preset, start in rows.items():
        line, = [ln for ln in lines if ln.startswith(start)]
        cells = [c.split() for c in line.strip("|").split("|")[1:]]
        for bench, values in zip(paper_results.BENCHMARKS, cells, strict=True):
            densities = [1.0] if preset == "dense" else presets.G_DENSITIES
            assert [paper_results.paper_value("fid", bench, preset, d) for d in densities] == [
                float(v) for v in values]


def _eval_json(workdir, scores, **protocol):
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    result = {"scores": scores, "protocol": {"source": "generator", "num_samples": 50_000,
                                             "generator": "ema", "bn_mode": "train",
                                             "checkpoint": "best", "resize": "pytorch",
                                             "inception_sha256": "ab" * 32,
                                             "reference": {"sha256": "cd" * 32}, **protocol}}
    with open(os.path.join(workdir, "eval", "best_ema.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


def test_report_shows_seed_spread_scored_metrics_and_differing_protocols(tmp_path, capsys):
    runs = [_fake_run(tmp_path, f"c/adapt_relaxed_g0.1_s{seed}", preset="adapt_relaxed",
                      g_density=0.1, fid=fid, inception=8.0)
            for seed, fid in ((0, 14.0), (1, 15.0), (2, 16.0))]
    for i, run in enumerate(runs):
        _eval_json(run, {"kid": 0.004 + 0.001 * i, "precision": 0.7, "recall": 0.5,
                         "density": 0.9, "coverage": 0.6},
                   resize="tf1" if i == 2 else "pytorch")
    assert report.main([str(tmp_path), "--out=" + str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    adapt, = _row(text.split("Inception Score")[0], "ADAPT relaxed")
    # mean +- sample std [95% Student-t interval] over 3 seeds: 15 +- 1, t(0.975, 2) = 4.303.
    assert "15.00+-1.00 [12.52, 17.48] n=3 (14.19, +0.81)" in adapt
    kid, = _row(text.split("KID x 1e3")[1].split("Precision")[0], "ADAPT relaxed")
    assert kid.split()[2].startswith("5.00+-1.00")  # x 1e3
    assert "The runs were scored under different protocols" in text
    assert "resize=tf1" in text and "resize=pytorch" in text
