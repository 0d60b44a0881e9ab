"""Training objectives: one object per way a score model is trained (train.objective.name).

An objective owns its noise levels (`num_levels`, what training losses are logged by quarter
of), the randomness it draws for a batch (`prepare`), its per-example loss (`loss`), how the
classifier trainer noises clean images for it (`noise`, `network_t`), and the kind of model its
networks are (`kind`: the sampler registry says which samplers serve each kind). `objective_from_config(run_cfg)` builds the one a config names;
`OBJECTIVES` lists them all. Level indices t run from little to much noise for every objective.

  eps     the eps-MSE of Ho et al. (eq. 14), plus L_vb on a learned variance (the hybrid loss,
          Nichol & Dhariwal eq. 16), at uniform, loss-aware or log-normal (EDM) timesteps, with the
          eps-MSE weighted and the network parameterized by a recipe (guided.diffusion.recipes);
  vp_dsm  continuous-time DSM on the VP SDE of the same schedule (Song et al. 2021 eq. 7), the
          network read as an eps predictor;
  ncsn    NCSN's DSM over a geometric ladder (Song & Ermon 2019 eq. 5-6); the network's output
          is the score, its timestep input the ladder index.
"""
from __future__ import annotations

import torch

from guided.diffusion.gaussian import create_diffusion
from guided.diffusion.ladder import Ladder
from guided.diffusion.models import EpsModel, LadderModel, ScoreModel, eps_model_score
from guided.diffusion.recipes import chain_sigmas, is_default, loss_weights
from guided.diffusion.losses import (LossSecondMomentResampler, UniformSampler, create_schedule_sampler,
                                     dsm_loss, ncsn_loss, training_losses)
from guided.errors import GuidedError
from guided.config import migrate, saved_config, to_yaml
from guided.diffusion.sde import DiscreteVPSDE


class Objective:
    """The interface; see the module docstring."""

    name = ""
    kind = "eps"  # the ScoreModel kind of its networks: the sampler registry's entries say which kinds they serve
    noises_classifier = True  # a classifier can be trained on this objective's noise

    def __init__(self, objective_cfg, diffusion_cfg):
        self.cfg = objective_cfg

    @property
    def num_levels(self) -> int:
        raise NotImplementedError

    def check(self, model_cfg) -> None:
        """Refuse a score network (or a recipe) this objective cannot train."""
        if not is_default(self.cfg):
            raise GuidedError(f"train.objective={self.name} trains the paper's recipe only: the weighting, "
                              "prediction and lognormal timesteps are settings of train.objective.name=eps")
        if model_cfg.learn_sigma:
            raise GuidedError(f"train.objective={self.name} trains the score only; set model.learn_sigma=false")

    def parts(self) -> dict:
        """Stateful parts to save with the run ({name: object with state_dict / load_state_dict})."""
        return {}

    def prepare(self, x0, gen, noise_gen) -> dict:
        """This batch's randomness drawn up front (timesteps from `gen`, noise from `noise_gen`)."""
        return {}

    def loss(self, net, batch: dict, noise_gen) -> tuple[torch.Tensor, dict]:
        """(scalar loss, {name: per-example values}); `net(x, t)` is the score network."""
        raise NotImplementedError

    def observe(self, t, losses, took, gather) -> None:
        """See a training step's per-example losses (the loss-aware timestep sampler)."""

    def log_t(self, t: torch.Tensor) -> torch.Tensor:
        """The level a drawn t is logged at (QuarterMeter over num_levels)."""
        return t

    # -- the classifier's noise ------------------------------------------------------------
    def draw_levels(self, n: int, device, gen) -> torch.Tensor:
        """Uniform levels t in 0 .. num_levels - 1 for the classifier."""
        return self._uniform.sample(n, device, generator=gen)[0]

    def noise(self, x0, t, z):
        """x0 noised to level t with the standard normal draw z."""
        raise NotImplementedError

    def network_t(self, t):
        """The timestep input the networks see at level t."""
        raise NotImplementedError

    def band_edges(self, edges: torch.Tensor) -> torch.Tensor:
        """Calibration band edges over levels, in the network's timestep (increasing)."""
        raise NotImplementedError

    def pipeline_kwargs(self) -> dict:
        """What guided.generation's Pipeline needs to sample this objective's networks."""
        return {"objective": self.name, "ncsn_sigmas": None}

    @classmethod
    def adapt(cls, diffusion_cfg, sigmas=None, learned_variance: bool = False) -> ScoreModel:
        """Its networks adapted to the samplers' interface: an eps network on the chain of diffusion_cfg."""
        return EpsModel(diffusion_cfg, learned_variance)


