"""guided-demo: the page's requests and streams on tiny models, and the real page in headless Chromium."""
import dataclasses
import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from guided.config import SamplingConfig
from guided.generation import load_pipeline
from PIL import Image

from guided.config import ClassifierConfig, DiffusionConfig, UNetConfig, node
from guided.cli.demo import (METHODS, PREVIEW_AT, available_methods, build_parser, grid, read_sweep, request, stream,
                         trajectory)
from guided.errors import GuidedError
from guided.generation import Pipeline, sample_batch, to_uint8
from guided.networks.unet import EncoderUNetModel, UNetModel


def tiny_pipeline(channels=3, null_class=False, **extra):
    torch.manual_seed(0)
    arch = dict(image_size=8, model_channels=32, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[4],
                in_channels=channels)
    m = UNetModel(node(UNetConfig, dict(arch, learn_sigma=True, num_classes=3, null_class=null_class)))
    c = EncoderUNetModel(node(ClassifierConfig, dict(arch, num_head_channels=16, num_classes=3, pool="adaptive")))
    with torch.no_grad():  # random, non-zero output layers so every path shows
        for net in (m, c):
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    diffusion = node(DiffusionConfig, dict(variance="learned_range", noise_schedule="cosine"))
    return Pipeline(m.eval(), diffusion, c.eval(), **extra)


ARGS = build_parser().parse_args([])


def ask(p, args=ARGS, **kw):
    page = dict(class_text="1", method="classifier", scale=4, sampler="ddim", steps="10", num_samples=3, seed=5)
    return request(p, args, **{**page, **kw})


def test_each_method_sets_its_sample_options():
    weak = tiny_pipeline(null_class=True).model
    p = tiny_pipeline(null_class=True, weak_model=weak, x0_classifier=tiny_pipeline().classifier)
    assert available_methods(p) == list(METHODS)
    seen = {name: ask(p, method=name, scale=2.5)[2] for name in METHODS}
    fields = ("scale", "cfg_scale", "autoguide_scale", "x0_scale")
    assert {name: tuple(getattr(o, f) for f in fields) for name, o in seen.items()} == {
        "none": (0.0, 1.0, 1.0, 0.0), "classifier": (2.5, 1.0, 1.0, 0.0), "classifier-free": (0.0, 2.5, 1.0, 0.0),
        "autoguidance": (0.0, 1.0, 2.5, 0.0), "x0-classifier": (0.0, 1.0, 1.0, 2.5)}
    assert available_methods(tiny_pipeline()) == ["none", "classifier"]
    # the command line's sampler flags are kept; the page's sampler and steps replace its own
    args = build_parser().parse_args(["--eta", "0.5", "--no-clip", "--sampler", "pc", "--steps", "77"])
    opts = ask(p, args)[2]
    assert (opts.settings["eta"], opts.clip, opts.sampler, opts.steps) == (0.5, "none", "ddim", "10")
    labels, seeds, opts = ask(p, class_text="0, 2", num_samples=4, seed=7)
    assert labels.tolist() == [0, 2, 0, 2] and seeds.tolist() == [7, 8, 9, 10]
    assert (opts.sampler, opts.steps) == ("ddim", "10")
    assert ask(p, class_text="")[0].tolist() == [0, 1, 2]  # no class: every class


@pytest.mark.parametrize("kw, message", [
    (dict(scale=-1), r"guidance scale must be a number of 0 or more, got -1"),
    (dict(scale=math.nan), r"guidance scale must be a number of 0 or more, got nan"),
    (dict(scale=None), r"guidance scale must be a number of 0 or more, got None"),
    (dict(class_text="zebra"), r"class 'zebra': this model has no label map"),
    (dict(class_text="7"), r"class 7 is outside the model's 3 classes"),
    (dict(num_samples=0), r"number of samples must be a whole number from 1 to 100, got 0"),
    (dict(num_samples=2.5), r"number of samples must be a whole number"),
    (dict(seed=-3), r"seed must be a whole number of 0 or more, got -3"),
    (dict(method="magic"), r"unknown guidance method 'magic'"),
    (dict(sampler="euler"), r"unknown sampler 'euler'"),
    (dict(sampler="langevin"), r"needs an NCSN model"),
    (dict(method="classifier-free"), r"needs a class-conditional model trained with label dropout"),
    (dict(method="autoguidance"), r"needs a weaker model"),
])
def test_bad_requests_get_one_line(kw, message):
    with pytest.raises(GuidedError, match=message):
        ask(tiny_pipeline(), **kw)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("sampler, steps", [("ddpm", "10"), ("dpm++", "quad10"), ("pc", "10")])
