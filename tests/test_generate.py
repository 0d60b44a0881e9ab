"""The guided-generation library: seeds, batches, npz layout, resume, refusals."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from guided.config import ClassifierConfig, DiffusionConfig, UNetConfig, node
from guided.errors import GuidedError
from guided.generation import Pipeline, SampleOptions, generate, sample_batch
from guided.locks import OutputLock
from guided.samplers.discrete import SampleNoise
from guided.networks.unet import EncoderUNetModel, UNetModel


def tiny_pipeline(image_size=8, classifier_size=8, num_classes=3):
    torch.manual_seed(0)
    m = UNetModel(node(UNetConfig, dict(image_size=image_size, model_channels=32, num_res_blocks=1,
                                        channel_mult=[1, 2], attention_resolutions=[4], learn_sigma=True)))
    c = EncoderUNetModel(node(ClassifierConfig, dict(image_size=classifier_size, model_channels=32, num_res_blocks=1,
                                                     channel_mult=[1, 2], attention_resolutions=[4],
                                                     num_head_channels=16, num_classes=num_classes, pool="adaptive")))
    with torch.no_grad():  # random, non-zero output layers so every path shows
        for net in (m, c):
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    d = node(DiffusionConfig, dict(variance="learned_range", noise_schedule="cosine"))
    return Pipeline(m.eval(), d, c.eval())


OPTS = SampleOptions(sampler="ddim", steps="5", scale=0.0)


def test_same_seed_same_images_whatever_the_batch(tmp_path):
    p = tiny_pipeline()
    a = generate(p, tmp_path / "a", classes=[0, 1, 2], num_samples=5, batch_size=5, seed=7, opts=OPTS)
    b = generate(p, tmp_path / "b", classes=[0, 1, 2], num_samples=5, batch_size=2, seed=7, opts=OPTS)
    with np.load(a) as x, np.load(b) as y:
        assert np.array_equal(x["arr_0"], y["arr_0"]) and np.array_equal(x["arr_1"], y["arr_1"])


def test_npz_layout_grid_and_settings(tmp_path):
    path = generate(tiny_pipeline(), tmp_path, classes=[2, 0], num_samples=4, batch_size=3, seed=0, opts=OPTS,
                    save_pngs=True)
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (4, 8, 8, 3)
        assert f["arr_1"].tolist() == [2, 0, 2, 0]
    assert (tmp_path / "grid.png").stat().st_size > 0 and len(list((tmp_path / "images").glob("*.png"))) == 4
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["seed"] == 0 and settings["options"]["sampler"] == "ddim"
    assert not (tmp_path / "parts").exists()


def test_guidance_moves_samples_towards_the_class():
    p = tiny_pipeline()
    y, seeds = [1] * 6, list(range(6))

    def logp(scale):
        x = sample_batch(p, y, seeds, SampleOptions(sampler="ddpm", steps="8", scale=scale))
        with torch.no_grad():
            return torch.log_softmax(p.classifier(x, torch.zeros(6, dtype=torch.long)), -1)[:, 1].mean().item()

    assert logp(50.0) > logp(0.0)


def test_refuses_to_overwrite_and_resumes_finished_batches(tmp_path):
    p = tiny_pipeline()
    generate(p, tmp_path, classes=[0], num_samples=2, batch_size=1, seed=0, opts=OPTS)
    with pytest.raises(GuidedError, match="already holds samples.npz; pass --overwrite"):
        generate(p, tmp_path, classes=[0], num_samples=2, batch_size=1, seed=0, opts=OPTS)
    first = np.load(tmp_path / "samples.npz")["arr_0"]
    # an interrupted run: one finished batch left in parts/, resumed with the same settings
    out = tmp_path / "resume"
    calls = []
    import guided.generation.writer as gen
    real = gen.sample_batch
    gen.sample_batch = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        generate(p, out, classes=[0], num_samples=2, batch_size=1, seed=0, opts=OPTS)
        (out / "samples.npz").unlink()
        (out / "parts").mkdir()
        np.savez(out / "parts" / "batch-00000000.npz", first[:1], np.array([0]))
        calls.clear()
        generate(p, out, classes=[0], num_samples=2, batch_size=1, seed=0, opts=OPTS)
    finally:
        gen.sample_batch = real
    assert len(calls) == 1  # only the missing batch was drawn
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], first)


def test_lock_keeps_two_runs_apart(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(GuidedError, match="in use by another run"):
            with OutputLock(tmp_path):
                pass
    with OutputLock(tmp_path):  # released
        pass


def test_mismatched_resolution_is_refused():
    with pytest.raises(GuidedError, match="classifier takes 16x16x3 images but the score model makes 8x8x3"):
        tiny_pipeline(image_size=8, classifier_size=16)


@pytest.mark.parametrize("kw, message", [
    (dict(classes=[5]), "outside the model's 3 classes"),
    (dict(num_samples=0), "must be positive"),
])
def test_bad_requests(tmp_path, kw, message):
    args = dict(classes=[0], num_samples=1, batch_size=1, seed=0, opts=OPTS)
    with pytest.raises(GuidedError, match=message):
        generate(tiny_pipeline(), tmp_path, **{**args, **kw})


def test_sdedit_mask_keeps_the_outside(tmp_path):
    p = tiny_pipeline()
    guide = torch.rand(3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    x = sample_batch(p, [0, 1], [0, 1], SampleOptions(sampler="ddpm", steps="10"),
                     init={"image": guide, "t0": 0.6, "mask": mask})
    assert torch.allclose(x[:, :, 4:], guide[:, 4:].expand(2, 3, 4, 8), atol=1e-6)
    assert not torch.allclose(x[:, :, :4], guide[:, :4].expand(2, 3, 4, 8), atol=1e-2)
    with pytest.raises(GuidedError, match=r"--t0 must be in \(0, 1\]"):
        sample_batch(p, [0], [0], SampleOptions(steps="10"), init={"image": guide, "t0": 1.5})


@pytest.mark.parametrize("sampler, extra", [("pc", {}), ("ode", {"rtol": 1e-3, "atol": 1e-3}), ("dpm++", {})])
def test_every_eps_sampler_runs_and_is_seeded_per_sample(sampler, extra):
    p = tiny_pipeline()
    steps = {"pc": "6", "ode": None, "dpm++": "quad6"}[sampler]  # ode chooses its own
    opts = SampleOptions(sampler=sampler, steps=steps, scale=1.0, settings=extra)
    a = sample_batch(p, [0, 1, 2], [5, 6, 7], opts).clamp(-1, 1)  # the images (the raw samples of this
    b = sample_batch(p, [1, 2], [6, 7], opts).clamp(-1, 1)  # random-weight network leave [-1, 1] far behind)
    assert a.shape == (3, 3, 8, 8) and torch.isfinite(a).all()
    # float32 convolutions round differently at other batch sizes, and the adaptive ODE solver
    # picks its steps for the whole batch (agreement to its tolerance); another seed differs by O(1)
    assert (a[1:] - b).abs().mean() < (5e-2 if sampler == "ode" else 1e-2)
    other = sample_batch(p, [1, 2], [60, 70], opts).clamp(-1, 1)
    assert (a[1:] - other).abs().mean() > 0.1


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_drawn_per_sample_on_the_sampling_device(device):
    """Each sample's generator lives on the sampling device and draws there (nothing is copied over
    from the host in the loop); sample i is the stream of seed i whatever the batch, through a whole
    ancestral run that draws noise at every step. On the CPU the stream is the one of
    torch.Generator().manual_seed(seed), as before, so the shipped figures keep their pixels."""
    noise = SampleNoise([3, 4, 5], device)
    x = noise.randn((2, 4, 4))
    assert x.device.type == device and all(g.device.type == device for g in noise.generators)
    assert torch.equal(x, torch.cat([SampleNoise([3], device).randn((2, 4, 4)),
                                     SampleNoise([4, 5], device).randn((2, 4, 4))]))
    if device == "cpu":
        assert torch.equal(x[1], torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(4)))
    p = tiny_pipeline()
    p.model, p.classifier = p.model.to(device), p.classifier.to(device)
    opts = SampleOptions(sampler="ddpm", steps="6", scale=1.0)
    whole = sample_batch(p, [0, 1, 2], [5, 6, 7], opts, device=device)
    parts = torch.cat([sample_batch(p, [0], [5], opts, device=device), sample_batch(p, [1, 2], [6, 7], opts,
                                                                                  device=device)])
    assert whole.device.type == device
    assert (whole - parts).abs().max() < 1e-4  # float32 rounding of other batch sizes; another seed is O(1) away


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_on_cuda_a_guided_sampling_loop_never_waits_for_the_device(sampler):
    """CUDA's sync debug mode raises at any synchronisation inside the loop (after a warm-up run: the
    first use of the schedule's tables copies them over once)."""
    from guided.diffusion.gaussian import create_diffusion
    from guided.guidance.terms import classifier_cond_fn
    from guided.samplers.discrete import ddim, ddpm, dpmpp_2m
    SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpm++": dpmpp_2m}

    p = tiny_pipeline()
    model, clf = p.model.cuda(), p.classifier.cuda()
    d = create_diffusion(p.diffusion_cfg, "6")
    cond_fn = classifier_cond_fn(clf, torch.tensor([0, 1, 2], device="cuda"), 1.0)

    def run():
        noise = SampleNoise([1, 2, 3], "cuda")
        return SAMPLERS[sampler](d, lambda x, t: model(x, t), noise.randn((3, 8, 8)), noise=noise, cond_fn=cond_fn)
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.isfinite().all()


