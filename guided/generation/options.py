"""Sampling options, and the guidance methods described once.

`SampleOptions` is what one sampling run is asked for; a field left None is decided after the model
is loaded, once, by guided.generation.resolve.resolve (the model's own defaults, then the sampler
registry's), and the resolved options are what settings.json records under "options". `METHODS` lists every guidance method once: its guidance term, the
option fields of its scale and interval (and schedule, temperature where it has them), its
neutral scale, its command-line flag names, its name on the demo page and the network it needs.
The command line's flags, the sweepable parameters and the demo's method menu derive from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SampleOptions:
    """What one sampling run asks for. A field left None is decided once, after loading, by
    guided.generation.resolve.resolve (the model's own defaults, then the registry's); the resolved
    options are what settings.json records. `settings` holds the sampler's declared settings (eta,
    churn, snr, ...); `terms` the guidance terms registered from outside the package, by name."""
    sampler: Optional[str] = None  # None: the model's default, else the registry's for its kind
    steps: Optional[str] = None  # None: the model's default with its sampler, else "100" (fixed-step samplers)
    scale: Optional[float] = 0.0  # None: 1 where the pipeline has a classifier and no other method is on
    cfg_scale: float = 1.0
    # x0 clipping, one setting for every sampler (guided.diffusion.space): static | dynamic | none;
    # None: the model's default, else the sampler's (static; dynamic for the few-step samplers).
    clip: Optional[str] = None
    percentile: float = 0.995  # of the dynamic threshold
    # Clip x0 again where the paper's code does not: the guided x0 of ddim and dpm++ (after the
    # score correction), the x0 behind the eps of pc and ode. None: the model's default (off = the paper's).
    clip_guided: Optional[bool] = None
    precision: str = "fp32"
    settings: dict = field(default_factory=dict)  # the sampler's own declared settings (eta, snr, churn, ...)
    # the guidance layer (guided/guidance): every term has a scale and an interval (sigma_lo, sigma_hi)
    interval: Optional[tuple] = None  # the noise-aware classifier's; None = every level
    schedule: str = "constant"  # the classifier's weight over sigma (guidance.terms.SCHEDULES)
    calibration: bool = True  # divide the classifier's logits by its fitted temperatures, when it has them
    cfg_interval: Optional[tuple] = None
    autoguide_scale: float = 1.0  # w of autoguidance (1 = off); needs Pipeline.weak_model
    autoguide_interval: Optional[tuple] = None
    x0_scale: float = 0.0  # a clean-image classifier on x0_hat (0 = off); needs Pipeline.x0_classifier
    x0_temperature: float = 1.0
    x0_interval: Optional[tuple] = None
    x0_schedule: str = "constant"
    # guidance terms registered from outside the package (guided.guidance.terms.register_term), by name:
    # {"scale": s, "interval": (lo, hi) or None, "schedule": "constant"}; their networks: Pipeline.guides
    terms: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One guidance method: a term of guided.guidance.terms over one network."""
    term: str  # Term.kind
    demo: str  # its name on the demo page
    scale: str  # the SampleOptions field of its scale
    interval: str  # ... of its sigma interval
    off: float  # the scale that turns it off
    network: Optional[str]  # the Pipeline attribute of its network (None: the score model itself)
    loader: Optional[str]  # the option naming a network to load for it (--autoguide, --x0-classifier)
    flag: str  # its scale's command-line flag
    help: str
    schedule: Optional[str] = None  # the SampleOptions field of its weight over sigma
    temperature: Optional[str] = None
    start: float = 2.0  # its scale when it is picked without one (the demo's --method): the docs' example value


METHODS = (
    Method("classifier", "classifier", "scale", "interval", 0.0, "classifier", None, "--scale",
           "noise-aware classifier guidance scale s (0 = none)", schedule="schedule", start=1.0),
    Method("cfg", "classifier-free", "cfg_scale", "cfg_interval", 1.0, None, None, "--cfg-scale",
           "classifier-free guidance scale (1 = off; needs a model trained with label dropout)"),
    Method("autoguide", "autoguidance", "autoguide_scale", "autoguide_interval", 1.0, "weak_model", "autoguide",
           "--autoguide-scale", "autoguidance w: D_weak + w (D_main - D_weak) (1 = off)"),
    Method("x0_classifier", "x0-classifier", "x0_scale", "x0_interval", 0.0, "x0_classifier", "x0_classifier",
           "--x0-scale", "x0-classifier guidance scale (0 = none)", schedule="x0_schedule",
           temperature="x0_temperature", start=4.0),
)
BY_TERM = {m.term: m for m in METHODS}


def active_methods(opts: SampleOptions) -> list[Method]:
    """The methods the options turn on."""
    return [m for m in METHODS if getattr(opts, m.scale) != m.off]
