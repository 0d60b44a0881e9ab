"""FD-DINOv2: the DINOv2 feature network, its local weights file and its place in evaluate().

No real weights here (never downloaded): random weights in the files the real ones come as
(Meta's .pth with its masked-modelling token and 518 px position grid, timm's safetensors)
check the loading, the grid resampling and the shapes; ViT-L/14 itself is built on the meta
device and compared with the layout of Meta's released checkpoint.
"""
import sys

import numpy as np
import pytest
import timm  # in the test extra: pip install -e ".[test]"
import torch

from guided.errors import GuidedError
from guided.evaluation.evaluate import evaluate, write_npz
from guided.evaluation.features import DINOV2_VITL14, DINOV2_WEIGHTS, DINOv2Features, dinov2_state_dict, get_extractor

# A DINOv2-style ViT small enough for a CPU test: patch 14, LayerScale, a 4 x 4 training grid (56 px).
TINY = {"model_name": "vit_large_patch14_dinov2", "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 56}


def _official_file(tmp_path, arch=TINY, suffix=".pth"):
    """Random weights saved as Meta's release is: timm's keys plus mask_token, grid at training size."""
    torch.manual_seed(0)
    net = timm.create_model(pretrained=False, num_classes=0, **arch)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["mask_token"] = torch.zeros(1, arch["embed_dim"])
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v for k, v in state.items() if k != "mask_token"}, str(path))
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_features_from_a_local_file_have_the_pool_shape(tmp_path, suffix):
    path, state = _official_file(tmp_path, suffix=suffix)
    ext = DINOv2Features(path, device="cpu", arch=dict(TINY, img_size=224))
    assert ext.net.pos_embed.shape == (1, 16 * 16 + 1, 32)  # 224 / 14 = 16: resampled from the 4 x 4 grid
    assert torch.equal(ext.net.pos_embed[0, 0], state["pos_embed"][0, 0])  # the class token's row is kept
    grey = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    out = ext.extract(grey)
    assert set(out) == {"pool"} and out["pool"].shape == (3, 32) and np.isfinite(out["pool"]).all()
    rgb = ext.extract(np.repeat(grey, 3, -1))["pool"]
    np.testing.assert_allclose(rgb, out["pool"], rtol=1e-5, atol=1e-5)  # grey is read as equal RGB channels


def test_vit_l14_matches_the_layout_of_metas_checkpoint():
    """dinov2_vitl14_pretrain.pth: 24 blocks of width 1024, 16 heads, MLP 4096, LayerScale, patch 14,
    a 37 x 37 grid for 518 px plus the class token, and a mask token: all of it must fit our ViT-L."""
    with torch.device("meta"):
        net = timm.create_model(pretrained=False, num_classes=0, **DINOV2_VITL14)
    official = {"cls_token": (1, 1, 1024), "pos_embed": (1, 37 * 37 + 1, 1024), "mask_token": (1, 1024),
                "patch_embed.proj.weight": (1024, 3, 14, 14), "patch_embed.proj.bias": (1024,),
                "norm.weight": (1024,), "norm.bias": (1024,)}
    block = {"norm1.weight": (1024,), "norm1.bias": (1024,), "attn.qkv.weight": (3072, 1024),
             "attn.qkv.bias": (3072,), "attn.proj.weight": (1024, 1024), "attn.proj.bias": (1024,),
             "ls1.gamma": (1024,), "norm2.weight": (1024,), "norm2.bias": (1024,),
             "mlp.fc1.weight": (4096, 1024), "mlp.fc1.bias": (4096,), "mlp.fc2.weight": (1024, 4096),
             "mlp.fc2.bias": (1024,), "ls2.gamma": (1024,)}
    official.update({f"blocks.{i}.{k}": v for i in range(24) for k, v in block.items()})
    state = dinov2_state_dict({k: torch.empty(v, device="meta") for k, v in official.items()}, net)
    own = net.state_dict()
    assert sorted(state) == sorted(own)
    assert all(tuple(state[k].shape) == tuple(own[k].shape) for k in own)
    assert net.num_features == 1024 and tuple(net.patch_embed.img_size) == (224, 224)


def test_a_missing_weights_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("GUIDED_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(GuidedError) as e:
        get_extractor("dinov2")
    msg = str(e.value)
    assert "\n" not in msg and DINOV2_WEIGHTS.names[0] in msg and str(tmp_path / ".cache" / "guided") in msg
    assert "dl.fbaipublicfiles.com/dinov2" in msg and "--dinov2-weights" in msg and "GUIDED_DINOV2_WEIGHTS" in msg
    with pytest.raises(GuidedError, match="not found at .*nope.pth"):
        get_extractor("dinov2", dinov2_weights=str(tmp_path / "nope.pth"))


def test_wrong_or_broken_files_are_one_line(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(GuidedError, match="garbage.pth"):
        DINOv2Features(tmp_path / "garbage.pth", device="cpu", arch=TINY)
    path, _ = _official_file(tmp_path)
    with pytest.raises(GuidedError, match="does not fit this architecture: .*shape mismatches"):
        DINOv2Features(path, device="cpu", arch=dict(TINY, embed_dim=64))


def test_without_timm_it_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(GuidedError, match=r'pip install -e "\.\[dinov2\]"'):
        DINOv2Features(tmp_path / "w.pth", device="cpu")


def test_fd_dinov2_in_evaluate(tmp_path):
    path, _ = _official_file(tmp_path)
    ext = DINOv2Features(path, device="cpu", arch=dict(TINY, img_size=56))
    rng = np.random.default_rng(0)
    ref = write_npz(tmp_path / "ref.npz", rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    res = evaluate(ref, ref, ext, progress=False)
    assert res["features"] == "dinov2" and res["feature_dim"] == 32
    assert abs(res["fd_dinov2"]) < 1e-6 and "fid" not in res  # named for its feature space
    assert "sfid" not in res and "inception_score" not in res  # DINOv2 has neither
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert any(w.startswith("FD-DINOv2 from 12 samples (fewer than its 32 feature dimensions") for w in res["warnings"])
