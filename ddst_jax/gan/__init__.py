"""GAN models, losses and train steps (knows nothing about experiments)."""
