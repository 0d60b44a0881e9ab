"""The networks on odd configurations, attention against a plain oracle, guidance."""
import math
import warnings

import pytest
import torch

from guided.config import ClassifierConfig, DiffusionConfig, UNetConfig, node
from guided.diffusion.gaussian import create_diffusion
from guided.guidance.terms import Guidance, Term, classifier_cond_fn, classifier_grad
from guided.networks.nn import attention
from guided.samplers.discrete import SampleNoise, ddim, ddpm
from guided.networks.unet import EncoderUNetModel, UNetModel


def unet(**kw):
    base = dict(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[8])
    return UNetModel(node(UNetConfig, {**base, **kw}))


def classifier(**kw):
    base = dict(image_size=16, model_channels=32, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[8],
                num_head_channels=16, num_classes=5)
    return EncoderUNetModel(node(ClassifierConfig, {**base, **kw}))


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("kw, out_channels", [
    (dict(), 3),
    (dict(learn_sigma=True, num_classes=7), 6),
    (dict(in_channels=1, channel_mult=[1], attention_resolutions=[]), 1),
    (dict(channel_mult=[0.5, 1, 2], model_channels=64, image_size=8, resblock_updown=True, num_res_blocks=2), 3),
    (dict(num_head_channels=16, use_new_attention_order=True, num_heads_upsample=2), 3),
    (dict(use_scale_shift_norm=False, dropout=0.1, num_classes=3, null_class=True), 3),
])
def test_unet_shapes(kw, out_channels):
    m = unet(**kw).eval()
    size = kw.get("image_size", 16)
    x = torch.randn(2, kw.get("in_channels", 3), size, size)
    y = torch.tensor([0, 2]) if kw.get("num_classes") else None
    assert m(x, torch.tensor([0, 999]), y=y).shape == (2, out_channels, size, size)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_classifier_pools(pool):
    c = classifier(pool=pool)
    assert c(torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])).shape == (3, 5)


def test_unknown_pool():
    with pytest.raises(ValueError, match="unknown classifier pool"):
        classifier(pool="max")


def reference_attention(qkv, heads, new_order):
    """The paper's QKVAttention / QKVAttentionLegacy written out with einsum."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = qkv.chunk(3, dim=1)
        q, k, v = (t.reshape(b * heads, ch, length) for t in (q, k, v))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_matches_the_reference_formula(new_order):
    """Ours takes and gives token-major [B, T, C] tensors, the reference channel-major [B, C, T]."""
    qkv = torch.randn(2, 3 * 4 * 8, 10, dtype=torch.float64)
    ours = attention(qkv.transpose(1, 2), 4, new_order).transpose(1, 2)
    assert torch.allclose(ours, reference_attention(qkv, 4, new_order), atol=1e-12)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("new_order", [False, True])
def test_attention_runs_on_the_fused_kernels_alone(device, new_order):
    """With SDPA's math kernel switched off (flash and memory-efficient only; on the CPU flash is the
    fused kernel), the U-Net's attention blocks and the classifier's attention pool run forward and
    backward: what they hand to SDPA is a layout the fused kernels take. The channel-major views of
    before are refused in the same setting, so the check can fail."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    net = unet(num_head_channels=16, use_new_attention_order=new_order, attention_resolutions=[16, 8]).to(device)
    clf = classifier(pool="attention").to(device)
    x = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    t = torch.tensor([5, 700], device=device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        (net(x, t).square().sum() + clf(x, t).logsumexp(-1).sum()).backward()
        assert x.grad.isfinite().all() and x.grad.abs().sum() > 0
        q = torch.randn(2, 2, 16, 64, device=device).transpose(-1, -2)  # [B, H, T, C] views of [B, H, C, T]
        with pytest.raises(RuntimeError, match="No available kernel"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA's warnings explain the refusal ("... last dimension ...")
            torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_gradient_checkpointing_keeps_gradients():
    a = randomize(unet(num_classes=3))
    b = randomize(unet(num_classes=3, use_checkpoint=True))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), torch.tensor([0, 1])
    ga = torch.autograd.grad(a(x, t, y).square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(b(x, t, y).square().sum(), list(b.parameters()))
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(ga, gb))


def test_label_y_must_match_conditioning():
    with pytest.raises(ValueError, match="class-conditional"):
        unet()(torch.randn(1, 3, 16, 16), torch.tensor([1]), y=torch.tensor([0]))


def test_classifier_grad_is_the_gradient_of_log_prob():
    c = randomize(classifier())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 20]), torch.tensor([1, 4])
    g = classifier_grad(c, x, t, y)
    d = g / g.norm() * 1e-2  # a finite difference along the gradient
    logp = lambda z: torch.log_softmax(c(z, t).double(), -1)[torch.arange(2), y].sum()  # noqa: E731
    with torch.no_grad():
        assert (logp(x + d) - logp(x - d)).item() == pytest.approx((2 * g * d).sum().item(), rel=1e-2)


class LinearClassifier(torch.nn.Module):
    """log p(y | x) from the channel means: a classifier whose gradient is never negligible."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(3)) * 5)

    def forward(self, x, t):
        return x.mean(dim=(2, 3)) @ self.w


def test_guidance_raises_the_target_log_probability():
    torch.manual_seed(0)
    model, clf = randomize(unet(learn_sigma=True), 1).eval(), LinearClassifier()
    d = create_diffusion(node(DiffusionConfig, dict(variance="learned_range", timestep_respacing="10")))
    y = torch.tensor([0, 1, 2, 3])
    x_T = SampleNoise(range(4)).randn((3, 16, 16))
    model_fn = lambda x, t: model(x, t)  # noqa: E731

    def final_logp(sampler, scale, **kw):
        cond = classifier_cond_fn(clf, y, scale) if scale else None
        x0 = sampler(d, model_fn, x_T, cond_fn=cond, noise=SampleNoise(range(4)), **kw)
        return torch.log_softmax(clf(x0, torch.zeros(4, dtype=torch.long)), -1)[torch.arange(4), y].mean().item()

    assert final_logp(ddim, 10.0) > final_logp(ddim, 0.0) + 0.1
    assert final_logp(ddpm, 10.0) > final_logp(ddpm, 0.0) + 0.1


def test_per_sample_noise_is_batch_independent():
    whole = SampleNoise(range(10, 16)).randn((3, 4, 4))
    parts = torch.cat([SampleNoise(range(10, 12)).randn((3, 4, 4)), SampleNoise(range(12, 16)).randn((3, 4, 4))])
    assert torch.equal(whole, parts)


def test_classifier_free_guidance_mixes_eps():
    m = randomize(unet(num_classes=3, null_class=True, learn_sigma=True)).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 6]), torch.tensor([0, 2])
    cond, uncond = m(x, t, y), m(x, t, torch.tensor([3, 3]))
    def cfg(w):
        return Guidance([Term("cfg", w)], sigma_of=lambda t: t.float(), null_label=3).model_fn(m, y)

    out = cfg(2.5)(x, t)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 2.5 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-5)  # batched vs single pass: float rounding
    assert torch.allclose(cfg(1.0)(x, t), cond, atol=1e-5)
