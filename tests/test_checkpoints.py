"""Checkpoint files: atomic writes, the newest good one, one-line errors, load_trained."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guided import files
from guided.networks import checkpoints as ck
from guided.training import checkpoints as run_ck
from guided.data import LabelMap
from guided.errors import GuidedError
from guided.networks.unet import UNetModel

from conftest import tiny_config


@pytest.fixture
def run_dir(tmp_path):
    """A run folder written by a real (tiny) training run: config, label map, 2 checkpoints, exports."""
    from guided.training.diffusion import train_diffusion

    cfg = tiny_config("diffusion", tmp_path / "run", "train.steps=2", "train.save_every=1")
    train_diffusion(cfg)
    return Path(cfg.train.out_dir)


def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-0000001.pt"
    files.atomic_save({"w": torch.ones(3)}, path)
    real_save = torch.save

    def half_then_crash(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(ck.read_file(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_save_keeps_only_the_newest(tmp_path):
    for step in (1, 2, 3):
        run_ck.save_checkpoint(tmp_path, step, {"kind": "unet"}, keep=2)
    assert [s for s, _ in run_ck.list_checkpoints(tmp_path)] == [2, 3]
    assert run_ck.load_checkpoint(run_ck.checkpoint_path(tmp_path, 3))["step"] == 3


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "does not exist"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated or corrupt"),
    (lambda p: p.write_bytes(b"not a checkpoint at all" * 10), "truncated or corrupt"),
])
def test_damaged_files_are_one_line_errors(tmp_path, damage, message):
    path = run_ck.save_checkpoint(tmp_path, 5, {"kind": "unet", "model": {"w": torch.randn(1000)}})
    damage(path)
    with pytest.raises(GuidedError, match=message) as err:
        run_ck.load_checkpoint(path)
    assert "\n" not in str(err.value)
    with pytest.raises(GuidedError, match=message):
        ck.load_trained(path)


def test_latest_skips_an_unreadable_newest_checkpoint(tmp_path):
    run_ck.save_checkpoint(tmp_path, 1, {"kind": "unet"}, keep=5)
    run_ck.save_checkpoint(tmp_path, 2, {"kind": "unet"}, keep=5).write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint.*ckpt-0000002.pt"):
        path, state = run_ck.latest_checkpoint(tmp_path)
    assert state["step"] == 1 and path.name == "ckpt-0000001.pt"
    assert run_ck.latest_checkpoint(tmp_path / "none") is None


def test_load_trained_from_a_run_folder_exports_and_checkpoints(run_dir):
    model, cfg, labels = ck.load_trained(run_dir)  # ema.pt
    assert isinstance(model, UNetModel) and not model.training
    assert cfg.model.num_classes == 10 and isinstance(labels, LabelMap) and len(labels) == 10
    ema = ck.read_file(run_dir / "ema.pt")["state_dict"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    raw, _, _ = ck.load_trained(run_dir, which="model")
    from_ckpt, _, _ = ck.load_trained(run_dir / "ckpt-0000002.pt", which="model")
    assert all(torch.equal(v, from_ckpt.state_dict()[k]) for k, v in raw.state_dict().items())
    with pytest.raises(GuidedError, match="no 'ema:0.5' weights"):
        ck.load_trained(run_dir / "ckpt-0000002.pt", which="ema:0.5")


def test_a_shipped_fp16_export_is_small_and_self_contained(run_dir, tmp_path):
    model, cfg, labels = ck.load_trained(run_dir)
    out = ck.ship(run_dir, tmp_path / "ship" / "cond.pt")
    assert {p.name for p in out.parent.iterdir()} == {"cond.pt", "cond.yaml", "label_map.json"}
    assert out.stat().st_size < 0.6 * (run_dir / "ema.pt").stat().st_size
    assert ck.read_file(out)["which"] == "ema:0.9"
    out.with_suffix(".yaml").unlink()
    (out.parent / "label_map.json").unlink()
    again, cfg2, labels2 = ck.load_trained(out)  # nothing beside it: the embedded config and labels
    assert cfg2 == cfg and labels2 == labels
    assert all(torch.allclose(v, again.state_dict()[k], atol=1e-2) for k, v in model.state_dict().items())


def test_weights_of_another_architecture_are_refused(run_dir):
    text = (run_dir / "config.yaml").read_text().replace("model_channels: 32", "model_channels: 64")
    (run_dir / "config.yaml").write_text(text)
    with pytest.raises(GuidedError, match="does not fit this architecture") as err:
        ck.load_trained(run_dir)
    assert "\n" not in str(err.value)


def test_read_state_dict_accepts_bare_state_dicts(tmp_path):
    torch.save({"module.w": torch.ones(2)}, tmp_path / "released.pt")
    assert list(ck.read_state_dict(tmp_path / "released.pt")) == ["w"]
    with pytest.raises(GuidedError, match="no config"):
        ck.load_trained(tmp_path / "released.pt")


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("-inf"), "inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(run_dir, tmp_path, value, kind):
    sd = ck.read_file(run_dir / "ema.pt")
    sd["state_dict"]["out.2.bias"][1] = value
    torch.save(sd, run_dir / "ema.pt")
    with pytest.raises(GuidedError, match=f"tensor out.2.bias holds {kind} \\(1 of 6 values are not finite\\)") as e:
        ck.load_trained(run_dir)
    assert "\n" not in str(e.value) and str(run_dir / "ema.pt") in str(e.value)
    torch.save({"w": torch.tensor([1.0, value])}, tmp_path / "released.pt")  # an official checkpoint's path
    with pytest.raises(GuidedError, match=f"tensor w holds {kind}"):
        ck.read_state_dict(tmp_path / "released.pt")
