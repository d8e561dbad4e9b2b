"""One JAX process of the 2-process workdir-lock test (run by tests/test_fault_injection.py).

    python tests/lock_worker.py PROCESS_ID PORT WORKDIR

Prints ``held``, ``not process 0`` or ``refused: MESSAGE`` and exits 0.
"""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 1)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

from ddst_jax import rundir  # noqa: E402


def main(process_id: int, port: int, workdir: str) -> None:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    try:
        lock = rundir.acquire_for_all_processes(workdir)
    except rundir.WorkdirLocked as e:
        print(f"refused: {e}", flush=True)
        return
    print("held" if lock is not None else "not process 0", flush=True)
    if lock is not None:
        lock.release()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
