"""The public Python API as the Python API page (docs/reference/index.md) shows it, and the sampler
registry's traits."""
import re

import pytest
import torch

from guided.diffusion.models import EpsModel, LadderModel
from guided.diffusion.objectives import adapt
from guided.errors import GuidedError
from guided.generation import SampleOptions, load_pipeline, sample_batch
from guided.generation.options import METHODS
from guided.samplers.levels import make_levels
from guided.samplers.registry import SAMPLERS, sampler_for


@pytest.fixture(scope="module")
def uncond():
    torch.set_num_threads(1)
    return load_pipeline("uncond", device="cpu")


def test_readme_example_draws_guided_digits_independent_of_batch(uncond):
    opts = SampleOptions(sampler="ddim", steps="10", scale=4.0, interval=(0.28, 5.42), clip_guided=True)
    x = sample_batch(uncond, labels=[7, 3], seeds=[5, 6], opts=opts)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1
    alone = sample_batch(uncond, labels=[3], seeds=[6], opts=opts)  # sample i depends on its seed only
    assert torch.allclose(alone[0], x[1], atol=1e-3)  # float rounding of batched kernels (issue 21 item 8)


def test_the_pipeline_adapts_its_network_once(uncond):
    m = uncond.score_model
    assert isinstance(m, EpsModel) and m.process("10") is m.process("10")  # respacings built once
    t = torch.tensor([0, 500, 999])
    abar = m.base.alphas_cumprod[t]
    assert torch.allclose(m.sigma_of(t).double(), ((1 - abar) / abar).sqrt(), rtol=1e-5)
    assert m.sigma_range[0] < m.sigma_range[1]


def test_each_sampler_serves_the_model_kinds_its_entry_names():
    eps, ladder = adapt(uncond_cfg()), adapt(None, "ncsn", torch.tensor([2.0, 0.5, 0.1]))
    assert isinstance(ladder, LadderModel)
    for name, spec in SAMPLERS.items():
        for model in (eps, ladder):
            if model.kind in spec.kinds:
                assert sampler_for(name, model.kind) is spec
            else:
                with pytest.raises(GuidedError, match=re.escape(name) if model.kind == "score" else "NCSN"):
                    sampler_for(name, model.kind)
    with pytest.raises(GuidedError, match="unknown sampler"):
        sampler_for("euler", eps.kind)


def test_fixed_and_adaptive_steps_are_made_into_levels_in_one_place():
    eps = adapt(uncond_cfg())
    assert make_levels(eps, "adaptive", "adaptive").sigmas == []  # ode chooses its own
    pc = make_levels(eps, "sde", "30", "pc")
    assert pc.count == 30 and len(pc.times) == 30 and pc.times[0] == eps.sde.T
    chain = make_levels(eps, "chain", "karras10")
    assert len(chain.sigmas) == 11 and chain.sigmas[-1] == 0 and chain.sigmas == sorted(chain.sigmas, reverse=True)
    with pytest.raises(GuidedError, match="plain step count"):
        make_levels(eps, "sde", "quad25", "pc")
    with pytest.raises(GuidedError, match="respacing"):
        make_levels(eps, "chain", "quadx")


def test_guidance_methods_are_one_table():
    fields = {f for m in METHODS for f in (m.scale, m.interval)}
    assert len(fields) == 2 * len(METHODS) and all(hasattr(SampleOptions(), f) for f in fields)
    assert all(getattr(SampleOptions(), m.scale) == m.off for m in METHODS)  # every method off by default


def uncond_cfg():
    from guided.config import DiffusionConfig, node
    return node(DiffusionConfig, {"steps": 100, "noise_schedule": "cosine"})


def test_no_sampler_keeps_an_autograd_graph(uncond):
    """Samplers run without autograd (guidance takes its own gradients): a graph would hold every step's
    activations in memory."""
    for name, spec in SAMPLERS.items():
        if "eps" not in spec.kinds or spec.adaptive:
            continue
        steps = "30" if spec.levels == "sde" else "4"
        x = sample_batch(uncond, [1], [0], SampleOptions(sampler=name, steps=steps, scale=2.0))
        assert not x.requires_grad, name
