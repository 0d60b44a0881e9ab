"""Training recipes (guided.diffusion.recipes), the post-hoc EMA and the classifier's progress signals,
each against its formula computed here from the papers' definitions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from guided.config import ObjectiveConfig, load_config, node, saved_config
from guided.diffusion.gaussian import create_diffusion
from guided.diffusion.losses import LogNormalSampler, training_losses
from guided.errors import GuidedError
from guided.networks.unet import UNetModel
from guided.training import posthoc_ema as ph
from guided.diffusion import recipes
from guided.networks import preconditioned

from conftest import TINY_UNET


def tiny_cfg(*extra):
    return load_config(None, TINY_UNET + ["model.dropout=0.0", "model.learn_sigma=false",
                                          "diffusion.variance=fixed_small", *extra])


def chain(cfg):
    abar = create_diffusion(cfg.diffusion, "").alphas_cumprod
    return abar, (1 - abar) / abar  # abar_t and sigma_t^2


def test_weightings_follow_their_papers():
    cfg = tiny_cfg("train.objective.min_snr_gamma=5", "train.objective.sigma_data=0.5")
    abar, sigma2 = chain(cfg)
    snr = abar / (1 - abar)  # SNR_t = alpha_t^2 / sigma_t^2 of the VP chain
    o = cfg.train.objective
    o.weighting = "uniform"
    assert recipes.loss_weights(o, abar) is None
    o.weighting = "min_snr"  # Hang et al.: min(SNR, gamma) / SNR for an eps-prediction loss
    assert torch.allclose(recipes.loss_weights(o, abar).double(), torch.minimum(snr, torch.tensor(5.0)) / snr,
                          rtol=1e-5)
    o.weighting = "edm"  # Karras et al. Table 1: lambda = (s^2 + s_d^2) / (s s_d)^2 on ||D - x0||^2 = s^2 ||eps err||^2
    lam = (sigma2 + 0.25) / (sigma2 * 0.25)
    assert torch.allclose(recipes.loss_weights(o, abar).double(), lam * sigma2, rtol=1e-5)


def test_bad_recipe_values_are_one_line_errors():
    for bad, match in (("weighting=snr", "weighting must be one of"), ("prediction=score", "prediction"),
                       ("min_snr_gamma=0", "min_snr_gamma"), ("sigma_data=-1", "sigma_data")):
        cfg = tiny_cfg(f"train.objective.{bad}")
        with pytest.raises(GuidedError, match=match) as e:
            recipes.loss_weights(cfg.train.objective, chain(cfg)[0])
        assert "\n" not in str(e.value)
    with pytest.raises(GuidedError, match="lognormal_std"):
        LogNormalSampler(torch.tensor([0.1, 1.0]), -1.2, 0.0)


def reference_eps(prediction, F, x_t, abar, sd=0.5):
    """eps from the raw output F, written from each target's definition (not from recipes' table)."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction == "eps":
        return F
    if prediction == "x0":  # x_t = a x0 + s eps
        return (x_t - a * F) / s
    if prediction == "v":  # v = a eps - s x0 (Salimans & Ho), so eps = a v + s x_t
        return a * F + s * x_t
    sigma = s / a  # EDM: D = c_skip x + c_out F with x = x_t / a, eps = (x - D) / sigma
    x = x_t / a
    D = sd**2 / (sigma**2 + sd**2) * x + sigma * sd / (sigma**2 + sd**2).sqrt() * F
    return (x - D) / sigma


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_preconditioned_unet_returns_eps_of_its_target(prediction):
    cfg = tiny_cfg(f"train.objective.prediction={prediction}")
    torch.manual_seed(0)
    net = preconditioned.PreconditionedUNet(cfg.model, cfg.diffusion, cfg.train.objective).eval()
    for p in net.out.parameters():  # the U-Net's last layer starts at zero: give it an output
        torch.nn.init.normal_(p, std=0.3)
    plain = UNetModel(cfg.model).eval()
    plain.load_state_dict(net.state_dict())  # the same parameters under the same names
    abar_all, _ = chain(cfg)
    t = torch.tensor([0, 10, 50, 99])
    abar = abar_all[t].float().view(-1, 1, 1, 1)
    x_t = torch.randn(4, 3, 8, 8)
    sd = 0.5
    sigma = ((1 - abar) / abar).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt() / abar.sqrt() if prediction == "edm" else torch.ones_like(abar)
    y = torch.arange(4)
    with torch.no_grad():
        F = plain(x_t * c_in, t, y)
        got = net(x_t, t, y)
    want = reference_eps(prediction, F, x_t, abar, sd)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


