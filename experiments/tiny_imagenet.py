"""Train a sparse BigGAN on TinyImageNet (64x64): ``python -m experiments.tiny_imagenet``.

Same runner and flags as ``experiments.cifar10``; ``--help`` lists every config field.
"""

from experiments import runner

if __name__ == "__main__":
    runner.main_with_config("experiments/configs/tiny_imagenet.py")
