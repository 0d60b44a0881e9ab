"""Training the ADM score model (the reference's image_train.py / TrainLoop).

The objective (train.objective.name: eps, vp_dsm or ncsn; guided.diffusion.objectives) draws
the batch's timesteps and noise and computes the loss. Label dropout
(train.objective.label_dropout) replaces a label by the null class, index num_classes, so the
model also learns the unconditional score for classifier-free guidance (Ho & Salimans 2022).
"""
from __future__ import annotations

import torch

from guided.diffusion.gaussian import create_diffusion
from guided.diffusion.space import PIXELS
from guided.errors import GuidedError
from guided.networks.diffusers import load_vae
from guided.networks.preconditioned import build_unet
from guided.training.trainer import TrainResult, Trainer, train
from guided.generation import Pipeline
from guided.training.probe import fid_floor, probe


class DiffusionTrainer(Trainer):
    kind, net_cfg_key = "unet", "model"

    def fit_config_to_data(self):
        super().fit_config_to_data()
        m, o = self.cfg.model, self.cfg.train.objective
        self.objective.check(m)
        if m.num_classes is not None:
            self.set_num_classes(m)
        if o.label_dropout > 0 and not (m.num_classes is not None and m.null_class):
            raise GuidedError("train.label_dropout > 0 needs a class-conditional model with model.null_class=true")
        if self.cfg.data.get("vae"):
            self.note_latent_chain()

    def note_latent_chain(self):
        """One line where a latent model trains on a chain whose first reverse step amplifies the network's error:
        the step from t = T divides by sqrt(alpha_T) (Ho et al. eq. 11), 31.6 for the cosine chain's clipped
        beta_T = 0.999, which clipping x0 absorbs on pixels but nothing absorbs on latents (a DiT on the digits'
        latents sampled latents of std 30-500 with ddpm and ddim: scripts/latent_digits_example.py)."""
        gain = float(1 / (1 - create_diffusion(self.cfg.diffusion, "").betas[-1]).sqrt())
        if gain > 10:
            self.print(f"note: latents are never clipped, and this chain's first reverse step (from t = T) multiplies the network's "
                       f"eps error by {gain:.1f} (beta_T {1 - 1 / gain**2:.3f}): latent models train on the linear "
                       f"chain (diffusion.noise_schedule=linear), as latent diffusion and DiT do")

    def build_model(self):
        return build_unet(self.cfg)  # the recipe's parameterization, returning eps (recipes.py)

    def prepare_batch(self, x0, y):
        n, dropout = len(x0), self.cfg.train.objective.label_dropout
        batch = dict(x=x0, **self.objective.prepare(x0, self.rngs.gen, self.rngs.noise_gen))
        if self.cfg.model.num_classes is not None:
            if dropout > 0:  # the null label for classifier-free guidance
                drop = torch.rand(n, generator=self.rngs.gen) < dropout
                y = torch.where(drop.to(y.device, non_blocking=True), torch.full_like(y, self.cfg.model.num_classes), y)
            batch["y"] = y
        return batch

    def network(self, y):
        kwargs = {} if y is None else {"y": y}
        return lambda x, t: self.model(x, t, **kwargs).float()

    def losses(self, b):
        return self.objective.loss(self.network(b.get("y")), b, self.rngs.noise_gen)

    def after_step(self, t, values, took):
        self.objective.observe(t, values["loss"], took, self.accel.gather)

    def probe(self):
        """Judge-space FID of EMA samples against the held-out digits (probe.py), logged as probe_*."""
        if self.cfg.data.kind != "digits" or not self.ema.averages:
            return
        if self.accel.is_main_process:

            net = build_unet(self.cfg).to(self.device).eval()
            net.load_state_dict(next(iter(self.ema.state_dicts().values())))
            n = self.cfg.train.probe.samples
            space = PIXELS
            if self.cfg.data.get("vae"):  # a latent model's samples are judged decoded
                space = load_vae(self.cfg.data.vae, "data.vae")
                space.vae.to(self.device)
            pipe = Pipeline(net, self.cfg.diffusion, label_map=self.label_map, space=space,
                            **self.objective.pipeline_kwargs())
            stats = probe(pipe, n, device=self.device)
            if self.cfg.model.num_classes is not None and self.cfg.model.null_class:  # the unconditional score too
                stats.update({f"{k}_null": v for k, v in probe(pipe, n, device=self.device, null=True).items()})
            stats["probe_fid_floor"] = fid_floor(self.cfg.data.image_size, n)
            self.record(stats)
            self.print(f"step {self.step}: probe " + " ".join(f"{k[6:]} {v:.4g}" for k, v in stats.items()))
        self.accel.wait_for_everyone()


def train_diffusion(cfg, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train (or with resume, continue) the score model of `cfg`; says how the run ended."""
    return train(DiffusionTrainer, cfg, resume=resume, stop_after=stop_after)