def test_edm_recipe_loss_is_edm_eq8_on_F():
    """weighting=edm on the eps-MSE of the preconditioned network = ||F - F_target||^2 with unit weight,
    F_target = (x0 - c_skip x) / c_out (EDM eq. 8)."""
    cfg = tiny_cfg("train.objective.prediction=edm", "train.objective.weighting=edm")
    torch.manual_seed(1)
    net = preconditioned.PreconditionedUNet(cfg.model, cfg.diffusion, cfg.train.objective)
    for p in net.out.parameters():
        torch.nn.init.normal_(p, std=0.3)
    diffusion = create_diffusion(cfg.diffusion, "")
    weights = recipes.loss_weights(cfg.train.objective, diffusion.alphas_cumprod)
    x0, noise, t, y = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8), torch.tensor([3, 20, 40, 70]), torch.arange(4)
    with torch.no_grad():
        terms = training_losses(diffusion, lambda x, s: net(x, s, y), x0, t, noise, mse_weight=weights[t])
        abar = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        sigma, sd = ((1 - abar) / abar).sqrt(), 0.5
        x = x0 + sigma * noise  # x_t / sqrt(abar)
        root = (sigma**2 + sd**2).sqrt()
        F = UNetModel.forward(net, x / root, t, y)
        target = (x0 - sd**2 / root**2 * x) / (sigma * sd / root)
    assert torch.allclose(terms["loss"], ((F - target) ** 2).mean(dim=(1, 2, 3)), rtol=1e-3)


def test_lognormal_timesteps_are_nearest_to_lognormal_sigmas():
    cfg = tiny_cfg()
    abar, sigma2 = chain(cfg)
    sampler = LogNormalSampler(sigma2.sqrt(), -1.2, 1.2)
    gen = torch.Generator().manual_seed(0)
    t, w = sampler.sample(200_000, "cpu", generator=gen)
    assert torch.all(w == 1)
    ln_sigma = torch.randn(200_000, generator=gen, dtype=torch.float64) * 1.2 - 1.2  # EDM: ln s ~ N(P_mean, P_std^2)
    nearest = (ln_sigma[:, None] - sigma2.sqrt().log()[None, :]).abs().argmin(dim=1)
    n = len(abar)
    got, want = torch.bincount(t, minlength=n).double(), torch.bincount(nearest, minlength=n).double()
    assert (got - want).abs().max() < 5 * want.max().sqrt() + 10


def test_paper_recipe_is_the_default_and_old_configs_load_unchanged():
    o = node(ObjectiveConfig)
    assert (o.weighting, o.prediction, o.schedule_sampler) == ("uniform", "eps", "uniform")
    old = "model:\n  num_classes: 10\ntrain:\n  objective: eps\n  schedule_sampler: uniform\n  probe_every: 5\n"
    cfg = saved_config(old)  # a config written before the recipes (and before train.objective was a node)
    assert cfg.train.objective.name == "eps" and cfg.train.objective.weighting == "uniform"
    assert type(preconditioned.build_unet(cfg)) is UNetModel  # the paper's arithmetic, no wrapper


