"""Evaluation: feature extractors (Inception, DINOv2, the digits judge), FID / sFID / IS / precision /
recall, npz batches and reference batches, trade-off plots, and the conformance check against the
numbers of the paper's released code."""
