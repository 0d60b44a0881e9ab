"""guided-demo: a local web page to pick a class, a guidance method and its scale, and watch samples form.

    guided-demo                                   # the shipped digits models, http://127.0.0.1:7860
    guided-demo --model uncond --class 7 --scale 10
    python -m guided.cli.demo --model runs/imagenet64 --classifier runs/imagenet64_clf --sweep sweeps/in64

The model flags are sample_guided.py's (any model it accepts); the sampler flags set the page's
starting values. The page has two tabs: "Generate" draws a grid and shows the denoised
prediction (the x0 estimate) at a few points along the way; "Sweep" shows a sweep folder's
results.csv and its PNG plots. Needs the demo extra: pip install -e ".[demo]" (Gradio).
"""
from __future__ import annotations

import argparse
import math
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from guided.cli import Parser, run_cli
from guided.cli.options import _number, add_guidance_args, add_model_args, add_sampler_args, options, pipeline_keywords
from guided.errors import GuidedError
from guided.signals import exit_status
from guided.generation import Pipeline, SampleOptions, check_labels, grid_image, load_pipeline, plan_labels, sample_batch
from guided.generation import to_uint8
from guided.generation.loading import parse_classes
from guided.evaluation.sweeps import flat_rows, load_sweep
from guided.generation.options import METHODS as GUIDANCE
from guided.generation.runtime import check_device, default_device
from guided.generation.resolve import check_guidance, resolve
from guided.samplers.registry import SAMPLERS, sampler_for

# The guidance methods of the page (guided.generation.options.METHODS): name -> the SampleOptions fields it
# sets from the page's scale. The page lists those the pipeline has the networks for.
METHODS = {"none": lambda s: {}, **{m.demo: (lambda s, m=m: {m.scale: s}) for m in GUIDANCE}}
OFF = {m.scale: m.off for m in GUIDANCE}
SAMPLER_NAMES = tuple(SAMPLERS)
PREVIEW_AT = (0.1, 0.3, 0.5, 0.7, 0.9)  # shares of the reverse process where the x0 estimate is shown
MAX_SAMPLES = 100


def build_parser() -> Parser:
    p = Parser(prog="guided-demo", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--method", choices=tuple(METHODS), default=None,
                   help="the page's starting guidance method (default: the one whose scale is given, else as "
                        "sample_guided.py: the classifier where the model has one, else none)")
    add_guidance_args(p)  # a method's scale: the page's starting scale; intervals etc. as sample_guided.py
    add_sampler_args(p)
    for action in p._actions:  # sample_guided.py's flags the page sets itself, and its own defaults
        if action.dest == "batch_size":
            action.help = argparse.SUPPRESS
        if action.dest == "steps":
            action.help = "the page's starting respacing: a count, section counts (10,15,20), ddimN, quadN or " \
                          "karrasN (default: 50; the ode and langevin samplers choose their own; karras20 for the " \
                          "shipped cond and uncond models, which start on dpm++2m-sde)"
    p.set_defaults(num_samples=10)
    w = p.add_argument_group("server")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    w.add_argument("--port", type=_number(int, 1), default=7860)
    w.add_argument("--sweep", default=None, help="the sweep folder the Sweep tab opens with (checked at start; "
                                                 "default: sweep, if it is there)")
    return p


def available_methods(p: Pipeline) -> list[str]:
    """The methods whose networks the pipeline has: those the library's own check accepts."""
    names = []
    for name, sets in METHODS.items():
        try:
            check_guidance(p, replace(SampleOptions(), **sets(2.0)))
        except GuidedError:
            continue
        names.append(name)
    return names


def start(args, p: Pipeline) -> tuple[str, float, str, str]:
    """The page's starting method, scale, sampler and steps, by sample_guided.py's rule (resolved once against
    the loaded pipeline: guided.generation.resolve): --method, else the method whose scale is given, else the
    classifier where the model has one, else none; the scale as given, else the method's METHODS.start;
    the model's own sampler and steps, else the registry's for its kind with 50 steps."""
    opts = resolve(p, options(args, args.scale))
    own = args.sampler is None and args.steps is None and p.defaults.steps  # the model's own sampler and steps
    steps = opts.steps if args.steps or own or not SAMPLERS[opts.sampler].fixed_steps else "50"
    named = [m for m in GUIDANCE if getattr(opts, m.scale) != m.off]
    method = args.method or (named[0].demo if named else "none")
    m = next((m for m in GUIDANCE if m.demo == method), None)
    scale = 0.0 if m is None else getattr(opts, m.scale) if getattr(opts, m.scale) != m.off else m.start
    return method, scale, opts.sampler, steps


