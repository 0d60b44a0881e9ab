"""The resumable sample writer: N samples into a folder in the paper's npz layout.

`generate` draws batch by batch (guided.generation.pipeline.sample_batch), each finished batch
saved atomically to parts/ so an interrupted run resumes where it stopped; rank r of a world of
processes draws every world-th batch and rank 0 holds the folder's lock and assembles
samples.npz, grid.png and settings.json, one batch in memory at a time.
"""
from __future__ import annotations

import json
import re
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from guided.errors import GuidedError
from guided.files import atomic_write
from guided.generation.images import grid_image, labels_of, ruin, say, to_uint8
from guided.generation.options import SampleOptions, active_methods
from guided.generation.pipeline import Pipeline, check_labels, sample_batch
from guided.locks import first_rank, lock_folder
from guided.generation.resolve import resolve


def write_output(path: Path, write) -> None:
    """checkpoints.atomic_write, with a failed write (disk full, no permission) turned into one line."""
    try:
        atomic_write(path, write)
    except OSError as e:
        raise GuidedError(f"cannot write {path}: {e.strerror or e}; the previous files are untouched") from None


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The paper's evaluation layout: arr_0 uint8 N x H x W x C, arr_1 the labels."""
    write_output(Path(path), lambda f: np.savez(f, images, labels))


def save_grid(path: Path, images: np.ndarray, labels: np.ndarray, columns: int = 10, min_cell: int = 64) -> None:
    """grid_image written as a PNG."""
    pil = grid_image(images, labels, columns, min_cell)
    write_output(Path(path), lambda f: pil.save(f, format="PNG"))


def generate(p: Pipeline, out_dir, *, classes: list[int], num_samples: int, batch_size: int, seed: int,
             opts: SampleOptions, device="cpu", overwrite=False, save_pngs=False, init=None,
             rank: int = 0, world_size: int = 1, barrier=None, settings: Optional[dict] = None,
             grid: int = 10, class_sampling: str = "balanced") -> Path:
    """Draw `num_samples` into out_dir/samples.npz, grid.png (`grid` samples per class) and settings.json.

    Batches are saved to out_dir/parts/ as they finish; a rerun with the same
    settings keeps them and draws only what is missing. Rank r of `world_size`
    draws batches r, r + world_size, ...; rank 0 holds the folder's lock and
    assembles the output. Labels and seeds are computed per batch, and the
    output is written batch by batch, so memory does not grow with num_samples.
    """
    out = Path(out_dir)
    if num_samples < 1 or batch_size < 1:
        raise GuidedError("--num-samples and --batch-size must be positive")
    if not 0 <= seed <= 2**63 - num_samples:  # sample i is seeded with seed + i, a 64-bit integer
        raise GuidedError(f"--seed {seed} is out of range: sample i uses seed + i, which must stay below 2**63 "
                          f"(at most {2**63 - num_samples} for {num_samples} samples)")
    labels_of(classes, [], class_sampling)  # an unknown class sampling is refused here
    opts = resolve(p, opts, editing=init is not None)  # the policy, once; every value checked before any file
    check_labels(p, classes, opts)
    enforced = bool(classes) and (p.conditional or bool(opts.scale) or bool(opts.x0_scale))
    if classes and not enforced and rank == 0:
        say(f"note: the labels are requests that nothing enforces: {p.name} samples without labels and no "
            f"classifier guides it (--scale 0), so the samples are random draws recorded with the classes asked")
    names = None if p.label_map is None else [f"{p.label_map.keys[c]} {p.label_map.names[c]}".strip()
                                              if p.label_map.keys[c] != p.label_map.names[c] else p.label_map.keys[c]
                                              for c in classes]
    record = dict(settings or {}, num_samples=num_samples, batch_size=batch_size, seed=seed, classes=classes,
                  class_names=names, class_sampling=class_sampling, labels_enforced=enforced,
                  options=asdict(opts))  # parts/ of another batch size do not fit
    if not p.space.bounded:  # a latent model: the VAE that decodes its samples
        record["vae"] = p.space.source
    per_sample = int(np.prod(p.image_shape()))  # bytes of one uint8 image
    lock = first_rank(lambda: _claim(out, record, overwrite, num_samples * per_sample), rank, world_size)
    try:
        if barrier:  # the other ranks start once rank 0 has prepared the folder
            barrier()
        label_fn = lambda idx: labels_of(classes, idx, class_sampling, seed)  # noqa: E731
        _draw(p, out, label_fn, num_samples, batch_size, seed, opts, device, init, rank, world_size)
        if barrier:
            barrier()
        if rank == 0:
            _assemble(out, num_samples, batch_size, record, save_pngs, grid)
    finally:
        if lock is not None:
            lock.release()
    return out / "samples.npz"


