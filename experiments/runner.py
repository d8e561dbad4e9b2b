"""Shared command-line runner of the experiments: absl flags + an ml_collections config file."""

from __future__ import annotations

import inspect
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddst_jax import checkpoint, data

_HERE = os.path.dirname(os.path.abspath(__file__))


def _default_config_path(relative: str) -> str:
    return os.path.join(os.path.dirname(_HERE), relative)


_FIELD = re.compile(r"^\s*c\.([\w.]+)\s*=\s*(.+?)\s+#\s*(.+)$")
_BARE_FIELD = re.compile(r"^\s*c\.([\w.]+)\s*=\s*([^#]+?)\s*$")


def field_docs(config_path: str) -> list[str]:
    """``--config.FIELD=DEFAULT  comment`` for every commented field of a config file.

    Blocks built by a function of the library (``c.data = data.default_config()``) are read
    from that function's source, so every field is listed with its own comment.
    """
    lines = []
    with open(config_path, encoding="utf-8") as f:
        source = f.read().splitlines()
    pending = ""  # comment lines on their own document the field below them
    for line in source:
        if "def _" in line:  # presets below the main config: not defaults
            break
        if re.match(r"^\s*c\.data\s*=\s*data\.default_config\(\)", line):
            for sub in inspect.getsource(data.default_config).splitlines():
                d = _FIELD.match(sub)
                if d:
                    lines.append(f"  --config.data.{d.group(1)}={d.group(2)}\n      {d.group(3)}")
            continue
        m = _FIELD.match(line) or _BARE_FIELD.match(line)
        if m and (len(m.groups()) == 3 or pending):
            doc = m.group(3) if len(m.groups()) == 3 else pending
            lines.append(f"  --config.{m.group(1)}={m.group(2)}\n      {doc}")
        comment = re.match(r"^\s*#\s*(.+)$", line)
        pending = f"{pending} {comment.group(1)}".strip() if comment else ""
    return lines


def main_with_config(config_file: str) -> None:
    """Define the flags, parse them and run ``train_and_evaluate``; clear messages on errors."""
    path = _default_config_path(config_file)
    config_flags.DEFINE_config_file(
        "config", path, "Config file, optionally with a preset: FILE.py:smoke.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).")
    flags.mark_flags_as_required(["workdir"])

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        from ddst_jax import train  # after flag parsing: keeps --help fast
        from ddst_jax.metrics import inception

        config = flags.FLAGS.config
        try:
            summary = train.train_and_evaluate(config, flags.FLAGS.workdir)
        except (ValueError, data.DatasetUnavailableError, checkpoint.CheckpointError,
                train.TrainingDiverged, inception.WeightsUnavailableError) as e:
            logging.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        state = "finished" if summary.get("finished") else "stopped"
        print(f"Run {state} at iteration {summary.get('iteration')} in {flags.FLAGS.workdir}.")

    if any(a in ("--help", "-h", "--helpshort") for a in sys.argv[1:]):
        print(sys.modules["__main__"].__doc__ or "")
        print(f"Config fields of {config_file} (override as --config.FIELD=VALUE; add ':smoke' "
              "to --config for the smoke preset):")
        print("\n".join(field_docs(path)))
        print("\nFlags:")
    app.run(main)