def class_choices(p: Pipeline) -> list[str]:
    if p.num_classes is None:
        return []
    return list(p.label_map.names) if p.label_map is not None else [str(i) for i in range(p.num_classes)]


def _whole(value, name, low, high=None) -> int:
    if value is None or not math.isfinite(value) or value != int(value) or value < low or (high and value > high):
        span = f"from {low} to {high}" if high else f"of {low} or more"
        raise GuidedError(f"{name} must be a whole number {span}, got {value}")
    return int(value)


def request(p: Pipeline, args, class_text, method, scale, sampler, steps, num_samples, seed):
    """The page's fields checked and turned into (labels, seeds, options); a GuidedError names what is wrong.
    `args`: the demo's command line, whose sampler flags (--eta, --no-clip, ...) the options keep."""
    if method not in METHODS:
        raise GuidedError(f"unknown guidance method {method!r}; choose one of {', '.join(METHODS)}")
    if scale is None or not math.isfinite(scale) or scale < 0:
        raise GuidedError(f"the guidance scale must be a number of 0 or more, got {scale}")
    spec = sampler_for(sampler, p.score_model.kind)  # an unknown one, or one the model cannot serve: one line
    n = _whole(num_samples, "the number of samples", 1, MAX_SAMPLES)
    seed = _whole(seed, "the seed", 0)
    classes = parse_classes(str(class_text or "").strip() or None, p)  # empty: every class
    steps = None if not spec.fixed_steps else str(steps).strip()  # ode and langevin choose their own
    opts = replace(options(args, 0.0, sampler=sampler, steps=steps), **{**OFF, **METHODS[method](float(scale))})
    opts = resolve(p, opts)  # the policy, once, as sample_guided.py
    labels = plan_labels(classes, n)
    check_labels(p, [y for y in labels if y >= 0], opts)
    return labels, seed + np.arange(n), opts


class _Stopped(Exception):
    """The page went away or the server is stopping: the sampling thread stops at its next step."""


_RUNNING = set()  # (stop event, thread) of each sampling run under way


def stop_runs() -> None:
    """End every sampling run at its next step and wait for it (a server that stops)."""
    for stop, thread in list(_RUNNING):
        stop.set()
        thread.join()
        _RUNNING.discard((stop, thread))


def stream(p: Pipeline, labels, seeds, opts, device, marks=PREVIEW_AT):
    """Sample in a thread and yield (done, previews, samples) as it goes: after each step the
    share done, with the x0 estimates at `marks` so far (uint8 NHWC arrays, as (done, images)),
    and last the samples (uint8 NHWC). A GuidedError of the sampler is raised here."""
    events, stop, previews, passed = queue.Queue(), threading.Event(), [], [0]

    def preview(done, x0):  # in the sampling thread
        if stop.is_set():
            raise _Stopped
        due = passed[0] < len(marks) and done >= marks[passed[0]]
        while passed[0] < len(marks) and done >= marks[passed[0]]:
            passed[0] += 1
        events.put((done, to_uint8(x0.float().clamp(-1, 1)) if due else None, None))

    def work():
        try:
            x = sample_batch(p, np.maximum(labels, 0), seeds, opts, device=device, preview=preview)
            events.put((1.0, None, to_uint8(x)))
        except BaseException as e:  # handed to the page's thread
            events.put(e)

    thread = threading.Thread(target=work, daemon=True)
    _RUNNING.add((stop, thread))
    thread.start()
    try:
        while True:
            e = events.get()
            if isinstance(e, _Stopped):  # the server is stopping
                return
            if isinstance(e, BaseException):
                raise e
            done, x0, samples = e
            if x0 is not None:
                previews.append((done, x0))
            yield done, list(previews), samples
            if samples is not None:
                return
    finally:  # the page went away, or the samples are in: the thread ends within a step
        stop.set()
        thread.join()
        _RUNNING.discard((stop, thread))


