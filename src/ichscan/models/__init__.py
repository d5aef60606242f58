"""Models: torchvision backbones with fresh heads, the study-level sequence model, bundles."""