def test_shipped_checkpoint_loads_as_the_plain_unet_with_its_outputs():
    from guided.networks.checkpoints import load_trained, resolve_trained

    net, cfg, _ = load_trained("guided/assets/digits/cond.pt")
    assert type(net) is UNetModel and cfg.train.objective.prediction == "eps"
    w = resolve_trained("guided/assets/digits/cond.pt")[0]
    direct = UNetModel(cfg.model).eval()
    direct.load_state_dict({k: v.float() for k, v in w["state_dict"].items()})
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 900]), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(net(x, t, y), direct(x, t, y))


# -- post-hoc EMA -----------------------------------------------------------------------------
def test_sigma_rel_and_gamma_invert_each_other():
    for s in (0.01, 0.05, 0.1, 0.2):
        g = ph.gamma_of(s)
        assert ph.sigma_rel_of(g) == pytest.approx(s, rel=1e-9)
    with pytest.raises(GuidedError, match="sigma_rels"):
        ph.gamma_of(0.3)


def toy_run(steps=400, dim=6, seed=0):
    """Parameters after each step of a toy run: a noisy walk toward a target."""
    g = torch.Generator().manual_seed(seed)
    theta, target, out = torch.zeros(dim), torch.randn(dim, generator=g), []
    for _ in range(steps):
        theta = theta + 0.02 * (target - theta) + 0.05 * torch.randn(dim, generator=g)
        out.append(theta.clone())
    return torch.stack(out).double()


def direct_average(thetas, gamma):
    """The power-function EMA written as the weighted average it is: weight (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)."""
    t = len(thetas)
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    w = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
    return (w[:, None] * thetas).sum(0)


def run_power_ema(thetas, sigma_rels, every, tmp_path):
    net = torch.nn.Linear(thetas.shape[1], 1, bias=False)
    ema = ph.PowerEMA(net, sigma_rels)
    for step, theta in enumerate(thetas):
        with torch.no_grad():
            net.weight.copy_(theta.float()[None])
        ema.update(torch.tensor(True), step)
        if (step + 1) % every == 0:
            ema.snapshot(tmp_path, step + 1)
    return ema


def test_power_ema_is_the_direct_weighted_average(tmp_path):
    thetas = toy_run()
    ema = run_power_ema(thetas, [0.05, 0.15], 100, tmp_path)
    for g, avg in zip(ema.gammas, ema.averages):
        assert torch.allclose(avg[0][0].double(), direct_average(thetas, g), atol=1e-5)


def test_posthoc_reconstruction_matches_direct_averaging(tmp_path):
    thetas = toy_run(steps=800)
    run_power_ema(thetas, [0.05, 0.10], 50, tmp_path)
    for sigma_rel, step in ((0.07, 800), (0.13, 600), (0.05, 800)):
        got, x = ph.reconstruct(tmp_path, sigma_rel, step)
        want = direct_average(thetas[:step], ph.gamma_of(sigma_rel))
        err = (got["weight"][0].double() - want).abs().max()
        spread = (direct_average(thetas[:step], ph.gamma_of(0.05)) - direct_average(thetas[:step], ph.gamma_of(0.1))).abs().max()
        assert err < 0.05 * spread + 1e-4, (sigma_rel, step, err, spread)
        assert sum(x) == pytest.approx(1.0, abs=0.02)


def test_trainer_keeps_posthoc_snapshots_that_resume_and_export(tiny, tmp_path):
    from guided.networks.checkpoints import load_trained
    from guided.training.diffusion import train_diffusion

    extra = ("train.steps=6", "train.save_every=100", "train.posthoc_ema.sigma_rels=[0.05,0.1]",
             "train.posthoc_ema.every=2", "train.objective.weighting=min_snr", "train.objective.prediction=v")
    whole = train_diffusion(tiny("diffusion", *extra))
    cut = tiny("diffusion", *extra)
    assert train_diffusion(cut, stop_after=3).status == "stopped"
    resumed = train_diffusion(cut, resume=True)
    a, b = whole.trainer.phema.averages, resumed.trainer.phema.averages
    assert all(torch.equal(x, y) for u, v in zip(a, b) for x, y in zip(u, v))
    assert [s["step"] for s in ph.snapshots(cut.train.out_dir)] == [2, 4, 6]
    out = ph.export_posthoc(cut.train.out_dir, 0.08, tmp_path / "phema.pt")
    net, cfg, _ = load_trained(out)
    assert type(net) is preconditioned.PreconditionedUNet and cfg.train.objective.prediction == "v"
    with pytest.raises(GuidedError, match="sigma_rels"):
        train_diffusion(tiny("diffusion", "train.posthoc_ema.sigma_rels=[0.5]"))