def test_stream_shows_x0_along_the_way_and_the_same_samples(channels, sampler, steps):
    # clip_guided where it changes the sampler, as the shipped models' configs say: pc's unclipped score
    # saturates this random-weight network's images from the first step, and there is nothing to preview
    p = tiny_pipeline(channels, defaults=SamplingConfig(clip_guided=True))
    labels, seeds, opts = ask(p, sampler=sampler, steps=steps)
    events = list(stream(p, labels, seeds, opts, "cpu"))
    done = [d for d, _, _ in events]
    assert done == sorted(done) and 0 <= done[0] < 0.2 and done[-1] == 1.0
    previews, samples = events[-1][1], events[-1][2]
    assert all(s is None for _, _, s in events[:-1])
    # the preview hook leaves the samples untouched: bit-identical to a run without it
    assert np.array_equal(samples, to_uint8(sample_batch(p, labels, seeds, opts)))
    assert [round(d, 6) >= m for (d, _), m in zip(previews, PREVIEW_AT)] == [True] * len(PREVIEW_AT)
    assert all(x0.shape == (3, 8, 8, 3) and x0.dtype == np.uint8 for _, x0 in previews)
    if channels == 1:  # a grey model's images are grey in three equal channels
        assert all((a == a[..., :1]).all() for a in [samples] + [x0 for _, x0 in previews])
    # the x0 estimate sharpens towards the sample: the last one is closer than the first
    gap = [np.abs(x0.astype(int) - samples.astype(int)).mean() for _, x0 in previews]
    assert gap[-1] < gap[0]
    # a 3-sample grid of 8-pixel images, 8x zoom, 1-pixel borders: 3 * 10 * 8 wide, one row
    g = grid(samples, labels)
    assert g.size == (3 * 10 * 8, 10 * 8) and g.mode == "RGB"
    t = trajectory(previews, samples)
    assert t.size == ((len(PREVIEW_AT) + 1) * 80, 3 * 80)


def test_a_page_that_goes_away_stops_the_sampling_thread():
    p = tiny_pipeline()
    labels, seeds, opts = ask(p, sampler="ddpm", steps="1000")
    threads = threading.active_count()
    events = stream(p, labels, seeds, opts, "cpu")
    next(events)
    assert threading.active_count() == threads + 1
    start = time.perf_counter()
    events.close()  # as Gradio does when the browser leaves: the thread ends at its next step, joined
    assert threading.active_count() == threads
    assert time.perf_counter() - start < 5  # 1,000 steps would take far longer


def write_results(folder, rows=((0, 61.0, 0.87), (4, 41.6, 0.96))):
    """A sweep's results.json as guided.evaluation.sweeps.save_results writes it (one seed per value)."""
    one = lambda v: {"mean": v, "std": None, "min": v, "max": v}  # noqa: E731
    summary = [{"scale": s, "seeds": 1, "num_samples": 10, "fid": one(f), "judge_accuracy": one(a)} for s, f, a in rows]
    (folder / "results.json").write_text(json.dumps({"param": "scale", "summary": summary, "runs": []}))


