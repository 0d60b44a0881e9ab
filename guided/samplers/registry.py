"""Every sampler once, with its traits and its settings, behind one call.

A sampler is a function over the one guided denoiser (guided.guidance.denoiser.GuidedDenoiser) and
one list of noise levels (guided.samplers.levels.Levels):

    fn(den, x, levels, *, noise, after_step=None, callback=None, progress=False, **settings) -> x_0

`x` is x at levels.sigmas[0] in the model's own variable (x_T, or SDEdit's noised guide); `noise` the
per-sample generators (guided.samplers.noise.SampleNoise); `after_step` SDEdit's mask re-noising;
`callback(share done, x0 estimate)` the preview. `SAMPLERS[name]` is a `Sampler`: the function, the
model kinds it serves ("eps" networks on a VP chain, NCSN "score" ladders), how its `--steps` is read
(`levels`: a respaced chain, a plain count on SDE time, the model's ladder, or adaptive), whether it is
stochastic, when the extra clip of the guided x0 changes it, and its declared `settings` (typed, with
ranges: a setting it does not declare is refused, never recorded). `register(Sampler(...))` adds one
from outside the package (docs: Extending guided).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from guided.errors import GuidedError
from guided.samplers import continuous, discrete, fewstep


@dataclass(frozen=True)
class Setting:
    """One declared setting of a sampler: its type, default and valid range (or choices)."""
    name: str
    type: type
    default: Any
    low: Optional[float] = None  # inclusive lower bound of a number
    high: Optional[float] = None  # inclusive upper bound
    choices: Optional[tuple] = None
    help: str = ""

    def parse(self, value, sampler: str):
        """The value typed and checked, or a one-line error naming the valid range."""
        try:
            v = _typed(self.type, value)
        except (TypeError, ValueError):
            raise GuidedError(f"{sampler}'s setting {self.name} takes a {self.type.__name__}, not {value!r}") from None
        if self.choices is not None and v not in self.choices:
            raise GuidedError(f"{sampler}'s setting {self.name} is one of {', '.join(map(str, self.choices))}, not {v!r}")
        if isinstance(v, float) and not math.isfinite(v) or (self.low is not None and v < self.low) or (
                self.high is not None and v > self.high):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise GuidedError(f"{sampler}'s setting {self.name} must lie in [{lo}, {hi}], not {value}")
        return v


def _typed(kind: type, value):
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError
        return value.lower() in ("true", "1")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError
    return kind(value)


@dataclass(frozen=True)
class Sampler:
    name: str
    fn: Callable
    kinds: tuple = ("eps",)  # ScoreModel.kind values it serves
    levels: str = "chain"  # chain | sde | ladder | adaptive (guided.samplers.levels.KINDS)
    stochastic: bool = True
    clip_guided: str = "never"  # when the extra clip of the guided x0 changes it: never | always | score form
    settings: tuple = ()  # its Settings
    default_clip: str = "static"  # the clip kind it uses when none is asked (guided.diffusion.space.CLIPS)
    adaptive: Optional[str] = None  # how it chooses its own steps (levels == "adaptive" or "ladder")
    help: str = ""
    check: Optional[Callable[[dict], None]] = None  # refuses settings that contradict each other


    def typed(self, given: dict) -> dict:
        """Every declared setting, as given or its default; one line for a setting it does not take."""
        declared = {s.name: s for s in self.settings}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            takes = ", ".join(declared) or "no settings"
            raise GuidedError(f"the {self.name} sampler has no setting {unknown[0]!r}; it takes {takes}")
        typed = {k: s.parse(given[k], self.name) if k in given else s.default for k, s in declared.items()}
        if self.check is not None:
            self.check(typed)
        return typed

    def clips(self, ddpm_form: str = "mean") -> bool:
        """Whether the extra clip of the guided x0 (clip_guided) changes this sampler."""
        return self.clip_guided == "always" or (self.clip_guided == "score form" and ddpm_form == "score")

    @property
    def fixed_steps(self) -> bool:
        return self.levels in ("chain", "sde")


SAMPLERS: dict[str, Sampler] = {}
DEFAULT = {"eps": "ddpm", "score": "langevin"}  # the sampler of each model kind when none is asked for
DEFAULT_STEPS = "100"  # the steps of a fixed-step sampler when none are asked for


def register(sampler: Sampler) -> Sampler:
    """Add a sampler to the registry (by its name; a name already taken is refused)."""
    if sampler.name in SAMPLERS:
        raise GuidedError(f"a sampler named {sampler.name!r} is already registered")
    if sampler.levels not in ("chain", "sde", "ladder", "adaptive"):
        raise GuidedError(f"sampler {sampler.name}: levels must be chain, sde, ladder or adaptive")
    SAMPLERS[sampler.name] = sampler
    return sampler


def sampler_for(name: str, kind: str) -> Sampler:
    """The registry's sampler of that name, refused in one line where a model of `kind` cannot use it."""
    if name not in SAMPLERS:
        raise GuidedError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    spec = SAMPLERS[name]
    if kind not in spec.kinds:
        serves = serving(kind)
        if kind == "score":
            raise GuidedError(f"an NCSN model (a noise-conditional score network) cannot use the {name} sampler, "
                              f"which needs an eps-prediction model: use --sampler {' or '.join(reversed(serves))}")
        raise GuidedError(f"the {name} sampler needs an NCSN model (train.objective=ncsn); "
                          f"for this eps-prediction model use {', '.join(serves[:-1])} or {serves[-1]}")
    return spec


