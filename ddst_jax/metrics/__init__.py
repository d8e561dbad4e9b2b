"""Evaluation: Inception network (FID variant), FID, Inception Score and training FLOPs."""
