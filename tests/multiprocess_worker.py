"""One JAX process of the 2-process test (run by tests/test_multiprocess.py, not by pytest).

    python tests/multiprocess_worker.py PROCESS_ID PORT WORKDIR [STOP_AFTER]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_devices import use_fake_cpu_devices  # noqa: E402

# Before any computation: 4 fake CPU devices per process, 8 in the 2-process cluster.
use_fake_cpu_devices(4)

from test_multiprocess import MP_OVERRIDES  # noqa: E402
from test_train import _StopAfter, tiny_config  # noqa: E402

from ddst_jax import checkpoint, train  # noqa: E402


def main(process_id: int, port: int, workdir: str, stop_after: int) -> None:
    config = tiny_config(**MP_OVERRIDES)
    config.parallel.distributed = True
    config.parallel.coordinator_address = f"localhost:{port}"
    config.parallel.num_processes = 2
    config.parallel.process_id = process_id
    if stop_after:
        # Multi-host processes agree on a stop only every log_every iterations (one collective
        # per log step, not per iteration), so the flag is consulted at those iterations only.
        checks = stop_after // config.train.log_every
        checkpoint.install_stop_handler = lambda *a, **k: _StopAfter(checks)
    summary = train.train_and_evaluate(config, workdir)
    print(f"process {process_id}: iteration {summary['iteration']} devices "
          f"{summary['devices']} processes {summary['processes']}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4
         else 0)
