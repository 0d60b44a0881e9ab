"""Guidance: composable terms wrapped around a model function (noise-aware classifier, x0 classifier,
classifier-free, autoguidance), each with a scale, an interval of noise levels and a schedule, and the
temperature calibration of a classifier's logits. Never built into a network or a sampler."""
