"""Training: losses, augmentation, the training loop, distributed launch, study model."""
