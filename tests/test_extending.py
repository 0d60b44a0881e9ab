"""Extending guided from outside the package (docs: Extending guided): a sampler, a guidance term with a
network of its own and a model format, each defined here, sampled through the Python API and through
the command line's path with classifier guidance, and each checked against an exact oracle.

The recipes are the docs page's: `register(Sampler(...))` with `over_sigmas`, `register_term(TermKind(...))`
and `register_format(ModelFormat(...))`. Nothing inside guided/ is edited for any of them.
"""
import json
import math

import numpy as np
import pytest
import torch

from guided.cli.sample import main
from guided.diffusion.gaussian import create_diffusion
from guided.errors import GuidedError
from guided.generation import SampleOptions, load_pipeline, sample_batch
from guided.generation.loading import FORMATS, ModelFormat, register_format
from guided.guidance.terms import KINDS, TermKind, register_term
from guided.samplers.fewstep import over_sigmas
from guided.samplers.registry import SAMPLERS, Sampler, Setting, register
from mixture_nets import MEANS, VARS, MixtureClassifier, MixtureEps
from test_fewstep import K, SMAX, guided_denoiser, karras
from test_guidance_layer import ABAR, DIFF, pipeline


# -- recipe 1: a sampler -----------------------------------------------------------------------------
def euler_ancestral(denoise, sigmas, x, *, noise, after_step=None, callback=None, progress=False, eta=1.0):
    """Euler ancestral (k-diffusion's sample_euler_ancestral): an Euler step of the probability flow to
    sigma_down, then fresh noise of scale sigma_up, sigma_down^2 + sigma_up^2 = sigma_next^2."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        up = min(s_next, eta * math.sqrt(max(s_next**2 * (s**2 - s_next**2) / s**2, 0.0)))
        down = math.sqrt(s_next**2 - up**2)
        x = x + (x - d) / s * (down - s)
        if up > 0:
            x = x + up * noise.randn_like(x)
        if after_step is not None:
            x = after_step(len(sigmas) - 2 - i, x, s_next)
        if callback is not None:
            callback(i, x, d)
    return x


def setup_module():
    register(Sampler("euler-a", over_sigmas(euler_ancestral), settings=(Setting("eta", float, 1.0, 0.0, 1.0),),
                     default_clip="dynamic", help="Euler ancestral"))
    register_term(TermKind("energy", "gradient", energy_gradient, load=load_energy))
    register_format(ModelFormat("mixture", lambda path: str(path).endswith(".mixture.json"), load_mixture,
                                load_classifier=load_mixture_classifier))


def teardown_module():  # the other test modules see the package as it ships
    SAMPLERS.pop("euler-a")
    KINDS.pop("energy")
    FORMATS[:] = [f for f in FORMATS if f.name != "mixture"]


def test_the_sampler_is_euler_on_the_exact_flow_at_eta_0():
    """eta = 0 is Euler's method on the probability flow: first order against the closed-form flow of the
    guided mixture (tests/test_fewstep.py), its error halving with twice the levels."""
    x_T = torch.tensor([[3.0, -5.0], [-20.0, 40.0], [100.0, 0.0]], dtype=torch.float64)
    m, s = MEANS[K].double(), VARS[K].double()
    exact = m + (x_T - m) * torch.sqrt(s / (s + SMAX**2))
    err = [(euler_ancestral(guided_denoiser, karras(n), x_T, noise=None, eta=0.0) - exact).abs().max().item()
           for n in (40, 80)]
    assert err[1] < err[0] and err[0] / err[1] > 2 * 0.7, err


def test_the_sampler_runs_through_the_api_and_samples_the_guided_law():
    """Registered, it takes the guided denoiser and the levels like any built-in one: classifier guidance
    at scale 1 on the unconditional mixture samples component K (Euler ancestral is first order: its own
    bias is -19% of the variance at 60 levels, -10% at 120, measured with this test's 2,000 samples)."""
    p = pipeline(unconditional=True)
    o = SampleOptions(sampler="euler-a", steps="karras120", scale=1.0, clip="none", calibration=False)
    x = sample_batch(p, [K] * 2000, range(2000), o).flatten(1)
    assert torch.allclose(x.mean(0), MEANS[K], atol=0.015), x.mean(0)
    assert torch.allclose(x.var(0), VARS[K].expand(2), rtol=0.15), x.var(0)
    one = sample_batch(p, [K], [7], o)  # one generator per sample, as every sampler
    assert torch.allclose(one[0], sample_batch(p, [K] * 8, range(8), o)[7], atol=1e-5)
    with pytest.raises(GuidedError, match="must lie in"):  # its declared setting is checked
        sample_batch(p, [K], [0], SampleOptions(sampler="euler-a", steps="karras5", settings={"eta": 2}))


def test_the_sampler_runs_from_the_command_line_with_classifier_guidance(tmp_path):
    out = tmp_path / "euler"
    code = main(["--sampler", "euler-a", "--steps", "karras10", "--class", "3", "--scale", "2", "--num-samples", "2",
                 "--sampler-arg", "eta=0.5", "--grid", "0", "--out", str(out)])
    assert code == 0
    options = json.loads((out / "settings.json").read_text())["options"]
    assert (options["sampler"], options["settings"], options["scale"]) == ("euler-a", {"eta": 0.5}, 2.0)
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 3) and f["arr_0"].std() > 10


# -- recipe 2: a guidance term with its own network --------------------------------------------------
class Energy(torch.nn.Module):
    """E(x, t) = -log p(k | x_t, t) of the exact mixture classifier: its term must equal classifier guidance."""

    def __init__(self, k=K):
        super().__init__()
        self.classifier, self.k = MixtureClassifier(ABAR), k

    def forward(self, x, t):
        return -torch.log_softmax(self.classifier(x, t).float(), -1)[:, self.k]