def describe(labels, opts: SampleOptions) -> str:
    """The status line's account of a finished request: its classes, guidance and sampler as they ran."""
    asked = list(dict.fromkeys(int(y) for y in labels if y >= 0))
    what = ("class " if len(asked) == 1 else "classes ") + ", ".join(map(str, asked)) if asked else "unconditional"
    on = [f"{m.demo} guidance at scale {getattr(opts, m.scale):g}" for m in GUIDANCE if getattr(opts, m.scale) != m.off]
    steps = f"{opts.sampler} ({SAMPLERS[opts.sampler].adaptive})" if not SAMPLERS[opts.sampler].fixed_steps else \
        f"{opts.sampler} {opts.steps} steps"
    return f"{what}, {' + '.join(on) or 'no guidance'}, {steps}"


def grid(images: np.ndarray, labels: np.ndarray):
    """One row per class, as many columns as the largest class has samples (at most 10)."""
    columns = min(10, max(np.unique(labels, return_counts=True)[1]))
    return grid_image(images, labels, columns=columns)


def trajectory(previews, samples=None, rows=4):
    """The first `rows` samples, one per row: their x0 estimates left to right, then the sample."""
    frames = [x0[:rows] for _, x0 in previews] + ([samples[:rows]] if samples is not None else [])
    k = len(frames[0])
    images = np.stack(frames, axis=1).reshape(-1, *frames[0].shape[1:])  # sample-major
    return grid_image(images, np.repeat(np.arange(k), len(frames)), columns=len(frames))


def read_sweep(folder):
    """(header, rows, [(PIL image, caption)]) of a sweep folder: results.csv, its PNG plots and the grids."""
    from PIL import Image

    folder = Path(str(folder).strip()).expanduser()
    if not folder.is_dir():
        raise GuidedError(f"{folder} is not a folder; give a sweep folder (python -m guided.cli.sweep --out FOLDER)")
    rows = flat_rows(load_sweep(folder))  # the one reader of a sweep's results (guided.evaluation.sweeps)
    header = list(dict.fromkeys(k for r in rows for k in r))
    rows = [header, *([r.get(k, "") for k in header] for r in rows)]
    plots = []
    for png in sorted(folder.glob("*.png")) + sorted(folder.glob("*/grid.png")):
        try:
            with Image.open(png) as im:
                plots.append((im.convert("RGB"), str(png.relative_to(folder))))
        except OSError:
            plots.append((None, f"{png.name}: not a readable image"))
    return rows[0], rows[1:], [(im, cap) for im, cap in plots if im is not None]


def generate_handler(p: Pipeline, args, device):
    """The Generate button: yields (samples grid, previews, status) as the sampling goes."""
    import gradio as gr

    def on_generate(class_text, method, scale, sampler, steps, num_samples, seed, progress=gr.Progress()):
        began = time.perf_counter()
        try:
            labels, seeds, opts = request(p, args, class_text, method, scale, sampler, steps, num_samples, seed)
            shown, percent = 0, 0
            for done, previews, samples in stream(p, labels, seeds, opts, device):
                progress(done, desc="sampling")
                if samples is not None:
                    yield (grid(samples, labels), trajectory(previews, samples),
                           f"{len(labels)} samples, {describe(labels, opts)}, seed {seeds[0]}: "
                           f"{time.perf_counter() - began:.1f} s")
                elif len(previews) > shown:  # the grid shows the newest x0 estimate until the samples come
                    shown, percent = len(previews), int(100 * done)
                    yield grid(previews[-1][1], labels), trajectory(previews), f"sampling: {percent}%"
                elif int(100 * done) >= percent + 5:
                    percent = int(100 * done)
                    yield gr.skip(), gr.skip(), f"sampling: {percent}%"
        except GuidedError as e:
            yield None, None, f"**Error:** {e}"
    return on_generate


def on_sweep(folder):
    """The Show button of the Sweep tab: the folder's table and plots."""
    import gradio as gr

    try:
        header, rows, plots = read_sweep(folder)
    except GuidedError as e:
        return gr.update(value=None), [], f"**Error:** {e}"
    return gr.update(value=rows, headers=header), plots, f"{len(rows)} rows from {folder}/results.csv"