def test_a_sampler_the_model_cannot_serve_is_refused():
    p = tiny_pipeline()
    with pytest.raises(GuidedError, match="needs an NCSN model"):
        sample_batch(p, [0], [0], SampleOptions(sampler="langevin"))
    p = dataclasses.replace(p, objective="ncsn", ncsn_sigmas=torch.tensor([1.0, 0.1]))
    with pytest.raises(GuidedError, match="NCSN model .* cannot use the ddim sampler"):
        sample_batch(p, [0], [0], SampleOptions(sampler="ddim"))


def test_output_is_assembled_one_batch_at_a_time(tmp_path):
    """samples.npz reads back exactly as np.savez would have written it, while Python never holds
    more than a batch or two of the 15 MB of samples."""
    import tracemalloc

    import guided.generation.writer as gen

    out, rng = tmp_path / "out", np.random.default_rng(0)
    (out / "parts").mkdir(parents=True)
    images = rng.integers(0, 256, (20000, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(20000) % 7
    for s in range(0, 20000, 100):
        np.savez(out / "parts" / f"batch-{s:08d}.npz", images[s:s + 100], labels[s:s + 100])
    tracemalloc.start()
    try:
        gen._assemble(out, 20000, 100, {"seed": 0}, save_pngs=False, grid=12)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with np.load(out / "samples.npz") as f:
        assert np.array_equal(f["arr_0"], images) and np.array_equal(f["arr_1"], labels)
    assert peak < 2 * 2**20, peak  # the samples are 15 MB
    from PIL import Image
    assert Image.open(out / "grid.png").size == (12 * 18 * 4, 7 * 18 * 4)
    assert not (out / "parts").exists() and json.loads((out / "settings.json").read_text()) == {"seed": 0}


def test_labels_and_seeds_are_planned_per_batch(tmp_path, monkeypatch):
    """A billion samples: nothing is planned up front, the first batch starts at once."""
    import tracemalloc

    import guided.generation.writer as gen

    drawn = []

    def first_two(p, labels, seeds, *a, **k):
        drawn.append((labels.tolist(), seeds.tolist()))
        if len(drawn) == 2:
            raise KeyboardInterrupt
        return torch.zeros(len(labels), 3, 8, 8)
    monkeypatch.setattr(gen, "sample_batch", first_two)
    monkeypatch.setattr(gen, "check_room", lambda out, size: None)  # let it start on any disk
    tracemalloc.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(tiny_pipeline(), tmp_path, classes=[2, 0, 1], num_samples=10**9, batch_size=4, seed=10**12,
                     opts=OPTS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert drawn[1] == ([0, 1, 2, 0], [10**12 + i for i in range(4, 8)]) and peak < 10 * 2**20, peak
    assert not (tmp_path / ".lock").exists() and len(list((tmp_path / "parts").glob("batch-*.npz"))) == 1


def test_requested_labels_of_an_unguided_unconditional_model_are_flagged(tmp_path, capsys):
    p = tiny_pipeline()
    generate(p, tmp_path / "a", classes=[0, 1], num_samples=2, batch_size=2, seed=0, opts=OPTS)
    assert "labels are requests that nothing enforces" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "settings.json").read_text())["labels_enforced"] is False
    generate(p, tmp_path / "b", classes=[0, 1], num_samples=2, batch_size=2, seed=0,
             opts=SampleOptions(sampler="ddim", steps="5", scale=1.0))
    assert json.loads((tmp_path / "b" / "settings.json").read_text())["labels_enforced"] is True