def serving(kind: str) -> tuple:
    """The samplers that serve a model kind ("eps" or "score"), in registry order."""
    return tuple(name for name, s in SAMPLERS.items() if kind in s.kinds)


def clip_guided_samplers() -> tuple:
    """The samplers the extra clip always changes."""
    return tuple(s for s in SAMPLERS if SAMPLERS[s].clip_guided == "always")


ETA = Setting("eta", float, 0.0, 0.0, None, help="DDIM's noise (0 = deterministic; 1 = DDPM's variance)")
DDIM_EPS = Setting("eps", str, "clipped", choices=("clipped", "model"),
                   help="where a clipping DDIM step takes eps: re-derived from the clipped x0 (the paper's code) or "
                        "the network's own (diffusers' DDIMScheduler.step by default)")
DDPM_FORM = Setting("ddpm_form", str, "mean", choices=("mean", "score"),
                    help="guidance as the paper's mean shift (Algorithm 1) or the score correction (Algorithm 2)")
SDE_ETA = Setting("eta", float, 1.0, 0.0, None, help="the SDE's noise (1 = the reverse SDE, 0 = DPM-Solver++(2M))")
EDM = tuple(Setting(k, float, v, 0.0, None) for k, v in fewstep.EDM_DEFAULTS.items())


def _edm_check(s: dict) -> None:
    if s["s_tmin"] > s["s_tmax"]:
        raise GuidedError(f"edm's s_tmin ({s['s_tmin']:g}) is above its s_tmax ({s['s_tmax']:g}): the churn would act "
                          f"nowhere; give s_tmin <= s_tmax")
PC = (Setting("predictor", str, "reverse_diffusion", choices=("reverse_diffusion", "euler_maruyama", "none")),
      Setting("corrector", str, "langevin", choices=("langevin", "none")),
      Setting("snr", float, 0.16, 0.0, None), Setting("n_corrector", int, 1, 1, None))
ODE = (Setting("rtol", float, 1e-5, 0.0, None), Setting("atol", float, 1e-5, 0.0, None))
LANGEVIN = (Setting("n_steps_each", int, 100, 1, None), Setting("step_lr", float, 2e-5, 0.0, None))

for _s in (
    Sampler("ddpm", discrete.run_ddpm, settings=(DDPM_FORM,), clip_guided="score form",
            help="ancestral sampling (Ho et al. 2020), guided by Algorithm 1's mean shift"),
    Sampler("ddim", discrete.run_ddim, stochastic=False, clip_guided="always", settings=(ETA, DDIM_EPS),
            help="DDIM (Song et al. 2021), guided by Algorithm 2"),
    Sampler("dpm++", discrete.run_dpmpp_2m, stochastic=False, clip_guided="always",
            help="DPM-Solver++(2M) in the paper's arithmetic (x0 clipped, then guided)"),
    Sampler("dpm++2m-sde", fewstep.run_dpmpp_2m_sde, settings=(SDE_ETA,), default_clip="dynamic",
            help="DPM-Solver++(2M) SDE (Lu et al. 2022), guided in data prediction"),
    Sampler("dpm++3m", fewstep.run_dpmpp_3m, stochastic=False, default_clip="dynamic",
            help="DPM-Solver++(3M), guided in data prediction"),
    Sampler("edm", fewstep.run_edm, settings=EDM, default_clip="dynamic", check=_edm_check,
            help="EDM's stochastic sampler (Karras et al. 2022, Algorithm 2)"),
    Sampler("pc", continuous.run_pc, ("eps", "score"), levels="sde", clip_guided="always", settings=PC,
            help="predictor-corrector on the reverse SDE (Song et al. 2021)"),
    Sampler("ode", continuous.run_ode, levels="adaptive", stochastic=False, clip_guided="always", settings=ODE,
            adaptive="adaptive RK45, rtol = atol = 1e-5", help="the probability-flow ODE, adaptive RK45"),
    Sampler("langevin", continuous.run_langevin, ("score",), levels="ladder", settings=LANGEVIN,
            adaptive="the model's noise ladder", help="annealed Langevin dynamics (Song & Ermon 2019)"),
):
    register(_s)
