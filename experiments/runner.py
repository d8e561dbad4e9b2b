"""Shared command-line runner of the experiments: absl flags + an ml_collections config file."""

from __future__ import annotations

import difflib
import errno
import importlib.util
import inspect
import logging as pylogging
import os
import re
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from ddst_jax import stopping

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
    from ddst_jax import data  # noqa: PLC0415 (heavy: only --help needs it)

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


_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_ACCESS_ERRNOS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (itself, its cause or context chain), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _last_checkpoint(workdir: str) -> int | None:
    from ddst_jax import storage

    folder = storage.join(workdir, "checkpoints")
    steps = [int(n) for n in storage.listdir(folder) if n.isdigit()] \
        if storage.isdir(folder) else []
    return max(steps) if steps else None


def user_error(e: BaseException, workdir: str) -> str | None:
    """One line for an error caused by input or environment, or None for a bug (traceback)."""
    from ddst_jax import checkpoint, rundir, train
    from ddst_jax.metrics import inception

    if isinstance(e, ValueError | checkpoint.CheckpointError | train.TrainingDiverged
                  | inception.WeightsUnavailableError | rundir.WorkdirLocked):
        return str(e)
    os_error = _os_error(e)
    if os_error is None:
        return None
    where = os_error.filename or workdir
    if os_error.errno in _DISK_ERRNOS:
        last = _last_checkpoint(workdir)
        resume = (f"it resumes from the last complete checkpoint (iteration {last})"
                  if last is not None else "no checkpoint was complete, so it starts again")
        return (f"{_DISK_ERRNOS[os_error.errno]} while writing {where}: free some space (or use "
                f"a --workdir on a larger disk) and re-run the same command; {resume}.")
    if os_error.errno in _ACCESS_ERRNOS:
        return (f"{_ACCESS_ERRNOS[os_error.errno]}: cannot write {where}; use a --workdir you "
                "can write to.")
    return None


def _config_source(argv: list[str], default_path: str) -> tuple[str, str | None]:
    """(config file, preset) named by ``--config`` in ``argv`` (or the default file)."""
    value = default_path
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    path, _, preset = value.partition(":")
    return path, preset or None


def _overrides(argv: list[str]) -> list[str]:
    """The ``a.b`` of every ``--config.a.b=...`` in ``argv``."""
    names = []
    for arg in argv:
        m = re.match(r"^--config\.([\w.]+)(=|$)", arg)
        if m:
            names.append(m.group(1))
    return names


def config_flag_error(argv: list[str], default_path: str, e: BaseException) -> str:
    """One line naming a bad ``--config...`` flag and, for a misspelt field, the closest one."""
    path, preset = _config_source(argv, default_path)
    try:
        spec = importlib.util.spec_from_file_location("_config_under_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(preset) if preset is not None else module.get_config()
    except Exception:  # noqa: BLE001 (the config file itself is broken: show the error)
        return f"--config={path}: {_first_line(e)}"
    for name in _overrides(argv):
        node, walked = config, []
        for part in name.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1)
                where = "config." + ".".join(walked) if walked else "the config"
                hint = (f"; did you mean --config.{'.'.join([*walked, close[0]])}?"
                        if close else "")
                return (f"--config.{name}: {where} has no field {part!r}{hint} (--help lists "
                        "every field)")
            node, walked = node[part], [*walked, part]
    return f"{_first_line(e)} (--help lists every field)"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


_OWN_CODE = (os.sep + "ddst_jax" + os.sep, os.sep + "experiments" + os.sep)


class _NoLibraryTracebacks(pylogging.Filter):
    """Keeps a library's warning or error as one line: its traceback is dropped (the runner
    reports the failure itself; ``--verbose`` keeps everything)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.exc_info and not any(p in record.pathname for p in _OWN_CODE):
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def _quiet_thread_exception(args: threading.ExceptHookArgs) -> None:
    # A library's background thread (e.g. orbax's checkpoint finaliser) failing: the main
    # thread sees the same error and reports it in one line; keep the details in the log.
    logging.info("Background thread %s failed: %s: %s", getattr(args.thread, "name", "?"),
                 args.exc_type.__name__, args.exc_value)


def quiet_libraries() -> None:
    """Only warnings and errors from absl-logging libraries (orbax, JAX's backend probe...), one
    line each, and no tracebacks from their background threads; the runner's own messages are
    printed by ``reporting.say``."""
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_NoLibraryTracebacks())
    threading.excepthook = _quiet_thread_exception


def main_with_config(config_file: str) -> None:
    """Define the flags, parse them and run ``train_and_evaluate``; clear messages on errors."""
    # First of all: from here on a Ctrl-C / SIGTERM only sets a flag that the run polls.
    stop = stopping.install_stop_handler()
    path = _default_config_path(config_file)
    config_flags.DEFINE_config_file(
        "config", path, "Config file, optionally with a preset: FILE.py:smoke.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).")
    flags.DEFINE_list(
        "change", [], "Config fields (or sections) allowed to differ from the run's when "
        "resuming, e.g. --change=train.iterations to extend a run; recorded in "
        "config_history.jsonl.")
    flags.DEFINE_bool("verbose", False, "Full tracebacks and every library's INFO log lines.")
    flags.mark_flags_as_required(["workdir"])

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            message = str(e)
            if not any(a.startswith("--config.") for a in argv[1:]):
                print(f"error: {message}\nPass --help for the flags and config fields.",
                      file=sys.stderr)
                sys.exit(2)
            print(f"error: {config_flag_error(argv, path, e)}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # noqa: BLE001 (ml_collections raises plain errors for overrides)
            if "--verbose" in argv:
                raise
            print(f"error: {config_flag_error(argv, path, e)}", file=sys.stderr)
            sys.exit(2)

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        verbose = flags.FLAGS.verbose
        if not verbose:
            quiet_libraries()
        from ddst_jax import train  # after flag parsing: keeps --help fast

        config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
        try:
            summary = train.train_and_evaluate(config, workdir,
                                               allow_changes=flags.FLAGS.change, stop=stop)
        except Exception as e:  # noqa: BLE001
            from ddst_jax import storage

            message = user_error(e, storage.resolve(workdir))
            if message is None or verbose:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        if summary.get("stopped_before_training"):
            return
        state = "finished" if summary.get("finished") else "stopped"
        print(f"Run {state} at iteration {summary.get('iteration')} in {workdir}.")

    if any(a in ("--help", "-h", "--helpshort") for a in sys.argv[1:]):
        print(sys.modules["__main__"].__doc__ or "")
        print(f"Config fields of {config_file} (override as --config.FIELD=VALUE; add ':smoke' "
              "to --config for the smoke preset):")
        print("\n".join(field_docs(path)))
        print("\nFlags:")
    app.run(main, flags_parser=parse)
