"""Check the project against numbers produced by the paper's released code.

Each file (format: ../shared/conformance/README.md) holds flags, weights,
inputs and reference outputs of one kind: `unet`, `classifier`, `schedule` or
`guided`. The networks are rebuilt from the file's flags with the project's
own code, every stored output is recomputed (`check_file`), and each
relative error ||ours - ref|| / ||ref|| is a `Row` with its tolerance (1e-4;
1e-3 for the full DDIM loop); `format_table` lays them out. The command line
is guided.cli.conformance.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from guided.networks import adm
from guided.diffusion.gaussian import create_diffusion
from guided.errors import GuidedError
from guided.guidance.terms import classifier_cond_fn, classifier_grad
from guided.diffusion.losses import training_losses
from guided.samplers.discrete import condition_mean, condition_score, ddim, guided_p_mean_variance

TOL, LOOP_TOL = 1e-4, 1e-3
METADATA = {"kind", "case", "description", "notes", "seed", "reference", "reference_commit", "torch_version"}


@dataclass
class Row:
    file: str
    quantity: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tol  # NaN fails


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = torch.as_tensor(ours).double().cpu(), torch.as_tensor(ref).double().cpu()
    if ours.shape != ref.shape:
        return float("inf")
    den = ref.norm()
    diff = (ours - ref).norm()
    return float(diff / den) if den > 0 else float(diff)


def _check_keys(d: dict, known: set[str], name: str):
    for key in d:
        if key in known or key in METADATA:
            continue
        if key in adm.ALL_FLAGS:
            raise GuidedError(f"{name}: flag {key!r} is not honoured by the {d['kind']} check")
        raise GuidedError(f"{name}: unknown entry {key!r} in a {d['kind']!r} file")


def _flags(flags: dict, name: str) -> dict:
    if adm.parse_flags(flags).get("use_fp16") or adm.parse_flags(flags).get("classifier_use_fp16"):
        raise GuidedError(f"{name}: use_fp16 True cannot be checked in float32")
    return flags


def _unet(flags, state_dict, name):
    model = adm.create_model(_flags(flags, name))
    return adm.load_state_dict_strict(model, state_dict, f"{name} unet state dict").eval()


def _classifier(flags, state_dict, name):
    model = adm.create_classifier(_flags(flags, name))
    return adm.load_state_dict_strict(model, state_dict, f"{name} classifier state dict").eval()


def check_unet(d, name):
    _check_keys(d, {"flags", "state_dict", "x", "t", "y", "out"}, name)
    model = _unet(d["flags"], d["state_dict"], name)
    y = d.get("y") if model.num_classes is not None else None
    with torch.no_grad():
        out = model(d["x"], d["t"], y=y)
    return [Row(name, "out", rel_error(out, d["out"]), TOL)]


def check_classifier(d, name):
    _check_keys(d, {"flags", "state_dict", "x", "t", "y", "logits", "grad_log_prob"}, name)
    model = _classifier(d["flags"], d["state_dict"], name)
    with torch.no_grad():
        logits = model(d["x"], d["t"])
    rows = [Row(name, "logits", rel_error(logits, d["logits"]), TOL)]
    if "grad_log_prob" in d:
        grad = classifier_grad(model, d["x"], d["t"], d["y"])
        rows.append(Row(name, "grad_log_prob", rel_error(grad, d["grad_log_prob"]), TOL))
    return rows


SCHEDULE_FLAGS = ("noise_schedule", "diffusion_steps", "timestep_respacing", "learn_sigma", "sigma_small",
                  "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas")


def _diffusion(d, extra=None, respacing=None):
    flags = {k: d[k] for k in SCHEDULE_FLAGS if k in d}
    flags.update(extra or {})
    return create_diffusion(adm.diffusion_config(flags), respacing)


def check_schedule(d, name):
    arrays = ("betas", "alphas_cumprod", "timestep_map", "posterior_variance", "posterior_log_variance_clipped")
    _check_keys(d, set(SCHEDULE_FLAGS) | set(arrays), name)
    diff = _diffusion(d)
    rows = []
    for key in arrays:
        if key in d:
            ours = getattr(diff, key)
            rows.append(Row(name, key, rel_error(ours, d[key]) if ours.shape == d[key].shape else float("inf"), TOL))
    return rows


GUIDED_KEYS = {
    "unet_flags", "unet_state_dict", "classifier_flags", "classifier_state_dict", "classifier_scale", "y",
    "clip_denoised", "step_x", "step_index", "step_timestep", "p_mean", "p_variance", "p_log_variance",
    "p_pred_xstart", "condition_mean", "condition_score_mean", "condition_score_pred_xstart", "ddim_x_T", "ddim_eta",
    "ddim_clip_denoised", "ddim_sample", "ddim_sample_unguided", "loss_x_start", "loss_noise", "loss_t", "loss",
    "loss_mse", "loss_vb",
}


def check_guided(d, name):
    _check_keys(d, GUIDED_KEYS | set(SCHEDULE_FLAGS), name)
    model = _unet(d["unet_flags"], d["unet_state_dict"], name)
    classifier = _classifier(d["classifier_flags"], d["classifier_state_dict"], name)
    extra = {k: v for k, v in d["unet_flags"].items() if k in SCHEDULE_FLAGS}
    diff = _diffusion(d, extra)
    y = d["y"] if model.num_classes is not None else None
    model_fn = lambda x, t: model(x, t, y=y)  # noqa: E731
    cond_fn = classifier_cond_fn(classifier, d["y"], float(d["classifier_scale"]))
    rows = []
    if "step_x" in d:
        x, i = d["step_x"], int(d["step_index"][0])
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        rows.append(Row(name, "step_timestep", rel_error(diff.model_t(t), d["step_timestep"]), 0.0))
        with torch.no_grad():
            out, _ = guided_p_mean_variance(diff, model_fn, x, i, clip_denoised=bool(d.get("clip_denoised", True)))
        grad = cond_fn(x, diff.model_t(t))
        ours = {"p_mean": out["mean"], "p_variance": out["variance"], "p_log_variance": out["log_variance"],
                "p_pred_xstart": out["pred_xstart"], "condition_mean": condition_mean(out, grad)}
        scored = condition_score(diff, out, x, t, grad)
        ours["condition_score_mean"], ours["condition_score_pred_xstart"] = scored["mean"], scored["pred_xstart"]
        rows += [Row(name, k, rel_error(v.expand_as(d[k]), d[k]), TOL) for k, v in ours.items() if k in d]
    if "ddim_x_T" in d:
        kw = dict(eta=float(d.get("ddim_eta", 0.0)), clip_denoised=bool(d.get("ddim_clip_denoised", False)))
        gen = torch.Generator().manual_seed(0)
        noise = _GenNoise(gen)
        for key, cf in (("ddim_sample", cond_fn), ("ddim_sample_unguided", None)):
            if key in d:
                ours = ddim(diff, model_fn, d["ddim_x_T"], cond_fn=cf, noise=noise, **kw)
                rows.append(Row(name, key, rel_error(ours, d[key]), LOOP_TOL))
    if "loss_x_start" in d:
        base = _diffusion(d, extra, respacing="")
        with torch.no_grad():
            terms = training_losses(base, model, d["loss_x_start"], d["loss_t"], d["loss_noise"],
                                    model_kwargs={"y": y} if y is not None else None)
        for key, term in (("loss", "loss"), ("loss_mse", "mse"), ("loss_vb", "vb")):
            if key in d:
                rows.append(Row(name, key, rel_error(terms[term], d[key]) if term in terms else float("inf"), TOL))
    return rows


class _GenNoise:
    def __init__(self, gen):
        self.gen = gen

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.gen, dtype=x.dtype)


CHECKS = {"unet": check_unet, "classifier": check_classifier, "schedule": check_schedule, "guided": check_guided}


def check_file(path: str | Path) -> list[Row]:
    path = Path(path)
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GuidedError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise GuidedError(f"{path}: not a readable conformance file ({type(e).__name__})") from None
    if not isinstance(d, dict) or "kind" not in d:
        raise GuidedError(f"{path}: not a conformance file (no 'kind' entry)")
    if d["kind"] not in CHECKS:
        raise GuidedError(f"{path}: unknown kind {d['kind']!r}; this runner checks {', '.join(CHECKS)}")
    return CHECKS[d["kind"]](d, path.name)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'file':<28} {'quantity':<30} {'rel. error':>11} {'tol':>8}  ok"]
    for r in rows:
        lines.append(f"{r.file:<28} {r.quantity:<30} {r.error:>11.3e} {r.tol:>8.0e}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)