def test_read_sweep(tmp_path):
    write_results(tmp_path)
    Image.new("RGB", (40, 30), "white").save(tmp_path / "sweep.png")
    (tmp_path / "scale_4").mkdir()
    Image.new("L", (20, 10)).save(tmp_path / "scale_4" / "grid.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    header, rows, plots = read_sweep(tmp_path)  # the rows of results.csv, read from results.json
    assert header[:4] == ["scale", "seeds", "num_samples", "fid_mean"] and "judge_accuracy_mean" in header
    assert [r[:4] for r in rows] == [[0, 1, 10, 61.0], [4, 1, 10, 41.6]]
    assert [(cap, im.size) for im, cap in plots] == [("sweep.png", (40, 30)), ("scale_4/grid.png", (20, 10))]
    with pytest.raises(GuidedError, match="is not a folder"):
        read_sweep(tmp_path / "nowhere")
    with pytest.raises(GuidedError, match="holds no results.json"):
        read_sweep(tmp_path / "scale_4")


# -- the real page, in headless Chromium --------------------------------------------------------
def _browser_or_skip():
    """Skip only where the demo extra or Debian's chromium + chromium-driver are not installed."""
    pytest.importorskip("gradio", reason='the demo extra is not installed (pip install -e ".[demo]")')
    pytest.importorskip("selenium", reason='selenium is not installed (pip install -e ".[test]")')
    from demo_browser import CHROMEDRIVER, CHROMIUM
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")


def test_the_page_in_a_real_browser(tmp_path):
    """Starts guided-demo on the shipped digits models on a free port, drives the page in headless
    Chromium (generate, bad input, the sweep tab) and stops the server with SIGTERM."""
    _browser_or_skip()
    from omegaconf import OmegaConf

    import demo_browser as web
    from guided.generation.loading import SHIPPED

    size = OmegaConf.load(SHIPPED / "cond.yaml").model.image_size
    server = web.DemoServer("--steps", "10", "--num-samples", "4", tmp=tmp_path)
    driver = None
    try:
        driver = web.chromium()
        driver.get(server.url)
        web.wait_for(driver, lambda d: d.find_elements("id", "generate"))
        assert driver.title == "guided demo" and "guided: cond" in driver.page_source

        status = web.generate(driver, **{"class": 3, "scale": 4})
        assert status.startswith("4 samples, class 3, classifier guidance at scale 4, ddpm 10 steps"), status
        zoom = max(1, 64 // size)  # a row of 4 images with 1-pixel borders, zoomed to 64-pixel cells
        samples = web.image(driver, "samples")
        assert samples.size == (4 * (size + 2) * zoom, (size + 2) * zoom) and samples.mode in ("L", "RGB")
        assert np.asarray(samples).std() > 20  # digits on a background, not a blank
        steps = web.image(driver, "previews")
        assert steps.size == ((len(PREVIEW_AT) + 1) * (size + 2) * zoom, 4 * (size + 2) * zoom)

        status = web.generate(driver, scale=-1)
        assert status == "Error: the guidance scale must be a number of 0 or more, got -1", status
        assert not driver.find_elements("css selector", "#samples img")
        status = web.generate(driver, **{"class": "zebra", "scale": 4})
        assert status.startswith("Error: class 'zebra' is not in this label map (10 classes: 0, 1, 2"), status

        sweep = tmp_path / "sweep"
        sweep.mkdir()
        write_results(sweep)
        Image.new("RGB", (120, 80), "navy").save(sweep / "sweep.png")
        driver.find_element("xpath", "//button[@role='tab' and contains(., 'Sweep')]").click()
        web.field(driver, "sweep-folder", sweep)
        driver.find_element("id", "sweep-load").click()
        web.wait_for(driver, lambda d: "2 rows from" in web.text_of(d, "sweep-status"))
        table = web.text_of(driver, "sweep-table")
        assert all(v in table for v in ("judge_accuracy_mean", "61", "41.6", "0.96")), table
        assert driver.find_elements("css selector", "#sweep-plots img")
        web.field(driver, "sweep-folder", tmp_path / "nowhere")
        driver.find_element("id", "sweep-load").click()
        web.wait_for(driver, lambda d: "is not a folder" in web.text_of(d, "sweep-status"))

        driver.find_element("xpath", "//button[@role='tab' and contains(., 'Generate')]").click()
        web.field(driver, "class", 3)
        web.field(driver, "steps", 1000)  # a long run, stopped part-way: the server ends it and exits
        driver.find_element("id", "generate").click()
        web.wait_for(driver, lambda d: web.text_of(d, "status").startswith("sampling: "))
    finally:
        code = server.stop()
        if driver is not None:
            driver.quit()
    assert code == 143, server.output()  # stopped by SIGTERM, as a stopped program exits
    assert "guided-demo: stopped" in server.output() and "Traceback" not in server.output()
    assert not server.answers()


def test_a_port_it_cannot_serve_on_is_one_line(capsys):
    from guided.cli.demo import main

    assert main(["--port", "70000"]) == 2
    assert capsys.readouterr().err == "error: --port must be a TCP port from 1 to 65535, got 70000\n"
    pytest.importorskip("gradio", reason='the demo extra is not installed (pip install -e ".[demo]")')
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--device", "cpu", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot serve on 127.0.0.1:{port} (") and err.count("\n") == 1, err


def test_a_grey_model_on_the_page():
    """A one-channel model (the digits models are being retrained grey) shows grey grids."""
    _browser_or_skip()
    import demo_browser as web
    from guided.cli.demo import build_page, build_parser

    args = build_parser().parse_args(["--steps", "10", "--num-samples", "3", "--class", "1", "--method", "none"])
    page, port = build_page(tiny_pipeline(channels=1), args, "cpu"), web.free_port()
    page.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    driver = None
    try:
        driver = web.chromium()
        driver.get(f"http://127.0.0.1:{port}/")
        web.wait_for(driver, lambda d: d.find_elements("id", "generate"))
        assert web.generate(driver).startswith("3 samples, class 1, no guidance, ddpm 10 steps")
        samples, steps = web.image(driver, "samples"), web.image(driver, "previews")
        assert samples.size == (3 * 80, 80) and steps.size == ((len(PREVIEW_AT) + 1) * 80, 3 * 80)
        for im in (samples, steps):  # grey: every pixel's channels are equal
            a = np.asarray(im.convert("RGB"))
            assert (a == a[..., :1]).all() and a.std() > 10
    finally:
        if driver is not None:
            driver.quit()
        page.close()


def test_the_status_line_says_what_ran():
    """An empty class once showed as 'class ,', and ode as 'ode 50 steps'; --help said 100 steps for 50."""
    from guided.cli.demo import describe
    from guided.generation import SampleOptions

    opts = SampleOptions(sampler="ddim", steps="10", scale=4.0, cfg_scale=2.0)
    assert describe(np.array([0, 1, 2, 0]), opts) == ("classes 0, 1, 2, classifier guidance at scale 4 + "
                                                       "classifier-free guidance at scale 2, ddim 10 steps")
    assert describe(np.array([-1, -1]), SampleOptions(sampler="ode")).startswith("unconditional, no guidance, ode (")
    assert "ode 50" not in describe(np.array([3]), SampleOptions(sampler="ode", steps="50"))
    text = " ".join(build_parser().format_help().split())
    assert "(default: 50; the ode and langevin" in text and "default: 100" not in text


def test_the_page_starts_on_the_samplers_of_sample_guided():
    """The shipped models start on their few-step default (dpm++2m-sde, karras20), as sample_guided.py
    does asked for no --sampler or --steps; any other model, or a --steps given, on ddpm (50 steps)."""
    from guided.cli.demo import start

    def started(*argv):
        args = build_parser().parse_args(list(argv))
        p = load_pipeline("uncond")
        if args.model != "cond":  # a model whose config sets no sampling defaults
            p = dataclasses.replace(p, defaults=SamplingConfig())
        return start(args, p)[2:]

    assert started() == ("dpm++2m-sde", "karras20")
    assert started("--steps", "10") == ("ddpm", "10")
    assert started("--model", "runs/mine") == ("ddpm", "50")
    assert started("--sampler", "ddim") == ("ddim", "50")
