"""Train a sparse SNGAN on CIFAR-10: ``python -m experiments.cifar10 --workdir=DIR``.

Every config field can be overridden, e.g. ``--config.sparsity.method=sdst``; ``--help`` lists
them (run with ``--helpfull`` for absl's own flags). Re-running the same command resumes the run
from its latest checkpoint; a finished run is reported and left alone.
"""

from experiments import runner

if __name__ == "__main__":
    runner.main_with_config("experiments/configs/cifar10.py")
