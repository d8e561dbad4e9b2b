"""The resuming side of tests/test_resume_devices.py: a fresh process with 4 fake CPU devices.

    python tests/resume_devices_worker.py WRITTEN_WORKDIR OUT_DIR M [M ...]

WRITTEN_WORKDIR holds a run checkpointed at iteration 4 on 8 devices. For each device count M
(at most 4), on a mesh of this process's first M devices, ``OUT_DIR/restored_M.npz`` holds the
checkpoint at iteration 4 restored onto that mesh, leaf by leaf (``state_arrays``), and
``OUT_DIR/restored_M.json`` the number of devices each leaf lives on. On ``CONTINUE_ON``
devices, ``OUT_DIR/resumed/`` is a copy of the workdir resumed by ``train.train_and_evaluate``
to iteration 8, and ``OUT_DIR/final.npz`` its final state's leaves plus ``images``, the final
generator's output on a fixed noise batch (``sample_images``).
"""

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_devices import use_fake_cpu_devices  # noqa: E402

# Before any computation: fewer devices than the writer had, so the 8-device sharding recorded
# in the checkpoint names devices this process does not have.
use_fake_cpu_devices(4)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from test_resume_devices import (  # noqa: E402
    CONTINUE_ON,
    RESUME_OVERRIDES,
    WRITTEN_STEP,
    sample_images,
    state_arrays,
)
from test_train import restore_final, tiny_config  # noqa: E402

from ddst_jax import train  # noqa: E402


def _config(num_devices: int):
    return tiny_config(**RESUME_OVERRIDES, **{"parallel.num_devices": num_devices})


def main(written: str, out: str, counts: list[int]) -> None:
    assert jax.device_count() == 4, jax.devices()
    for m in counts:
        restored, _ = restore_final(written, _config(m), step=WRITTEN_STEP)
        np.savez(os.path.join(out, f"restored_{m}.npz"), **state_arrays(restored.state))
        devices = {len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(restored.state)}
        with open(os.path.join(out, f"restored_{m}.json"), "w", encoding="utf-8") as f:
            json.dump({"devices_per_leaf": sorted(devices)}, f)
        print(f"restored on {m} of {jax.device_count()} devices", flush=True)
    # The runner's own resume (~10 s per device count, so one): restore, data position, logs.
    workdir = os.path.join(out, "resumed")
    shutil.copytree(written, workdir)
    summary = train.train_and_evaluate(_config(CONTINUE_ON), workdir)
    assert summary["iterations_this_session"] == 4, summary
    final, setup = restore_final(workdir, _config(CONTINUE_ON))
    np.savez(os.path.join(out, "final.npz"), **state_arrays(final.state),
             images=sample_images(setup, final.state))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]])