# -- the classifier's progress signals --------------------------------------------------------
def test_done_signal_on_synthetic_curves():
    from guided.training.progress import done_index

    rising = [[0.1 * i, 0.05 * i] for i in range(10)]  # every band still gains 5-10 points an evaluation
    assert done_index(rising, margin=0.005, window=3) is None
    # band 0 flattens from evaluation 4 on, band 1 from evaluation 6 on (gains 0.001 < margin after)
    curve = [[min(0.1 * i, 0.4) + 0.001 * i, min(0.1 * i, 0.6) + 0.001 * i] for i in range(12)]
    # done at the first i with max over (i-2..i) - max over (..i-3) <= 0.005 in both bands: i - 3 >= 6
    assert done_index(curve, margin=0.005, window=3) == 9
    assert done_index(curve, margin=0.005, window=0) is None
    # gains of 1 point per evaluation around 50%: progress for a margin of 0.5 points, but under the
    # binomial standard error of 100 images per band (5 points), not evidence of progress
    slow = [[0.5 + 0.01 * i] for i in range(8)]
    assert done_index(slow, margin=0.005, window=3) is None
    se = math.sqrt(0.5 * 0.5 / 100)
    assert se == pytest.approx(0.05) and done_index(slow, margin=0.005, window=3, n=100) == 3


def test_diverging_signals_on_synthetic_curves():
    from guided.training.progress import accuracy_diverging, loss_diverging

    falling = [1.0 / (1 + 0.1 * i) for i in range(20)]
    assert not loss_diverging(falling)
    assert loss_diverging(falling + [0.9] * 5)  # the last five average far above the five before
    assert loss_diverging([0.5, float("nan")])
    assert not accuracy_diverging([0.2, 0.5, 0.7, 0.69, 0.71])  # noise around the best
    assert accuracy_diverging([0.2, 0.5, 0.7, 0.6, 0.55])  # two evaluations in a row 10+ points below


def test_progress_says_done_once_and_warns_once(capsys):
    from guided.training.progress import Progress

    said = []
    p = Progress()
    for step, acc in enumerate([0.1, 0.5, 0.8, 0.8, 0.8, 0.8, 0.8]):
        p.see_eval(step, [acc], [0.0], acc, 0.005, 3, said.append)
    assert [s for s in said if s.startswith("done")] == [said[0]] and p.done_step == 5
    for i, loss in enumerate([1.0] * 10 + [2.0] * 10):
        p.see_loss(i, loss, said.append)
    assert sum("rising" in s for s in said) == 1


def test_classifier_logs_accuracy_and_ece_per_band_and_plots(tiny):
    from guided.training.classifier import train_classifier

    cfg = tiny("classifier", "train.eval.every=2", "train.eval.bands=5", "train.eval.done_window=1",
               "train.eval.done_margin=1.0")
    r = train_classifier(cfg)
    ev = r.trainer.last_eval
    assert {f"val_acc@1_b{b}" for b in range(5)} <= ev.keys() and {f"val_ece_b{b}" for b in range(5)} <= ev.keys()
    assert ev["val_band_edges"] == [0, 20, 40, 60, 80, 100]
    assert all(0 <= ev[f"val_ece_b{b}"] <= 1 for b in range(5))
    out = Path(cfg.train.out_dir)
    assert (out / "accuracy_by_t.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["done_step"] for r in rows if "done_step" in r] == [4]  # evaluation 1 (step 4) is the first i >= window
