"""The training and inference input pipeline: image datasets and their collate, augmentations, samplers, GPU decode."""
