"""Flag parsing, the nine released checkpoints' key sets, strict loading."""
import json
from pathlib import Path

import pytest
import torch

from guided.networks import adm
from guided.errors import GuidedError

MANIFEST = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance" / "openai_checkpoint_manifest.json"
ENTRIES = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_released_checkpoint_keys_shapes_and_count(name):
    entry = ENTRIES[name]
    build = adm.create_model if entry["kind"] == "unet" else adm.create_classifier
    model = build(entry["flags"], device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in entry["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_published_presets_match_manifest(name):
    assert adm.parse_flags(adm.PUBLISHED[name]) == adm.parse_flags(ENTRIES[name]["flags"])


def test_all_nine_in_manifest():
    assert len(ENTRIES) == 9


def test_flag_dict_and_string_agree():
    s = "--num_channels 64 --class_cond True --learn_sigma True --image_size 32 --channel_mult 1,2"
    d = {"num_channels": 64, "class_cond": True, "learn_sigma": True, "image_size": 32, "channel_mult": "1,2"}
    assert adm.unet_config(s) == adm.unet_config(d)


@pytest.mark.parametrize("flags, message", [
    ("--num_chanels 64", "unknown ADM flag --num_chanels"),
    ("--num_channels sixty", "--num_channels takes a int"),
    ("--class_cond maybe", "--class_cond takes a bool"),
    ("--image_size 48", "no default channel_mult for image_size 48"),
    ("--num_channels", "'--name value' pairs"),
])
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(GuidedError, match=message):
        adm.create_model(flags, device="meta")


def test_other_architecture_names_first_missing_and_unexpected_key():
    unet = adm.create_model("--image_size 32 --num_channels 32 --channel_mult 1,2 --attention_resolutions 16")
    classifier = adm.create_classifier("--image_size 32 --classifier_width 32 --channel_mult 1,2 "
                                       "--classifier_attention_resolutions 16 --num_classes 10")
    with pytest.raises(GuidedError) as info:
        adm.load_state_dict_strict(unet, classifier.state_dict(), "classifier.pt")
    msg = str(info.value)
    assert "missing keys (first: input_blocks.3.0.op.weight)" in msg
    assert "unexpected keys (first: input_blocks.3.0.in_layers.0.weight)" in msg and "\n" not in msg


def test_compiled_and_ddp_prefixes_are_stripped():
    flags = "--image_size 32 --num_channels 32 --channel_mult 1,2 --attention_resolutions 16"
    a, b = adm.create_model(flags), adm.create_model(flags)
    sd = {"_orig_mod." + k: v for k, v in a.state_dict().items()}
    adm.load_state_dict_strict(b, sd)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_diffusion_flags():
    cfg = adm.diffusion_config("--learn_sigma True --noise_schedule cosine --timestep_respacing ddim25")
    assert (cfg.variance, cfg.noise_schedule, cfg.timestep_respacing) == ("learned_range", "cosine", "ddim25")
    assert adm.diffusion_config("--sigma_small True").variance == "fixed_small"
    assert adm.diffusion_config("").variance == "fixed_large"
    assert adm.diffusion_config("--rescale_learned_sigmas True").loss == "rescaled_mse"
