"""Training in a VAE's latent space: the latent cache (built once, resumable after a kill, refused when
another VAE made it), a few steps of both trainers on latents, and sampling the trained run (decoded
images) guided by its latent classifier, from the Python API and the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

from guided.cli.sample import main as sample_main  # noqa: E402
from guided.data import build_dataset  # noqa: E402
from guided.data.latents import SHARD, LatentDataset, build_cache  # noqa: E402
from guided.errors import GuidedError  # noqa: E402
from guided.generation import SampleOptions, load_pipeline, sample_batch  # noqa: E402
from guided.networks.diffusers import load_vae  # noqa: E402
from guided.training.classifier import train_classifier  # noqa: E402
from guided.training.diffusion import train_diffusion  # noqa: E402
from test_latent import VAE, made  # noqa: E402

LATENT = ["data.image_size=16", "data.channels=3"]


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    d = tmp_path_factory.mktemp("vaes")
    made(AutoencoderKL, 1, **VAE).save_pretrained(d / "vae", safe_serialization=True)
    made(AutoencoderKL, 2, **VAE).save_pretrained(d / "other", safe_serialization=True)
    return d / "vae", d / "other"


def test_the_cache_resumes_after_a_kill_and_refuses_another_vae(tmp_path, vaes):
    data = build_dataset({"kind": "digits", "image_size": 16, "channels": 3})
    space = load_vae(vaes[0])
    folder = build_cache(data, space, tmp_path / "c", 16, progress=False)
    whole = LatentDataset(folder, data)
    assert len(whole) == len(data) and whole.shape == (4, 8, 8) and whole.label_map == data.label_map
    x, y = data[300]
    with torch.no_grad():
        assert torch.allclose(whole[300][0], space.encode(x[None])[0], atol=1e-5) and whole[300][1] == y
    (folder / "shard-00001.pt").unlink()  # killed while shard 1 was being written (atomic: it is absent)
    before = {f.name: f.stat().st_mtime_ns for f in folder.glob("shard-*.pt")}
    build_cache(data, space, folder, 16, progress=False)
    after = {f.name: f.stat().st_mtime_ns for f in folder.glob("shard-*.pt")}
    assert set(after) - set(before) == {"shard-00001.pt"} and all(after[k] == v for k, v in before.items())
    assert torch.equal(LatentDataset(folder, data).latents, whole.latents)
    assert len(after) == -(-len(data) // SHARD)
    with pytest.raises(GuidedError, match="was made by another VAE"):
        build_cache(data, load_vae(vaes[1]), folder, 16, progress=False)


def test_both_trainers_run_on_latents_and_the_run_samples_decoded_images(tiny, tmp_path, vaes, capsys):
    cache = tmp_path / "cache"
    common = [*LATENT, f"data.vae={vaes[0]}", f"data.latent_cache={cache}"]
    unet = train_diffusion(tiny("diffusion", *common, "model.in_channels=4", "model.image_size=8"))
    clf = train_classifier(tiny("classifier", *common, "classifier.in_channels=4", "classifier.image_size=8"))
    assert sorted(p.name for p in cache.iterdir()) == ["heldout", "train"]  # both trainers share one cache
    p = load_pipeline(str(unet.out_dir), classifier=str(clf.out_dir))
    assert p.shape() == (4, 8, 8) and not p.score_model.space.bounded
    x = sample_batch(p, [1, 2], [0, 1], SampleOptions(sampler="ddim", steps="4", scale=1.0))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()  # decoded at the end
    out = tmp_path / "samples"
    assert sample_main(["--model", str(unet.out_dir), "--classifier", str(clf.out_dir), "--class", "3", "--scale", "1",
                        "--sampler", "ddim", "--steps", "4", "--num-samples", "2", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 3)
    assert json.loads((out / "settings.json").read_text())["options"]["clip"] == "none"  # latents are never clipped
    shipped = sample_main(["--model", str(unet.out_dir), "--classifier", "classifier", "--scale", "1",
                           "--num-samples", "1", "--out", str(tmp_path / "pixel")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert shipped == 2 and len(err) == 1, err  # a pixel classifier on latents: one line
    assert "latents" in err[0] and "classifier" in err[0], err


def test_a_network_that_does_not_fit_the_latents_is_one_line(tiny, tmp_path, vaes):
    cfg = tiny("diffusion", *LATENT, f"data.vae={vaes[0]}", f"data.latent_cache={tmp_path / 'c'}")
    with pytest.raises(GuidedError, match="data.vae makes 4x8x8 latents of the 16px images but model takes 3x8x8"):
        train_diffusion(cfg)


def test_a_dit_trains_on_latents_and_its_run_samples_decoded_images(tiny, tmp_path, vaes, capsys):
    """The project's DiT (model.arch: dit) on a VAE's latents, as configs/imagenet256_dit_*.yaml trains it; the
    digits probe judges its samples decoded (16x16 images), not its latents."""
    cfg = tiny("diffusion", *LATENT, f"data.vae={vaes[0]}", f"data.latent_cache={tmp_path / 'cache'}", "model.arch=dit",
               "model.in_channels=4", "model.image_size=8", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
               "train.objective.label_dropout=0.1", "train.probe.every=4", "train.probe.samples=10")
    run = train_diffusion(cfg)
    assert "note: latents are never clipped, and this chain's first reverse step (from t = T) multiplies the " \
           "network's eps error by 31.6" in capsys.readouterr().out  # the tiny config's cosine chain
    probed = [json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text().splitlines() if "probe_fid" in line]
    assert probed and np.isfinite(probed[-1]["probe_fid"]) and 0 <= probed[-1]["probe_acc"] <= 1
    p = load_pipeline(str(run.out_dir), classifier="none")
    assert type(p.model).__name__ == "DiT" and p.shape() == (4, 8, 8) and not p.score_model.space.bounded
    x = sample_batch(p, [1, 2], [0, 1], SampleOptions(sampler="ddim", steps="3", cfg_scale=1.5))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    cfg.train.out_dir, cfg.diffusion.noise_schedule = str(tmp_path / "linear"), "linear"
    train_diffusion(cfg)
    assert "latents are never clipped" not in capsys.readouterr().out
