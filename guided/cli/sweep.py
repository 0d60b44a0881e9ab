"""Guidance sweeps: sample at each value of a guidance parameter over seeds, evaluate, tabulate, plot.

    python -m guided.cli.sweep --model uncond --scales 0,1,2,4,10 --seeds 3 --num-samples 1000 --out sweeps/uncond
    python -m guided.cli.sweep --model cond --sweep cfg_scale=1,2,4 --scale 0 --out sweeps/cfg

The folder OUT is one experiment. OUT/settings.json records what every row was made with
(models and their weights' digests, sampler, counts, classes, reference, feature space);
a rerun with the same settings resumes or extends it (more values, more seeds), one with
other settings is refused in one line (--overwrite starts afresh), so rows never mix.
Samples go to OUT/<param>_<value>/seed_<s>/ (samples.npz, grid.png, settings.json); seed
repetition j draws sample i with seed `seed + j * num_samples + i`, so repetitions share
no noise and the first is the single-seed sweep. Metrics per run go to OUT/runs.csv; their
mean, std, min and max over seeds per value to OUT/results.csv and OUT/results.json, and
their curves to OUT/sweep.png (guided.evaluation.plots; python -m guided.cli.plots overlays sweeps).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable, Optional

from guided.cli import Parser, run_cli
from guided.cli.evaluation_options import add_feature_options
from guided.cli.options import (_number, _scales, add_guidance_args, add_model_args, add_sampler_args, guide_settings,
                                interval, options, pipeline_keywords)
from guided.errors import GuidedError
from guided.evaluation.evaluate import NpzImages
from guided.evaluation.features import get_extractor
from guided.evaluation.plots import plot_sweep
from guided.evaluation.sweeps import SweepPlan, claim, file_digest, format_table, run_sweep, weights_digest
from guided.generation import SampleOptions, load_pipeline
from guided.generation.loading import parse_classes
from guided.generation.options import METHODS
from guided.generation.resolve import resolve
from guided.generation.runtime import processes

DIGITS_REFERENCE = {"data": "digits", "num_samples": 1000, "seed": 0}  # python -m guided.cli.reference_batch digits


@dataclasses.dataclass(frozen=True)
class Sweepable:
    """A sample option a sweep can vary: the SampleOptions field it sets and how a value is read.
    `apply` replaces the plain field assignment where an option needs more."""
    field: str
    parse: Callable[[str], object]
    help: str
    apply: Optional[Callable[[SampleOptions, object], SampleOptions]] = None

    def options(self, base: SampleOptions, value) -> SampleOptions:
        return self.apply(base, value) if self.apply else dataclasses.replace(base, **{self.field: value})


def _steps(text: str) -> str:
    if not text or "," in text:
        raise TypeError
    return text


SWEEPABLE = {  # every guidance method's scale, interval (and temperature), from one table; two sampler options
    **{m.scale: Sweepable(m.scale, _number(float, 0.0), f"{m.demo} guidance scale") for m in METHODS},
    **{m.interval: Sweepable(m.interval, interval, f"{m.demo} guidance's sigma interval, LO:HI per value")
       for m in METHODS},
    **{m.temperature: Sweepable(m.temperature, _number(float, 0.0, low_open=True), f"{m.demo} temperature")
       for m in METHODS if m.temperature},
    "eta": Sweepable("eta", _number(float, 0.0), "the sampler's noise (ddim, dpm++2m-sde)",
                     apply=lambda o, v: dataclasses.replace(o, settings={**o.settings, "eta": v})),
    "steps": Sweepable("steps", _steps, "respacing, one count or ddimN / quadN per value"),
}


def swept_network(param: str) -> tuple:
    """The guide network a swept parameter needs loaded whatever the base scale."""
    return tuple(m.loader for m in METHODS if m.loader and param in (m.scale, m.interval, m.temperature))


def base_scale(args, param: str) -> Optional[float]:
    """--scale of every point: as given, else sample_guided.py's rule (guided.generation.resolve), with a
    swept guidance method other than the classifier counting as named (it runs alone)."""
    if args.scale is None and any(m.term != "classifier" and param in (m.scale, m.interval, m.temperature)
                                  for m in METHODS):
        args.scale = 0.0
    return args.scale


def parse_sweep(text: str) -> tuple[str, list]:
    """'NAME=V1,V2,...' -> (NAME, [values]) for a parameter in SWEEPABLE."""
    name, _, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if name not in SWEEPABLE or not values.strip():
        raise GuidedError(f"--sweep {text!r}: expected NAME=V1,V2,... with NAME one of {', '.join(SWEEPABLE)}")
    spec = SWEEPABLE[name]
    try:
        parsed = [spec.parse(v.strip()) for v in values.split(",") if v.strip()]
    except TypeError:
        raise GuidedError(f"--sweep {text!r}: values of {name} must each be a {spec.parse.__name__}") from None
    return name, list(dict.fromkeys(parsed))


def build_parser() -> Parser:
    p = Parser(prog="python -m guided.cli.sweep", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    g = p.add_argument_group("the swept parameter")
    g.add_argument("--scales", type=_scales, default=None, help="classifier-guidance scales, e.g. 0,0.5,1,2,4,10")
    g.add_argument("--sweep", default=None, metavar="NAME=V1,V2",
                   help="sweep another sample option instead: " + "; ".join(f"{k} ({s.help})"
                                                                        for k, s in SWEEPABLE.items()))
    g.add_argument("--seeds", type=_number(int, 1), default=1,
                   help="repetitions per value with disjoint seeds: mean, std, min and max over them (default: 1)")
    add_guidance_args(p)  # --scale: the classifier's while another option is swept
    add_sampler_args(p)
    e = p.add_argument_group("evaluation")
    e.add_argument("--reference", default="digits",
                   help="reference batch (.npz in the paper's layout; python -m guided.cli.reference_batch makes one), or "
                        "'digits': 1,000 class-balanced training digits built into OUT")
    add_feature_options(e, default=None, batch_size=False,
                        features_help="feature network (default: digits for the digits reference, else inception)")
    p.add_argument("--out", required=True, help="the sweep folder (one experiment: see above)")
    p.add_argument("--overwrite", action="store_true", help="delete the sweep in --out and start afresh")
    return p


def sweep_settings(args, param: str, pipeline, classes, features: str, base) -> dict:
    """Everything that changes the numbers of a sweep; not the values, seeds, batch size or device."""
    opts = dataclasses.asdict(base)
    opts.pop(SWEEPABLE[param].field, None)
    opts["settings"].pop(param, None)
    if args.reference == "digits":
        size = pipeline.image_shape()[1]  # samples are written RGB (a grey model's as three equal channels)
        reference = dict(DIGITS_REFERENCE, image_size=size, channels=3)
    else:
        reference = {"file": str(Path(args.reference).resolve()), "sha256": file_digest(Path(args.reference))}
    return {"sweep": param, "model": args.model, "model_weights": weights_digest(pipeline.model),
            "classifier": args.classifier, "classifier_weights": weights_digest(pipeline.classifier),
            "adm_flags": args.adm_flags, "classifier_flags": args.classifier_flags, "classes": classes,
            **({"scheduler": args.scheduler} if args.scheduler else {}),
            "class_sampling": args.class_sampling, "num_samples": args.num_samples, "seed": args.seed,
            **{k: v for k, v in guide_settings(args, pipeline, base).items() if k != "classifier"},
            "autoguide_weights": weights_digest(pipeline.weak_model),
            "x0_classifier_weights": weights_digest(pipeline.x0_classifier),
            "options": opts, "reference": reference, "features": features}


# -- the sweep -----------------------------------------------------------------------------------
def swept(args) -> tuple[str, list]:
    if args.sweep and args.scales:
        raise GuidedError("give either --scales or --sweep NAME=V1,V2, not both")
    if args.sweep:
        return parse_sweep(args.sweep)
    if not args.scales:
        raise GuidedError("give the values to sweep: --scales 0,1,2,4,10 (classifier guidance) or --sweep NAME=V1,V2 "
                          "(another option)")
    return "scale", list(dict.fromkeys(args.scales))


def make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only, a file in the way, no permission
        raise GuidedError(f"cannot use {out} as the sweep folder: {e.strerror or e}") from None


def reference_file(args, out: Path, settings: dict) -> Path:
    """The reference batch; for 'digits', built into OUT by guided.evaluation.reference_batch once."""
    if args.reference != "digits":
        return Path(args.reference)
    from guided.evaluation.reference_batch import build_reference, write_reference

    r = settings["reference"]
    path = out / f"reference_digits_{r['image_size']}px_{r['channels']}ch.npz"
    if not path.exists():
        images, labels = build_reference("digits", r["image_size"], r["num_samples"], channels=r["channels"],
                                         seed=r["seed"], progress=False)
        write_reference(path, images, labels)
    return path


def sweep(args) -> dict:
    param, values = swept(args)
    spec = SWEEPABLE[param]
    if param == "steps" and args.sampler is None:  # a swept sampler option keeps the paper's sampler
        args.sampler = "ddpm"
    if param == "eta" and args.sampler is None:  # eta is DDIM's
        args.sampler = "ddim"
    base_scale(args, param)
    request = options(args, args.scale)  # contradictory sampler options are refused before any loading
    if args.reference != "digits":  # a missing, empty or foreign reference is refused before any sampling
        if not Path(args.reference).exists():
            raise GuidedError(f"reference batch {args.reference} does not exist")
        NpzImages(args.reference)
    out = Path(args.out)
    make_folder(out)
    device, rank, world, barrier = processes(args.device)
    pipeline = load_pipeline(**pipeline_keywords(args, device, optional=swept_network(param)))
    classes = parse_classes(args.classes, pipeline)
    features = args.features or ("digits" if args.reference == "digits" else "inception")
    base = resolve(pipeline, request)  # the policy, once: every point's options derive from the same request
    settings = sweep_settings(args, param, pipeline, classes, features, base)
    claim(out, settings, args.overwrite, write=rank == 0)
    if barrier:
        barrier()
    extractor, reference = None, None
    if rank == 0:  # before any sampling: missing weights fail now, not after hours
        extractor = get_extractor(features, pipeline.image_shape()[1], args.inception_weights, device, args.dinov2_weights)
        reference = reference_file(args, out, settings)
    plan = SweepPlan(param, values, spec.options, request, classes, args.num_samples, args.batch_size,
                     [args.seed + j * args.num_samples for j in range(args.seeds)], args.class_sampling,
                     record={"model": args.model, "classifier": args.classifier})
    results = run_sweep(pipeline, plan, out, settings, extractor, reference, device=device, rank=rank, world=world,
                        barrier=barrier, plot=lambda o, r: plot_sweep(o / "sweep.png", r))
    if results:
        print(format_table(results))
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda a: sweep(a) and 0, args)


if __name__ == "__main__":
    sys.exit(main())
