"""Train a sparse class-conditional BigGAN on CIFAR-10: ``python -m experiments.cifar10_biggan``.

Same runner and flags as ``experiments.cifar10``; ``--help`` lists every config field.
"""

from experiments import runner

if __name__ == "__main__":
    runner.main_with_config("experiments/configs/cifar10_biggan.py")
