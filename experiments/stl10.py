"""Train a sparse SNGAN on STL-10 (48x48): ``python -m experiments.stl10 --workdir=DIR``.

Same runner and flags as ``experiments.cifar10``; ``--help`` lists every config field.
"""

from experiments import runner

if __name__ == "__main__":
    runner.main_with_config("experiments/configs/stl10.py")
