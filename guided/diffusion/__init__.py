"""Noise processes and training objectives: the discrete Gaussian diffusion of the paper (schedules,
respacing, posterior), the continuous SDEs of the score-based family, the NCSN noise ladder, the
losses, and one object per training objective that owns its noise levels, its loss and the samplers
it allows; `models` adapts a trained network once to the interface every sampler uses."""