def generate_fields(gr, p: Pipeline, args) -> list:
    """The Generate tab's inputs: class, method, scale, sampler, steps, samples, seed."""
    names = class_choices(p)
    first_method, first_scale, start_sampler, first_steps = start(args, p)
    first = ",".join(args.classes) if args.classes is not None else None  # --class x2; none: every class
    return [gr.Dropdown(names, value=first, label="class", allow_custom_value=True, elem_id="class",
                        interactive=bool(names),
                        info="a name, an index, or a comma list" if names else "this model has no classes"),
            gr.Radio(available_methods(p), value=first_method, label="guidance method", elem_id="method"),
            gr.Number(first_scale, label="guidance scale", elem_id="scale"),
            gr.Dropdown(list(SAMPLER_NAMES), value=start_sampler, label="sampler", elem_id="sampler"),
            gr.Textbox(first_steps, label="steps", elem_id="steps",
                       info="a count (50), section counts (10,15,20), ddimN, quadN or karrasN"),
            gr.Number(args.num_samples, label="samples", precision=0, elem_id="num-samples"),
            gr.Number(args.seed, label="seed", precision=0, elem_id="seed")]


def build_page(p: Pipeline, args, device):
    """The Gradio Blocks of the two tabs."""
    import gradio as gr

    with gr.Blocks(title="guided demo", analytics_enabled=False) as page:
        gr.Markdown(f"## guided: {p.name}  \nPick a class, a guidance method and its scale, and watch the "
                    "samples form.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    fields = generate_fields(gr, p, args)
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    status = gr.Markdown(elem_id="status")
                    gr.Markdown("**Samples** (one row per class; while sampling, the newest x0 estimate)")
                    samples = gr.Image(format="png", interactive=False, show_label=False, elem_id="samples")
                    gr.Markdown("**Denoised prediction (x0 estimate) along the way**: one row per sample, its "
                                f"estimate at {', '.join(f'{m:.0%}' for m in PREVIEW_AT)} of the reverse "
                                "process, then the sample")
                    previews = gr.Image(format="png", interactive=False, show_label=False, elem_id="previews")
            go.click(generate_handler(p, args, device), fields, [samples, previews, status])
        with gr.Tab("Sweep"):
            with gr.Row():
                folder = gr.Textbox(args.sweep or "sweep", label="sweep folder", elem_id="sweep-folder", scale=4)
                load = gr.Button("Show", elem_id="sweep-load", scale=1)
            sweep_status = gr.Markdown(elem_id="sweep-status")
            table = gr.Dataframe(label="results.csv", interactive=False, elem_id="sweep-table")
            plots = gr.Gallery(label="plots", columns=2, height="auto", elem_id="sweep-plots")
            load.click(on_sweep, folder, [table, plots, sweep_status])
            folder.submit(on_sweep, folder, [table, plots, sweep_status])
    return page


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(_main, args)


def _main(args) -> int:
    if args.port > 65535:
        raise GuidedError(f"--port must be a TCP port from 1 to 65535, got {args.port}")
    if args.sweep is not None:  # a folder named on the command line must be a sweep: one line now, not on the page
        read_sweep(args.sweep)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local page
    try:
        import gradio as gr
    except ImportError:
        raise GuidedError('the demo needs Gradio: pip install -e ".[demo]"') from None
    check_device(args.device)
    device = args.device or default_device()
    # the weak model and clean classifier too, so every method is offered
    pipeline = load_pipeline(**pipeline_keywords(args, device, optional=("autoguide", "x0_classifier")))
    if args.classes is not None:  # a class the model does not hold is one line now, not on Generate
        parse_classes(args.classes, pipeline)
    if args.method is not None and args.method not in available_methods(pipeline):
        raise GuidedError(f"--method {args.method}: this model offers {', '.join(available_methods(pipeline))}")
    page = build_page(pipeline, args, device)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: no font downloads
    try:
        page.queue(default_concurrency_limit=1).launch(
            server_name=args.host, server_port=args.port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
            theme=theme, footer_links=[])
    except OSError as e:
        raise GuidedError(f"cannot serve on {args.host}:{args.port} ({str(e).split('. ')[0]}): "
                          "is it in use? choose another --port") from None
    print(f"guided-demo: serving {pipeline.name} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        by = wait_for_stop()
    finally:
        stop_runs()
        page.close()
    print(f"guided-demo: stopped by {by}", flush=True)
    return exit_status(by)  # 130 after Ctrl-C, 143 after SIGTERM, as a stopped program exits


def wait_for_stop() -> str:
    """Block until SIGINT (Ctrl-C) or SIGTERM, then put the previous handlers back; the signal's name."""
    stopping, by = threading.Event(), []
    previous = {sig: signal.signal(sig, lambda sig, _: (by.append(signal.Signals(sig).name), stopping.set()))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return by[0]


if __name__ == "__main__":
    sys.exit(main())