class EpsObjective(Objective):
    name = "eps"

    def __init__(self, objective_cfg, diffusion_cfg):
        super().__init__(objective_cfg, diffusion_cfg)
        self.diffusion = create_diffusion(diffusion_cfg, timestep_respacing="")  # every timestep
        abar = self.diffusion.alphas_cumprod
        self.sampler = create_schedule_sampler(objective_cfg.schedule_sampler, self.diffusion.num_timesteps,
                                               chain_sigmas(abar), objective_cfg.lognormal_mean,
                                               objective_cfg.lognormal_std)
        self.mse_weights = loss_weights(objective_cfg, abar)  # None: the paper's uniform weight
        self._uniform = UniformSampler(self.num_levels)

    @property
    def num_levels(self) -> int:
        return self.diffusion.num_timesteps

    def check(self, model_cfg) -> None:
        pass  # a learned variance trains through L_vb; the recipe was checked when it was built

    def parts(self) -> dict:
        return {"sampler": self.sampler} if isinstance(self.sampler, LossSecondMomentResampler) else {}

    def prepare(self, x0, gen, noise_gen):
        t, weights = self.sampler.sample(len(x0), x0.device, generator=gen)
        return dict(t=t, weights=weights, noise=torch.randn(x0.shape, generator=noise_gen, device=x0.device))

    def loss(self, net, b, noise_gen):
        w = None if self.mse_weights is None else self.diffusion.on_device(self.mse_weights, b["t"].device)[b["t"]]
        terms = training_losses(self.diffusion, net, b["x"], b["t"], b["noise"], mse_weight=w)
        return (terms["loss"] * b["weights"]).mean(), terms

    def observe(self, t, losses, took, gather):
        # loss-aware sampling sees the losses of every process (the reference's all-gather); its
        # history lives on the host, so this sampler reads the losses every step
        if isinstance(self.sampler, LossSecondMomentResampler) and took.item():
            self.sampler.update_with_all_losses(gather(t).tolist(), gather(losses.detach()).tolist())

    def log_t(self, t):
        return self.diffusion.original_t(t)

    def noise(self, x0, t, z):
        return self.diffusion.q_sample(x0, t, z)  # Ho et al. eq. 4

    def network_t(self, t):
        return self.diffusion.model_t(t)

    def band_edges(self, edges):
        return edges * (1000.0 / self.num_levels) if self.diffusion.rescale_timesteps else edges


class VPDSMObjective(EpsObjective):
    name = "vp_dsm"
    noises_classifier = False

    def __init__(self, objective_cfg, diffusion_cfg):

        super().__init__(objective_cfg, diffusion_cfg)
        self.sde = DiscreteVPSDE(self.diffusion.alphas_cumprod)

    def check(self, model_cfg) -> None:
        Objective.check(self, model_cfg)

    def parts(self) -> dict:
        return {}

    def prepare(self, x0, gen, noise_gen):
        return {}  # dsm_loss draws its own times and noise

    def loss(self, net, b, noise_gen):
        loss = dsm_loss(eps_model_score(net, self.sde), self.sde, b["x"], reduce="mean", generator=noise_gen)
        return loss, {"loss": loss.detach().expand(len(b["x"]))}

    def observe(self, t, losses, took, gather):
        pass


class NCSNObjective(Objective):
    name = "ncsn"
    kind = "score"

    def __init__(self, objective_cfg, diffusion_cfg):
        super().__init__(objective_cfg, diffusion_cfg)
        c = objective_cfg
        self.ladder = Ladder.geometric(c.ncsn_sigma_max, c.ncsn_sigma_min, c.ncsn_levels)  # once
        self.sigmas = self.ladder.sigmas  # float64, largest first
        self._sigmas32, self._uniform = self.sigmas.float(), UniformSampler(self.num_levels)

    @property
    def num_levels(self) -> int:
        return self.ladder.num_levels

    def loss(self, net, b, noise_gen):
        x = b["x"]
        loss = ncsn_loss(net, self._on(x.device), x, generator=noise_gen)
        return loss, {"loss": loss.detach().expand(len(x))}

    def _on(self, device):
        return self.ladder.on_device(self._sigmas32, device)

    def noise(self, x0, t, z):
        return self.ladder.perturb(x0, self.network_t(t), z)  # x = x_0 + sigma_i z

    def network_t(self, t):
        return self.num_levels - 1 - t  # the ladder index: t = 0 is the smallest sigma

    def band_edges(self, edges):
        return (self.num_levels - edges).flip(0)  # in the ladder index, which runs the other way

    def pipeline_kwargs(self):
        return {"objective": self.name, "ncsn_sigmas": self.sigmas}  # the exact (float64) ladder

    @classmethod
    def adapt(cls, diffusion_cfg, sigmas=None, learned_variance: bool = False) -> ScoreModel:
        """A score network on the ladder `sigmas` (the VE SDE spanning it)."""
        if sigmas is None:
            raise GuidedError("an NCSN model needs its noise ladder (train.objective.ncsn_* of its config)")
        return LadderModel(sigmas if isinstance(sigmas, Ladder) else Ladder(sigmas))


OBJECTIVES = {cls.name: cls for cls in (EpsObjective, VPDSMObjective, NCSNObjective)}


def adapt(diffusion_cfg, objective: str = "eps", sigmas=None, learned_variance: bool = False) -> ScoreModel:
    """The ScoreModel of a network trained with the objective named `objective`."""
    if objective not in OBJECTIVES:
        raise GuidedError(f"unknown training objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective].adapt(diffusion_cfg, sigmas, learned_variance)


def objective_from_config(run_cfg) -> Objective:
    """The objective of a RunConfig (train.objective.name; an old flat config is migrated first)."""
    if isinstance(run_cfg.train.get("objective"), str):

        run_cfg = saved_config(to_yaml(migrate(run_cfg)))
    oc = run_cfg.train.objective
    if oc.name not in OBJECTIVES:
        raise GuidedError(f"train.objective must be one of {', '.join(OBJECTIVES)}, not {oc.name!r}")
    return OBJECTIVES[oc.name](oc, run_cfg.diffusion)
