"""Speed switches keep the numbers: channels-last, torch.compile and bf16 autocast."""
from pathlib import Path

import pytest
import torch

from guided.networks import adm
from guided.evaluation.conformance import rel_error
from guided.guidance.terms import classifier_grad
from guided.speed import DeviceCopies, adamw, speed_up

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance"


def reference_unet():
    d = torch.load(SHARED / "unet_a.pt", weights_only=True)
    model = adm.load_state_dict_strict(adm.create_model(d["flags"]), d["state_dict"]).eval()
    return model, d


def test_channels_last_keeps_the_conformance_numbers():
    model, d = reference_unet()
    fast = speed_up(model, channels_last=True)
    with torch.no_grad():
        out = fast(d["x"].contiguous(memory_format=torch.channels_last), d["t"], y=d["y"])
    assert rel_error(out, d["out"]) < 1e-4


def test_bf16_autocast_is_within_bf16_rounding():
    model, d = reference_unet()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(d["x"], d["t"], y=d["y"])
    err = rel_error(out.float(), d["out"])
    assert 1e-4 < err < 3e-2  # bf16 has 8 mantissa bits: well above fp32 rounding, well below a real error


def test_bf16_classifier_gradient_follows_fp32():
    d = torch.load(SHARED / "classifier_a.pt", weights_only=True)
    clf = adm.load_state_dict_strict(adm.create_classifier(d["flags"]), d["state_dict"]).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = classifier_grad(clf, d["x"], d["t"], d["y"])
    cos = torch.nn.functional.cosine_similarity(g.float().flatten(), d["grad_log_prob"].flatten(), dim=0)
    assert cos > 0.99


def test_compiled_network_matches_eager():
    """A small network, to keep compilation short; the weights are shared with the eager one."""
    model = adm.create_model("--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
                             "--attention_resolutions 4 --learn_sigma True").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    compiled = speed_up(model, compile=True)
    with torch.no_grad():
        assert rel_error(compiled(x, t), model(x, t)) < 1e-4
    assert compiled._orig_mod is model


def test_schedule_tables_are_copied_to_a_device_once():
    """What a sampling step indexes (the schedule's tables, the timestep map) is copied to the device on
    first use and reused, so no step copies from the host (on CUDA such a copy waits for the device).
    The meta device stands in for an accelerator here."""
    from guided.config import DiffusionConfig, node
    from guided.diffusion.gaussian import create_diffusion
    from guided.diffusion.sde import DiscreteVPSDE

    d = create_diffusion(node(DiffusionConfig, {}), "10")
    t = torch.tensor([9, 3], device="meta")
    first = d.on_device(d.alphas_cumprod, t.device)
    assert first.device.type == "meta" and d.on_device(d.alphas_cumprod, t.device) is first
    assert d.extract(d.alphas_cumprod, t, torch.zeros(2, 3, 4, 4, device="meta")).shape == (2, 1, 1, 1)
    assert d.on_device(d.alphas_cumprod, torch.device("cpu")) is d.alphas_cumprod  # on its own device: as is
    sde = DiscreteVPSDE(d.alphas_cumprod)
    sde.beta(torch.tensor([0.5], device="meta"))
    assert sde.on_device(sde.slopes, torch.device("meta")) is sde.on_device(sde.slopes, torch.device("meta"))
    copies, table = DeviceCopies(), torch.ones(3)
    assert copies(table, torch.device("meta")) is copies(table, torch.device("meta"))
    assert copies(torch.ones(3), torch.device("meta")) is not copies(table, torch.device("meta"))


