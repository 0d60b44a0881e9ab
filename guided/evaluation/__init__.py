"""Evaluation: the feature-extractor interface (extractor) and its networks (features: Inception,
DINOv2; judge: the digits classifier), FID / sFID / IS / precision / recall (metrics, evaluate), npz
batches and reference batches, trade-off plots, and the conformance check against the numbers of the
paper's released code. Library only: the command lines over it are guided.cli.evaluate,
reference_batch, plots and conformance."""