class Quadratic(torch.nn.Module):
    """E(x) = |x - c|^2 / 2 toward a centre image c (the command-line example)."""

    def __init__(self, centre):
        super().__init__()
        self.register_buffer("centre", centre)

    def forward(self, x, t):
        return 0.5 * ((x - self.centre) ** 2).flatten(1).sum(1)


def energy_gradient(term, x, t, y, denoise):
    """-grad_x E(x_t, t): a gradient term whose network is an energy."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        return -torch.autograd.grad(term.network(x_in, t).sum(), x_in)[0]


def load_energy(path):
    return Quadratic(torch.load(path))


def test_the_term_equals_classifier_guidance_when_its_energy_is_the_classifiers():
    p = pipeline(unconditional=True)
    p.guides["energy"] = Energy()
    base = dict(sampler="ddim", steps="20", clip="none", calibration=False)
    mine = sample_batch(p, [K] * 64, range(64), SampleOptions(scale=0.0, terms={"energy": {"scale": 1.5}}, **base))
    theirs = sample_batch(p, [K] * 64, range(64), SampleOptions(scale=1.5, **base))
    assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()
    assert not torch.allclose(mine, sample_batch(p, [K] * 64, range(64), SampleOptions(scale=0.0, **base)), atol=1e-2)


def test_the_term_runs_from_the_command_line_beside_the_classifier(tmp_path):
    centre = tmp_path / "centre.pt"
    torch.save(torch.zeros(1, 16, 16), centre)
    runs = {}
    for name, extra in (("term", ["--guide", "energy=0.5", "--guide-network", f"energy={centre}"]),
                        ("neutral", ["--guide", "energy=0", "--guide-network", f"energy={centre}"]), ("plain", [])):
        out = tmp_path / name
        assert main(["--model", "uncond", "--class", "3", "--scale", "1", "--num-samples", "2", "--steps", "karras8",
                     "--grid", "0", "--out", str(out), *extra]) == 0
        runs[name] = np.load(out / "samples.npz")["arr_0"].astype(int)
    settings = json.loads((tmp_path / "term" / "settings.json").read_text())
    assert settings["options"]["terms"] == {"energy": {"scale": 0.5, "interval": None, "schedule": "constant"}}
    assert settings["guide_networks"] == {"energy": str(centre)} and settings["options"]["scale"] == 1.0
    assert np.array_equal(runs["neutral"], runs["plain"])  # scale 0 is off
    assert np.abs(runs["term"] - runs["plain"]).mean() > 1  # the term acts beside the classifier


def test_a_term_without_its_network_or_an_unknown_one_is_one_line(tmp_path, capsys):
    assert main(["--guide", "energy=1", "--num-samples", "1", "--out", str(tmp_path / "a")]) == 2
    assert "--guide energy needs its network: --guide-network energy=PATH" in capsys.readouterr().err
    assert main(["--guide", "nothing=1", "--num-samples", "1", "--out", str(tmp_path / "b")]) == 2
    assert "no registered guidance term of that name" in capsys.readouterr().err


# -- recipe 3: a model format ------------------------------------------------------------------------
def mixture_spec(path):
    spec = json.loads(open(path).read())
    return {k: torch.tensor(spec[k]) for k in ("means", "variances", "weights")}, spec["schedule"]


def load_mixture(path, scheduler=None):
    """(network, diffusion config, label map, Pipeline keywords) of a *.mixture.json file."""
    from guided.config import DiffusionConfig, SamplingConfig, node

    params, schedule = mixture_spec(path)
    diffusion = node(DiffusionConfig, dict(noise_schedule=schedule, variance="fixed_small"))
    abar = create_diffusion(diffusion, "").alphas_cumprod
    return MixtureEps(abar, **params), diffusion, None, {"defaults": SamplingConfig(sampler="ddim", steps="25")}


def load_mixture_classifier(path):
    from guided.config import DiffusionConfig, node

    params, schedule = mixture_spec(path)
    abar = create_diffusion(node(DiffusionConfig, dict(noise_schedule=schedule)), "").alphas_cumprod
    return MixtureClassifier(abar, **params)


@pytest.fixture
def mixture_file(tmp_path):
    path = tmp_path / "toy.mixture.json"
    path.write_text(json.dumps({"means": [[0.6, -0.4, 0.2], [-0.5, 0.5, -0.3]], "variances": [0.04, 0.02],
                                "weights": [0.5, 0.5], "schedule": "cosine"}))
    return path


def test_the_format_loads_and_samples_the_guided_law_through_the_api(mixture_file):
    p = load_pipeline(str(mixture_file), classifier=str(mixture_file))
    assert p.shape() == (3, 1, 1) and p.defaults.sampler == "ddim"  # its own sampling defaults
    n, o = 1500, SampleOptions(sampler="dpm++2m-sde", steps="karras40", scale=1.0, clip="none", calibration=False)
    p.unconditional = True  # sample the mixture's null class, guided by the classifier alone
    x = sample_batch(p, [1] * n, range(n), o).flatten(1)
    assert torch.allclose(x.mean(0), torch.tensor([-0.5, 0.5, -0.3]), atol=0.015), x.mean(0)
    assert torch.allclose(x.var(0), torch.full((3,), 0.02), rtol=0.15), x.var(0)


def test_the_format_runs_from_the_command_line_with_classifier_guidance(mixture_file, tmp_path):
    out = tmp_path / "toy"
    assert main(["--model", str(mixture_file), "--classifier", str(mixture_file), "--class", "1", "--scale", "1",
                 "--num-samples", "4", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["options"]["sampler"], settings["options"]["steps"]) == ("ddim", "25")  # the format's defaults
    assert settings["classifier"] == str(mixture_file)
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 1, 1, 3)
