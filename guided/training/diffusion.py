"""Training the ADM score model (the reference's image_train.py / TrainLoop).

Objectives (train.objective):
  eps     the eps-MSE of Ho et al. (eq. 14), plus L_vb on the learned variance when
          model.learn_sigma (the hybrid loss, Nichol & Dhariwal eq. 16), through
          losses.training_losses, with uniform or loss-aware timestep sampling;
  vp_dsm  continuous-time denoising score matching on the VP SDE of the same
          schedule (Song et al. 2021 eq. 7), the network read as an eps predictor;
  ncsn    NCSN's denoising score matching over a geometric noise ladder (Song &
          Ermon 2019 eq. 5-6); the network's output is the score, its timestep
          input the ladder index (train.ncsn_sigma_max/min, train.ncsn_levels).
Label dropout (train.label_dropout) replaces a label by the null class, index
num_classes, so the model also learns the unconditional score for
classifier-free guidance (Ho & Salimans 2022).
"""
from __future__ import annotations

import torch

from guided.errors import GuidedError
from guided.diffusion.losses import create_schedule_sampler, training_losses
from guided.training.trainer import Trainer
from guided.networks.unet import UNetModel

OBJECTIVES = ("eps", "vp_dsm", "ncsn")


class DiffusionTrainer(Trainer):
    kind, net_cfg_key = "unet", "model"

    def fit_config_to_data(self):
        super().fit_config_to_data()
        m, tc = self.cfg.model, self.cfg.train
        if tc.objective not in OBJECTIVES:
            raise GuidedError(f"train.objective must be one of {', '.join(OBJECTIVES)}, not {tc.objective!r}")
        if tc.objective != "eps" and m.learn_sigma:
            raise GuidedError(f"train.objective={tc.objective} trains the score only; set model.learn_sigma=false")
        if m.num_classes is not None:
            self.set_num_classes(m)
        if tc.label_dropout > 0 and not (m.num_classes is not None and m.null_class):
            raise GuidedError("train.label_dropout > 0 needs a class-conditional model with model.null_class=true")

    def build_model(self):
        self.sampler = create_schedule_sampler(self.cfg.train.schedule_sampler, self.diffusion.num_timesteps)
        try:
            return UNetModel(self.cfg.model)
        except ValueError as e:
            raise GuidedError(f"cannot build the U-Net of this config: {e}") from None

    def prepare_batch(self, x0, y):
        n, tc = len(x0), self.cfg.train
        batch = dict(x=x0)
        if tc.objective == "eps":  # the score-based objectives draw their own times
            batch["t"], batch["weights"] = self.sampler.sample(n, self.device, generator=self.gen)
        if self.cfg.model.num_classes is not None:
            if tc.label_dropout > 0:  # the null label for classifier-free guidance
                drop = torch.rand(n, generator=self.gen) < tc.label_dropout
                y = torch.where(drop.to(y.device, non_blocking=True), torch.full_like(y, self.cfg.model.num_classes), y)
            batch["y"] = y
        if tc.objective == "eps":
            batch["noise"] = torch.randn(x0.shape, generator=self.noise_gen, device=self.device)
        return batch

    def network(self, y):
        kwargs = {} if y is None else {"y": y}
        return lambda x, t: self.model(x, t, **kwargs).float()

    def losses(self, b):
        objective = self.cfg.train.objective
        net = self.network(b.get("y"))
        if objective == "eps":
            terms = training_losses(self.diffusion, net, b["x"], b["t"], b["noise"])
            return (terms["loss"] * b["weights"]).mean(), terms
        from guided.samplers import continuous as ss  # the score-based objectives

        if objective == "vp_dsm":
            from guided.diffusion.models import eps_model_score
            from guided.diffusion.sde import DiscreteVPSDE

            sde = DiscreteVPSDE(self.diffusion.alphas_cumprod)
            loss = ss.dsm_loss(eps_model_score(net, sde), sde, b["x"], reduce="mean", generator=self.noise_gen)
        else:
            tc = self.cfg.train
            sigmas = ss.geometric_sigmas(tc.ncsn_sigma_max, tc.ncsn_sigma_min, tc.ncsn_levels).float()
            loss = ss.ncsn_loss(net, sigmas.to(self.device), b["x"], generator=self.noise_gen)
        return loss, {"loss": loss.detach().expand(len(b["x"]))}

    def probe(self):
        """Judge-space FID of EMA samples against the held-out digits (guided/probe.py), logged as probe_*."""
        if self.cfg.data.kind != "digits" or not self.ema:
            return
        if self.accel.is_main_process:
            from guided.generation import Pipeline
            from guided.training.probe import fid_floor, probe

            net = UNetModel(self.cfg.model).to(self.device).eval()
            net.load_state_dict(next(iter(self.ema_state_dicts().values())))
            tc, sigmas = self.cfg.train, None
            if tc.objective == "ncsn":
                from guided.diffusion.ladder import geometric_sigmas
                sigmas = geometric_sigmas(tc.ncsn_sigma_max, tc.ncsn_sigma_min, tc.ncsn_levels).float()
            pipe = Pipeline(net, self.cfg.diffusion, label_map=self.label_map, objective=tc.objective,
                            ncsn_sigmas=sigmas)
            stats = probe(pipe, tc.probe_samples, device=self.device)
            if self.cfg.model.num_classes is not None and self.cfg.model.null_class:  # the unconditional score too
                stats.update({f"{k}_null": v for k, v in probe(pipe, tc.probe_samples, device=self.device,
                                                              null=True).items()})
            stats["probe_fid_floor"] = fid_floor(self.cfg.data.image_size, tc.probe_samples)
            self.record(stats)
            self.print(f"step {self.step}: probe " + " ".join(f"{k[6:]} {v:.4g}" for k, v in stats.items()))
        self.accel.wait_for_everyone()

    def after_step(self, t, values, took):
        if hasattr(self.sampler, "loss_history") and self.cfg.train.objective == "eps" and took.item():
            # loss-aware sampling sees the losses of every process (the reference's all-gather); its
            # history lives on the host, so this sampler reads the losses every step
            ts, ls = self.accel.gather(t), self.accel.gather(values["loss"].detach())
            self.sampler.update_with_all_losses(ts.tolist(), ls.tolist())


def train_diffusion(cfg, resume: bool = False, stop_after: int | None = None) -> DiffusionTrainer:
    """Train (or with resume, continue) the score model of `cfg`; returns the finished trainer."""
    trainer = DiffusionTrainer(cfg, resume=resume)
    trainer.status = trainer.run(stop_after=stop_after)
    return trainer
