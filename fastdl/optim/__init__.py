"""Drop-in fused optimizers."""