def _part(out: Path, start: int) -> Path:
    return out / "parts" / f"batch-{start:08d}.npz"


def _draw(p, out, label_fn, num_samples, batch_size, seed, opts, device, init, rank, world_size) -> None:
    """This rank's batches that parts/ does not hold yet, each saved as it finishes."""
    starts = range(0, num_samples, batch_size)[rank::world_size]
    done = {int(f.name[6:14]) for f in (out / "parts").glob("batch-*.npz")}
    size = lambda s: min(batch_size, num_samples - s)  # noqa: E731
    total = len(starts) * batch_size - (batch_size - size(starts[-1]) if starts else 0)  # no loop over the plan
    bar = tqdm(total=total, initial=sum(size(s) for s in done if s in starts), desc="samples", unit="img",
               disable=rank != 0)
    ruined = []
    try:
        for s in starts:
            if s in done or _part(out, s).exists():
                continue
            idx = np.arange(s, s + size(s))
            labels = label_fn(idx)
            x = sample_batch(p, np.maximum(labels, 0), seed + idx, opts, device=device, init=init, progress=rank == 0)
            images = checked_images(x, s, out, opts, ruined)
            save_npz(_part(out, s), images, labels)
            bar.update(len(idx))
    finally:  # an error message then starts on a line of its own
        bar.close()
    if len(ruined) > 1:
        say(f"warning: {len(ruined)} batches of this run look ruined (batches {ruined[0]}..{ruined[-1]})")


def checked_images(x: torch.Tensor, start: int, out: Path, opts: SampleOptions, ruined: list) -> np.ndarray:
    """uint8 images of a finished batch; non-finite samples are an error (the finished batches
    stay in parts/), a batch that looks ruined (images.ruin) a warning (the first one of a run)."""
    where = f"batch {start} (samples {start}..{start + len(x) - 1})"
    why = f" (is --scale {opts.scale:g} too large?)" if opts.scale else ""
    if not torch.isfinite(x).all():
        kept = len(list((out / "parts").glob("batch-*.npz")))
        raise GuidedError(f"{where} came out NaN or infinite: the sampler diverged{why}; "
                          + (f"the finished batches are kept in {out / 'parts'} ({kept})" if kept else
                             "no batch had finished"))
    images = to_uint8(x)
    seen = ruin(images)
    if seen is not None:
        ruined.append(start)
        if len(ruined) == 1:
            say(f"warning: {where} looks ruined: {seen}; {remedy(opts)}")
    return images


def remedy(opts: SampleOptions) -> str:
    """What to do about a ruined batch: lower the guidance that is on, else look at the model and steps."""
    on = [f"{m.flag} {getattr(opts, m.scale):g}" for m in active_methods(opts)]
    on += [f"--guide {name}={t['scale']:g}" for name, t in opts.terms.items()]
    if on:
        return (f"the guidance is too strong: lower {' / '.join(on)} (the shipped digits models stay clean up to "
                f"--scale 1000; docs: Sampling, Ruined batches)")
    return "no guidance is on: check the model (is it trained?) and try more --steps"


