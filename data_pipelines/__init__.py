"""Grain input pipelines for medical images: sources, augmentation ops, presets, label fractions."""
