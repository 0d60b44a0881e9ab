"""Samplers: plain functions over a model function, listed once in a registry with their traits
(fixed or adaptive steps, stochastic, which objectives, whether the extra clip applies): ancestral
DDPM, DDIM and DPM-Solver++ on respaced timesteps; predictor-corrector, the probability-flow ODE and
annealed Langevin dynamics on continuous time; SDEdit and the likelihood of the ODE. Samplers know
nothing of the kinds of guidance: they receive it as a model function and a gradient function."""