def _claim(out: Path, record: dict, overwrite: bool, output_bytes: int):
    """Rank 0: check the disk, take the folder's lock, then check and prepare it; the lock is returned."""
    check_room(out, output_bytes)
    lock = lock_folder(out)
    try:
        _prepare_out(out, record, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


OUTPUTS = ("samples.npz", "grid.png", "settings.json")  # what a run writes into its folder, with images/ (--png)
PNG_NAME = re.compile(r"\d{6,}_class-?\d+\.png")


def _prepare_out(out: Path, record: dict, overwrite: bool) -> None:
    if (out / "samples.npz").exists():
        if not overwrite:
            raise GuidedError(f"{out} already holds samples.npz; pass --overwrite to replace it or choose another --out")
        clear_outputs(out)
    try:
        (out / "parts").mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, disk full
        raise GuidedError(f"cannot use {out} as the output folder: {e.strerror or e}") from None
    plan = out / "parts" / "plan.json"
    text = json.dumps(record, sort_keys=True, default=str)
    if plan.exists() and plan.read_text() != text:
        done = sorted((out / "parts").glob("batch-*.npz"))  # other settings: earlier batches do not belong
        if done:
            old = json.loads(plan.read_text())
            diff = [k for k in dict.fromkeys([*old, *record]) if json.dumps(old.get(k), sort_keys=True, default=str)
                    != json.dumps(record.get(k), sort_keys=True, default=str)]
            say(f"note: {out} held {len(done)} finished batch(es) of an interrupted run with other settings "
                f"({', '.join(diff[:4])}); they do not belong to this run and are discarded (rerun with the old "
                f"settings to resume that run instead)")
        for f in done:
            f.unlink()
    write_output(plan, lambda f: f.write(text.encode()))


def clear_outputs(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote (its samples, grid, settings and per-sample PNGs),
    so nothing of it is left beside the new run's files; files of other names are not touched."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    images = out / "images"
    if images.is_dir():
        for f in images.iterdir():
            if PNG_NAME.fullmatch(f.name):
                f.unlink()
        if not any(images.iterdir()):
            images.rmdir()


def check_room(out: Path, output_bytes: int) -> None:
    """Refuse a run whose batches plus samples.npz cannot fit on the disk of `out`."""
    kept = sum(f.stat().st_size for f in (out / "parts").glob("batch-*.npz"))
    disk = next(d for d in (out, *out.absolute().parents) if d.is_dir())  # out may not exist yet
    need, free = 2 * output_bytes - kept, shutil.disk_usage(disk).free
    if need > free:
        raise GuidedError(f"the samples need about {_size(need)} on disk (the batches in parts/, then samples.npz) "
                          f"but {out} has {_size(free)} free: lower --num-samples or choose another --out")


def _size(n: int) -> str:
    return next(f"{n / 1024**k:.1f} {u}" for k, u in ((4, "TB"), (3, "GB"), (2, "MB"), (0, "bytes"))
                if n >= 1024**k or k == 0)


def _assemble(out: Path, num_samples: int, batch_size: int, record: dict, save_pngs: bool, grid: int) -> None:
    """samples.npz, grid.png, the PNGs and settings.json from parts/, one batch in memory at a time."""
    starts = range(0, num_samples, batch_size)
    write_output(out / "samples.npz", lambda f: _stream_npz(f, out, starts, num_samples))
    shown: dict[int, list] = {}
    for s in starts:
        with np.load(_part(out, s)) as part:
            images, labels = part["arr_0"], part["arr_1"]
        for img, y in zip(images, labels):
            if len(shown.setdefault(int(y), [])) < grid:
                shown[int(y)].append(img)
        if save_pngs:
            _save_pngs(out / "images", s, images, labels)
    if grid > 0:  # as many columns as the fullest class shows (at most `grid`): no empty white cells
        ys = sorted(shown)
        save_grid(out / "grid.png", np.stack([i for y in ys for i in shown[y]]),
                  np.array([y for y in ys for _ in shown[y]]), columns=max(len(v) for v in shown.values()))
    write_output(out / "settings.json", lambda f: f.write((json.dumps(record, indent=1, default=str) + "\n").encode()))
    for f in (out / "parts").glob("*"):
        f.unlink()
    (out / "parts").rmdir()


def _stream_npz(f, out: Path, starts: range, n: int) -> None:
    """The paper's npz layout (as np.savez writes it: arr_0 images, arr_1 labels) written one
    batch file at a time, where np.savez would need every sample in memory at once."""
    with np.load(_part(out, 0)) as first:
        shapes = {key: first[key].shape[1:] for key in ("arr_0", "arr_1")}
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, dtype in (("arr_0", np.uint8), ("arr_1", np.int64)):
            with z.open(f"{key}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": (n, *shapes[key])}
                np.lib.format.write_array_header_1_0(member, header)
                for s in starts:
                    with np.load(_part(out, s)) as part:
                        member.write(np.ascontiguousarray(part[key], dtype=dtype).tobytes())


def _save_pngs(folder: Path, start: int, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels), start):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}_class{y}.png")
