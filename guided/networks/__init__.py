"""Networks: the ADM U-Net score model and the noise-aware classifier (one shared encoder), their
building blocks, the DiT (Peebles & Xie 2023), the paper's flag names and published presets, and checkpoint loading and export.
Networks know nothing of diffusion: they map (x, timesteps[, labels]) to an output tensor."""
