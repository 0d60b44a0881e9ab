"""The project's DiT (guided/networks/dit.py): the paper's parameter counts, its released state-dict layout,
adaLN-Zero's identity start, exact agreement with diffusers' DiTTransformer2DModel on the same weights once
diffusers embeds t as the paper's code does (and the size of the difference when it does not), and a DiT
trained by the project's trainer on the digits, resumed, and sampled with classifier-free guidance, on pixels
and on a VAE's latents."""
from __future__ import annotations

import pytest
import torch

from guided.config import load_config
from guided.errors import GuidedError
from guided.generation import SampleOptions, load_pipeline, sample_batch
from guided.generation.pipeline import guided_functions
from guided.networks.dit import DiT
from guided.networks.preconditioned import build_unet
from guided.training.diffusion import train_diffusion

TINY_DIT = ["model.arch=dit", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=2"]


def dit_config(*extra):
    return load_config(None, ["model.arch=dit", "model.image_size=8", "model.in_channels=4", "model.hidden_size=32",
                              "model.depth=2", "model.num_heads=2", "model.num_classes=10", "model.null_class=true",
                              "model.learn_sigma=true", *extra])


def perturbed(net):
    """The network with every trainable weight moved off its initialisation (adaLN-Zero starts at zero, which
    would make any comparison of outputs vacuous)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


@pytest.mark.parametrize("name, hidden, depth, heads, millions", [
    ("XL/2", 1152, 28, 16, 675), ("L/2", 1024, 24, 16, 458), ("B/2", 768, 12, 12, 130), ("S/2", 384, 12, 6, 33)])
def test_parameter_counts_are_the_papers(name, hidden, depth, heads, millions):
    """Peebles & Xie table 4: DiT-XL/2 675M, L/2 458M, B/2 130M, S/2 33M parameters at 256px (32x32x4 latents)."""
    cfg = load_config(None, ["model.arch=dit", "model.image_size=32", "model.in_channels=4", f"model.hidden_size={hidden}",
                             f"model.depth={depth}", f"model.num_heads={heads}", "model.num_classes=1000",
                             "model.null_class=true", "model.learn_sigma=true"])
    with torch.device("meta"):
        net = DiT(cfg.model)
    assert round(sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6) == millions


def test_the_state_dict_is_the_released_layout_and_starts_as_the_identity():
    """The keys of facebookresearch/DiT's models.py (so a released DiT-*.pt loads as it is); adaLN-Zero: every
    block starts as the identity and the output at zero."""
    net = DiT(dit_config().model)
    block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
    want = {"pos_embed", "y_embedder.embedding_table.weight"} | {
        f"{m}.{w}" for m in ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
                             "final_layer.adaLN_modulation.1", *[f"blocks.{i}.{b}" for i in range(2) for b in block]]
        for w in ("weight", "bias")}
    assert set(net.state_dict()) == want
    assert net.y_embedder.embedding_table.weight.shape == (11, 32)  # 10 classes and the null label
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert torch.equal(net.blocks[0](x, c), x)
    assert torch.equal(net(torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])), torch.zeros(2, 8, 8, 8))


def official_to_diffusers(sd: dict, depth: int) -> dict:
    """The key map of diffusers' DiT conversion (scripts/convert_dit_to_diffusers.py): the shared time and
    label embedders copied into every block, qkv split, the final layer as proj_out_1/2."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"]}
    for w in ("weight", "bias"):
        out[f"proj_out_1.{w}"] = sd[f"final_layer.adaLN_modulation.1.{w}"]
        out[f"proj_out_2.{w}"] = sd[f"final_layer.linear.{w}"]
    for i in range(depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[o + "norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        for w in ("weight", "bias"):
            out[o + f"norm1.emb.timestep_embedder.linear_1.{w}"] = sd[f"t_embedder.mlp.0.{w}"]
            out[o + f"norm1.emb.timestep_embedder.linear_2.{w}"] = sd[f"t_embedder.mlp.2.{w}"]
            out[o + f"norm1.linear.{w}"] = sd[b + f"adaLN_modulation.1.{w}"]
            for name, part in zip(("to_q", "to_k", "to_v"), sd[b + f"attn.qkv.{w}"].chunk(3)):
                out[o + f"attn1.{name}.{w}"] = part
            out[o + f"attn1.to_out.0.{w}"] = sd[b + f"attn.proj.{w}"]
            out[o + f"ff.net.0.proj.{w}"] = sd[b + f"mlp.fc1.{w}"]
            out[o + f"ff.net.2.{w}"] = sd[b + f"mlp.fc2.{w}"]
    return out


def test_equals_diffusers_dit_on_the_same_weights_with_the_papers_time_embedding():
    """An independent implementation as the oracle: diffusers' DiTTransformer2DModel with our weights gives our
    output to float32 rounding once its blocks embed t with the paper's frequencies (downscale_freq_shift 0) and
    norms (eps 1e-6); as diffusers ships it (shift 1) it differs by about 1% on the same weights."""
    diffusers = pytest.importorskip("diffusers")
    net = perturbed(DiT(dit_config().model))
    theirs = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                             num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                             norm_eps=1e-6).eval()
    theirs.load_state_dict(official_to_diffusers(net.state_dict(), 2), strict=True)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.5, 999.0]), torch.tensor([1, 10, 3])
    with torch.no_grad():
        ours, shipped = net(x, t, y), theirs(x, timestep=t, class_labels=y).sample
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        paper = theirs(x, timestep=t, class_labels=y).sample
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(ours, paper) < 1e-5
    assert 1e-3 < rel(ours, shipped) < 0.1