def test_fused_adamw_only_where_supported():
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = adamw(p, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    assert not opt.defaults.get("fused")


def test_training_with_channels_last_follows_the_plain_run(tiny):
    """The same seed with the layout switch on makes the same updates up to float rounding. (Without
    dropout: its mask is drawn in memory order, so another layout draws another mask.)"""
    from guided.training.diffusion import train_diffusion

    run = lambda *extra: train_diffusion(tiny("diffusion", "model.dropout=0.0", *extra)).net.state_dict()  # noqa: E731
    init, plain, fast = run("train.steps=0"), run("train.steps=2"), run("train.steps=2", "train.channels_last=true")
    assert plain.keys() == fast.keys()
    flat = lambda sd: torch.cat([sd[k].flatten() for k in plain if plain[k].is_floating_point()])  # noqa: E731
    update_plain, update_fast = flat(plain) - flat(init), flat(fast) - flat(init)
    assert update_plain.norm() > 0
    assert rel_error(update_fast, update_plain) < 0.05


def test_bf16_training_follows_the_fp32_loss_curve(tiny):
    """Mixed precision through Accelerate: the same seed in bf16 gives losses within bf16 noise."""
    import json

    from guided.training.diffusion import train_diffusion

    def losses(*extra):
        cfg = tiny("diffusion", "model.dropout=0.0", "train.steps=8", "train.log_every=1", *extra)
        train_diffusion(cfg)
        rows = (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()
        return torch.tensor([json.loads(r)["loss"] for r in rows if "loss" in json.loads(r)])

    fp32, bf16 = losses(), losses("train.mixed_precision=bf16")
    assert len(fp32) == len(bf16) == 8
    assert rel_error(bf16, fp32) < 0.05


def test_bf16_guided_samples_match_fp32():
    """The shipped models and classifier, a few DDIM steps: bf16 follows fp32 to bf16 accuracy."""
    from guided.networks.checkpoints import load_trained
    from guided.generation import Pipeline, SampleOptions, sample_batch

    assets = Path(__file__).resolve().parents[1] / "guided" / "assets" / "digits"
    model, cfg, labels = load_trained(assets / "cond.pt")
    classifier, _, _ = load_trained(assets / "classifier.pt")
    p = Pipeline(model, cfg.diffusion, classifier, labels, unconditional=True)  # the shipped `uncond`
    run = lambda precision: sample_batch(p, [3, 7], [0, 1], SampleOptions(  # noqa: E731
        sampler="ddim", steps="10", scale=4.0, precision=precision, clip_guided=True))  # as the CLI samples it
    # measured 0.0038 on the one-channel models with the clip (10 guided steps compound bf16 rounding)
    assert rel_error(run("bf16"), run("fp32")) < 0.1


# -- benchmarks/gpu_suite.sh: the script that fills the README's performance table on a GPU ---------------
REPO = Path(__file__).resolve().parents[1]
SUITE_ROWS = ["ImageNet-64 training, batch 64: images/s", "ImageNet-64 training, batch 64: peak GiB",
              "ImageNet-256 training, batch 16: images/s", "ImageNet-256 training, batch 16: peak GiB",
              "digits training, batch 64: steps/s", "ImageNet-64 reverse step, batch 64: unguided ms",
              "ImageNet-64 reverse step, batch 64: guided ms",
              "ImageNet-64 reverse step, batch 64: 250-step guided run, images/s",
              "ImageNet-256 reverse step, batch 16: unguided ms", "ImageNet-256 reverse step, batch 16: guided ms"]


def table_rows(stdout: str) -> dict:
    rows = [line.strip("| ").split(" | ") for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == ["figure", "standard", "fastest"], stdout
    return {r[0]: r[1:] for r in rows[2:]}


def test_gpu_suite_dry_run_prints_every_row_of_the_table():
    """The whole script, as a user runs it, on tiny stand-ins (one step each): every row of the
    performance table comes out with a figure in both columns, so the script cannot rot unseen."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("DRY RUN"), done.stdout
    rows = table_rows(done.stdout)
    assert list(rows) == SUITE_ROWS
    assert all(float(cell) > 0 for cells in rows.values() for cell in cells), done.stdout
    if not torch.cuda.is_available():  # without --dry-run it wants a GPU, and says so in one line
        refused = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            "error: no CUDA device here; --dry-run runs the tiny stand-ins on the CPU"]


def test_gpu_suite_goes_on_past_a_failed_cell_and_names_the_rows_past_its_budget(monkeypatch, capsys):
    import itertools
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import suite
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def out_of_memory(args, count_flops=True):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    monkeypatch.setattr(suite.train_speed, "measure", out_of_memory)
    monkeypatch.setattr(suite, "ROWS", suite.ROWS[:1] + suite.ROWS[3:])
    clock = itertools.chain([0.0, 1.0], itertools.repeat(1000.0))  # the second row would start past the budget
    monkeypatch.setattr(suite, "clock", lambda: next(clock))
    assert suite.main(["--dry-run", "--budget", "5"]) == 0
    rows = table_rows(capsys.readouterr().out)
    oom = "error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows["ImageNet-64 training, batch 64: images/s"] == [oom, oom]
    assert "ImageNet-64 reverse step, batch 64: left out (time budget)" in rows
    assert "ImageNet-256 reverse step, batch 16: left out (time budget)" in rows
