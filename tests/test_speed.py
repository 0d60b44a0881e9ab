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
IN64, DIT = "ImageNet-64 reverse step, batch 64", "DiT-XL/2 latent 256 (SD VAE, latent classifier), batch 16"
SUITE_ROWS = ["ImageNet-64 training, batch 64: images/s", "ImageNet-64 training, batch 64: peak GiB",
              f"{IN64}: unguided ms", f"{IN64}: guided ms", f"{IN64}: 250-step guided DDPM run, images/s",
              f"{IN64}: few-step default guided run (dpm++2m-sde, karras20), images/s",
              f"{DIT}: unguided ms", f"{DIT}: guided ms", f"{DIT}: VAE decode of the batch, ms",
              f"{DIT}: few-step default guided run with the decode, images/s",
              "ImageNet-256 reverse step, batch 16: unguided ms", "ImageNet-256 reverse step, batch 16: guided ms",
              "ImageNet-256 training, batch 16: images/s", "ImageNet-256 training, batch 16: peak GiB",
              "digits training, batch 64: steps/s"]
HEADER = ["figure", "standard", "fastest", "paper's code (H100)", "fastest / paper"]


def table_rows(stdout: str) -> dict:
    rows = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == HEADER, stdout
    return {r[0]: r[1:] for r in rows[2:]}


def import_suite():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import suite
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return suite


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
    assert all(float(cell) > 0 for cells in rows.values() for cell in cells[:2]), done.stdout
    assert [name for name, cells in rows.items() if cells[2]] == SUITE_ROWS[:2] + [f"{IN64}: guided ms"]
    assert rows[f"{IN64}: guided ms"][2] == "240.0"  # the paper's figure, and the fastest cell over it
    assert float(rows[f"{IN64}: guided ms"][3]) == pytest.approx(float(rows[f"{IN64}: guided ms"][1]) / 240, abs=0.01)
    if not torch.cuda.is_available():  # without --dry-run it wants a GPU, and says so in one line
        refused = subprocess.run(["bash", "benchmarks/gpu_suite.sh"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            "error: no CUDA device here; --dry-run runs the tiny stand-ins on the CPU"]


def test_gpu_suite_goes_on_past_a_failed_cell_and_names_the_rows_past_its_budget(monkeypatch, capsys):
    import itertools

    suite = import_suite()

    def out_of_memory(args, count_flops=True):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    monkeypatch.setattr(suite.train_speed, "measure", out_of_memory)
    monkeypatch.setattr(suite, "ROWS", suite.ROWS[:1] + suite.ROWS[3:])
    clock = itertools.chain([0.0, 1.0], itertools.repeat(1000.0))  # the second row would start past the budget
    monkeypatch.setattr(suite, "clock", lambda: next(clock))
    assert suite.main(["--dry-run", "--budget", "5"]) == 0
    rows = table_rows(capsys.readouterr().out)
    oom = "error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows["ImageNet-64 training, batch 64: images/s"] == [oom, oom, "154.0", ""]
    assert [r for r in rows if "left out" in r] == [f"{what}: left out (time budget)" for what in (
        "ImageNet-256 reverse step, batch 16", "ImageNet-256 training, batch 16", "digits training, batch 64")]


def test_gpu_suite_fills_the_performance_page_from_a_saved_run(tmp_path, capsys):
    """What a GPU call brings back (--json) becomes the page's table here (--from-json --page): the figures,
    the paper's, the fastest over the paper's; the page around the markers is kept, and a page without
    them is refused in one line."""
    import json

    suite = import_suite()
    fast = {"images_per_s": 462.0, "peak_gib": 12.3, "seconds": 0.1, "unguided_ms": 20.0, "guided_ms": 48.0,
            "run_images_per_s": [3.5, 41.0]}
    run = dict(results={"ImageNet-64 training, batch 64": {"standard": dict(fast, images_per_s=200.0), "fastest": fast},
                        IN64: {"standard": dict(fast, guided_ms=120.0), "fastest": fast}},
               left_out=[DIT], device="NVIDIA H100 80GB HBM3", torch="2.11.0", seconds=290, dry_run=False,
               settings=suite.SETTINGS, command="python benchmarks/suite.py --budget 300 --json out/suite.json",
               date="2026-12-07")
    (tmp_path / "suite.json").write_text(json.dumps(run))
    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\n\nbefore\n\n{suite.BEGIN}\n| old | table |\n{suite.END}\n\nafter\n")
    assert suite.main(["--from-json", str(tmp_path / "suite.json"), "--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Performance\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "| old |" not in text
    assert "device NVIDIA H100 80GB HBM3, torch 2.11.0, 290 s" in text
    rows = table_rows(text)
    assert rows["ImageNet-64 training, batch 64: images/s"] == ["200.0", "462.0", "154.0", "3.00"]
    assert rows["ImageNet-64 training, batch 64: peak GiB"] == ["12.30", "12.30", "24.6", "0.50"]
    assert rows[f"{IN64}: guided ms"] == ["120.0", "48.0", "240.0", "0.20"]
    assert rows[f"{IN64}: few-step default guided run (dpm++2m-sde, karras20), images/s"][:2] == ["41.00", "41.00"]
    assert f"{DIT}: left out (time budget)" in rows
    page.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="has no"):
        suite.main(["--from-json", str(tmp_path / "suite.json"), "--page", str(page)])
    assert page.read_text() == "# no markers\n"


def test_profile_step_names_the_top_operators_of_a_benchmark_step(capsys):
    """benchmarks/profile_step.py profiles the benchmark's own workload (here a guided reverse step of the
    digits stand-in on the CPU) and prints its operators by self time; a pixel preset has no decode to profile."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import profile_step
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert profile_step.main(["guided", "--repeats", "1", "--warmup", "1", "--top", "5", "--",
                              "--preset", "digits", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "one guided reverse step of digits, batch 2" in out and "aten::" in out
    with pytest.raises(SystemExit, match="pixel model"):
        profile_step.main(["decode", "--", "--preset", "digits", "--batch-size", "2"])