def test_a_dit_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(dit_config("model.patch_size=3").model)
    with pytest.raises(ValueError, match="class-conditional"):
        DiT(dit_config("model.num_classes=null").model)
    edm = load_config(None, [*TINY_DIT, "model.num_classes=10", "train.objective.prediction=edm",
                             "train.objective.weighting=edm"])
    with pytest.raises(GuidedError, match="a DiT trains as its paper does"):
        build_unet(edm)
    with pytest.raises(GuidedError, match="choose adm"):
        build_unet(load_config(None, ["model.arch=vit"]))


def test_the_trainer_trains_a_dit_that_resumes_and_samples_with_classifier_free_guidance(tiny):
    """A DiT through train_diffusion (label dropout to the null label), resumed from its checkpoint, loaded as a
    run and sampled: classifier-free guidance at scale 3 moves the samples, its null label being the last row."""
    cfg = tiny("diffusion", *TINY_DIT, "train.objective.label_dropout=0.2", "train.steps=4")
    first = train_diffusion(cfg)
    cfg.train.steps = 6
    resumed = train_diffusion(cfg, resume=True)
    assert resumed.status == "done" and resumed.out_dir == first.out_dir
    p = load_pipeline(str(first.out_dir), classifier="none")
    assert isinstance(p.model, DiT) and p.model.cfg.null_class and p.shape() == (3, 8, 8)
    opts = SampleOptions(sampler="ddim", steps="5", cfg_scale=3.0)
    perturbed(p.model)  # six steps leave adaLN-Zero's gates near zero, and with them the labels' effect
    y, x, t = torch.tensor([1, 7]), torch.randn(2, 3, 8, 8), torch.tensor([300, 800])
    with torch.no_grad():
        eps = guided_functions(p, y, opts)[0](x, t)[:, :3]
        cond, null = p.model(x, t, y)[:, :3], p.model(x, t, torch.full_like(y, 10))[:, :3]
    assert (cond - null).abs().max() > 1e-2
    assert torch.allclose(eps, null + 3.0 * (cond - null), rtol=1e-5, atol=1e-8)  # Ho & Salimans eq. 6
    assert torch.isfinite(sample_batch(p, [1, 7], [0, 1], opts)).all()


def test_a_released_dit_checkpoint_samples_with_its_vae(tmp_path):
    """A checkpoint as facebookresearch/DiT releases it (a plain state dict; train.py's {"ema": ...} too) loads as
    --model with --vae: the network is read off the weights' shapes, on the chain of their train.py, sampled as
    their sample.py does by default (DDPM, 250 steps); without --vae it is one line."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from test_latent import VAE, made

    net = perturbed(DiT(dit_config("model.hidden_size=128").model))  # heads: width / 64 where not a released width
    torch.save(net.state_dict(), tmp_path / "DiT-T-2-8.pt")
    torch.save({"ema": net.state_dict(), "args": None}, tmp_path / "checkpoint.pt")
    made(AutoencoderKL, 1, **VAE).save_pretrained(tmp_path / "vae", safe_serialization=True)
    for name in ("DiT-T-2-8.pt", "checkpoint.pt"):
        p = load_pipeline(str(tmp_path / name), classifier="none", vae=str(tmp_path / "vae"))
        assert isinstance(p.model, DiT) and p.shape() == (4, 8, 8) and p.image_shape() == (3, 16, 16)
        assert (p.model.cfg.hidden_size, p.model.cfg.depth, p.model.cfg.num_heads, p.model.num_classes) == (128, 2, 2, 10)
        assert (p.defaults.sampler, p.defaults.steps, p.diffusion_cfg.noise_schedule) == ("ddpm", "250", "linear")
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([3, 10])
        with torch.no_grad():
            assert torch.equal(p.model(x, t, y), net(x, t, y))
    images = sample_batch(p, [1, 2], [0, 1], SampleOptions(steps="4", cfg_scale=2.0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    with pytest.raises(GuidedError, match="give its VAE with --vae FOLDER"):
        load_pipeline(str(tmp_path / "DiT-T-2-8.pt"), classifier="none")
