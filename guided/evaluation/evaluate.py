"""Sample batches against a reference batch: FID, sFID, IS, precision, recall, and the npz files behind them.

The files use the ADM paper's layout: `arr_0` uint8 N x H x W x C (C = 3, or 1), optional
`arr_1` integer labels (`NpzImages` streams them, `read_npz` / `write_npz`). `evaluate`
computes the metrics of openai/guided-diffusion's `evaluations/evaluator.py` (the formulas
are guided.evaluation.metrics), plus FD-DINOv2, with warnings for distances from too few
images; `evaluate_files` does so for several sample files (one per seed), and
`format_result` / `format_summary` put the numbers into lines with the sample count behind
each. Reference features and statistics are cached next to the reference file as
REF.<features>.stats.npz and redone when the reference file (size, mtime) or the feature
network changes. The command line is guided.cli.evaluate.
"""

import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from guided.files import atomic_write
from guided.errors import GuidedError
from guided.evaluation.extractor import compute_features
from guided.evaluation.features import get_extractor
from guided.evaluation.metrics import (fd_count_warnings, feature_stats, frechet_distance, inception_score, precision_recall,
                            summarize)

CACHE_VERSION = 1
LAYOUT = "expected arr_0 = uint8 images N x H x W x C with C = 1 or 3"


def _one_line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _read_exact(f, size):
    data = b""
    while len(data) < size:
        chunk = f.read(size - len(data))
        if not chunk:
            raise GuidedError(f"npz array data ends early ({len(data)} of {size} bytes); the file is truncated")
        data += chunk
    return data


def _npy_header(f):
    """(shape, fortran_order, dtype) of an .npy stream, or None for header versions we do not stream."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


class NpzImages:
    """The validated `arr_0` of an npz file, read in batches without loading it whole
    (as the evaluator's StreamingNpzArrayReader does)."""

    def __init__(self, path):
        self.path = str(path)
        if os.path.isdir(self.path):
            raise GuidedError(f"{self.path} is a folder, not an .npz file; {LAYOUT}")
        if not os.path.isfile(self.path):
            raise GuidedError(f"no such file: {self.path}")
        if os.path.getsize(self.path) == 0:
            raise GuidedError(f"{self.path} is empty (0 bytes); {LAYOUT}")
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = set(zf.namelist())
                if "arr_0.npy" not in names:
                    raise GuidedError(f"{self.path} has no arr_0 array; {LAYOUT}")
                with zf.open("arr_0.npy") as f:
                    header = _npy_header(f)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise GuidedError(f"cannot read {self.path} as an .npz file ({_one_line(e)}); {LAYOUT}") from None
        self.has_labels = "arr_1.npy" in names
        self._stream = header is not None and not header[1] and not header[2].hasobject
        if header is None:
            arr = np.load(self.path)["arr_0"]
            header = (arr.shape, False, arr.dtype)
        self.shape, self.dtype = tuple(header[0]), header[2]
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] not in (1, 3):
            raise GuidedError(f"{self.path}: arr_0 is {self.dtype} of shape {self.shape}; {LAYOUT}")
        if self.shape[0] == 0:
            raise GuidedError(f"{self.path} holds 0 images; {LAYOUT}")

    def __len__(self):
        return self.shape[0]

    def num_batches(self, batch_size):
        return -(-len(self) // batch_size)

    def batches(self, batch_size):
        """Yield uint8 arrays of up to `batch_size` images."""
        if not self._stream:
            arr = np.load(self.path)["arr_0"]
            for i in range(0, len(arr), batch_size):
                yield arr[i:i + batch_size]
            return
        row = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _npy_header(f)
            for i in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - i)
                data = bytearray(_read_exact(f, n * row))  # writable, so torch.from_numpy does not warn
                yield np.frombuffer(data, np.uint8).reshape(n, *self.shape[1:])

    def labels(self):
        """`arr_1` as int64, or None if absent."""
        if not self.has_labels:
            return None
        labels = np.load(self.path)["arr_1"]
        if labels.ndim != 1 or len(labels) != len(self) or not np.issubdtype(labels.dtype, np.integer):
            raise GuidedError(f"{self.path}: arr_1 must hold one integer label per image, "
                              f"got {labels.dtype} of shape {labels.shape} for {len(self)} images")
        return labels.astype(np.int64)


def read_npz(path):
    """Load and validate an npz in the paper's layout: returns (images uint8 NHWC, labels or None)."""
    npz = NpzImages(path)
    labels = npz.labels()
    return np.concatenate(list(npz.batches(4096))), labels


def write_npz(path, images, labels=None):
    """Write uint8 N x H x W x C images (C = 1 or 3) and optional labels as `arr_0`/`arr_1`.

    The file appears atomically at exactly `path` (no ".npz" is appended).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise GuidedError(f"write_npz: images are {images.dtype} of shape {images.shape}; {LAYOUT}, N > 0")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise GuidedError(f"write_npz: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
        arrays["arr_1"] = labels.astype(np.int64)
    try:
        atomic_write(Path(path), lambda f: np.savez(f, **arrays))
    except OSError as e:  # a read-only folder, a full disk: one line, the old file untouched
        raise GuidedError(f"cannot write {path}: {e.strerror or e}") from None
    return str(path)


def stats_cache_path(reference_npz, extractor):
    """REF.npz -> REF.<features>.stats.npz, next to the reference file."""
    p = str(reference_npz)
    return Path((p[:-4] if p.endswith(".npz") else p) + f".{extractor.name}.stats.npz")


def _fingerprint(path, extractor):
    st = os.stat(path)
    return f"v{CACHE_VERSION}|size={st.st_size}|mtime_ns={st.st_mtime_ns}|{extractor.cache_key}"


STATS = (("pool", "mu", "sigma"), ("spatial", "mu_s", "sigma_s"))


def _stats(feats):
    """mu, sigma (pool) and mu_s, sigma_s (spatial, where the extractor has it)."""
    out = {}
    for key, mu, sigma in STATS:
        if key in feats:
            out[mu], out[sigma] = feature_stats(feats[key])
    return out


def reference_features(reference, extractor, batch_size=64, progress=True, use_cache=True):
    """Pool features and FD statistics of the reference batch, cached next to it."""
    cache, key = stats_cache_path(reference.path, extractor), _fingerprint(reference.path, extractor)
    if use_cache and cache.is_file():
        try:
            with np.load(cache) as c:
                if str(c["fingerprint"]) == key:
                    return {k: c[k] for k in c.files if k != "fingerprint"}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: recompute and overwrite
    feats = compute_features(extractor, reference.batches(batch_size), reference.num_batches(batch_size),
                             progress, desc="reference features")
    out = {"pool": feats["pool"].astype(np.float32), **_stats(feats)}
    if use_cache:
        try:  # atomic, so a concurrent reader never sees half a file
            atomic_write(cache, lambda f: np.savez(f, fingerprint=np.array(key), **out))
        except OSError as e:
            print(f"warning: could not write the statistics cache {cache}: {e}", file=sys.stderr)
    return out


def _npz_stats(path):
    """mu, sigma, mu_s, sigma_s stored in the npz itself (the paper's reference batches), or None."""
    with np.load(path) as z:
        if all(k in z.files for k in ("mu", "sigma", "mu_s", "sigma_s")):
            return {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    return None


def _check_batch_size(batch_size):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GuidedError(f"batch size must be a positive integer, got {batch_size!r}")


def _judge_accuracy(probs, labels, result):
    """Share of samples the judge classifies as their label, over the labels it knows;
    labels outside its classes (-1 from an unconditional model, an ImageNet class) are
    left out with a warning instead of counting as wrong."""
    known = (labels >= 0) & (labels < probs.shape[1])
    if not known.all():
        bad = labels[~known]
        what = f"is over the other {known.sum()}" if known.any() else "is not reported"
        result["warnings"].append(f"{len(bad)} of {len(labels)} sample labels are outside the judge's "
                                  f"{probs.shape[1]} classes (e.g. {bad[0]}); judge accuracy {what}")
    if known.any():
        result["judge_accuracy"] = float(np.mean(probs[known].argmax(1) == labels[known]))
        result["num_labelled"] = int(known.sum())


def evaluate(samples_npz, reference_npz, extractor="inception", *, inception_weights=None, dinov2_weights=None,
             batch_size=64, k=3, progress=True, use_cache=True, device=None):
    """FD (FID in Inception space), sFID, Inception Score, precision and recall of samples
    against a reference batch.

    `extractor`: "inception", "dinov2", "digits" or a `guided.evaluation.features.FeatureExtractor`
    (pass one object to score many batches without reloading the network). Returns a dict
    with the distance under the extractor's `fd_key` (fid, fd_dinov2), sfid and
    inception_score where the extractor has spatial features and class probabilities,
    precision, recall, num_samples, num_reference, features, feature_dim, reference_stats
    ("batch", or "npz" for the statistics a published reference batch carries), judge_accuracy
    and num_labelled when the extractor is a classifier of the samples' arr_1 labels (the
    digits judge), and `warnings`: lines a person should read beside the numbers.
    """
    _check_batch_size(batch_size)
    if not isinstance(k, int) or k < 1:
        raise GuidedError(f"k (nearest neighbours for precision/recall) must be a positive integer, got {k!r}")
    samples, reference = NpzImages(samples_npz), NpzImages(reference_npz)
    if samples.shape[1:3] != reference.shape[1:3]:
        raise GuidedError(f"images differ in size: samples are {samples.shape[1]}x{samples.shape[2]}, "
                          f"reference is {reference.shape[1]}x{reference.shape[2]}; compare batches of one resolution")
    for name, npz in (("reference", reference), ("sample", samples)):
        if len(npz) < k + 1:
            raise GuidedError(f"the {name} batch {npz.path} has {len(npz)} images; "
                              f"precision/recall with k={k} needs at least {k + 1}")
    if isinstance(extractor, str):
        extractor = get_extractor(extractor, samples.shape[1], inception_weights, device, dinov2_weights)
    ref = reference_features(reference, extractor, batch_size, progress, use_cache)
    smp = compute_features(extractor, samples.batches(batch_size), samples.num_batches(batch_size),
                           progress, desc="sample features")
    s, r = _stats(smp), {k_: v for k_, v in ref.items() if k_ != "pool"}
    stored = _npz_stats(reference.path) if extractor.uses_npz_stats else None
    if stored:  # as the evaluator: statistics stored in an npz take precedence
        r.update(stored)
        s.update(_npz_stats(samples.path) or {})
    precision, recall = precision_recall(ref["pool"], smp["pool"], k=k, device=device)
    result = {"num_samples": len(samples), "num_reference": len(reference), "features": extractor.name,
              "feature_dim": int(smp["pool"].shape[1]), "reference_stats": "npz" if stored else "batch",
              "warnings": []}
    n_ref = None if stored else len(reference)
    for (key, mu, sigma), name in zip(STATS, (extractor.fd_key, "sfid")):
        if mu in s:
            result[name] = frechet_distance(s[mu], s[sigma], r[mu], r[sigma])
            result["warnings"] += fd_count_warnings(_LABELS.get(name, name), smp[key].shape[1], len(samples), n_ref)
    if "probs" in smp:
        result["inception_score"] = inception_score(smp["probs"])
    result.update(precision=precision, recall=recall)
    labels = samples.labels()
    if labels is not None and hasattr(extractor, "accuracy"):
        _judge_accuracy(smp["probs"], labels, result)
    return result


def evaluate_files(samples, reference_npz, features="inception", *, inception_weights=None, dinov2_weights=None,
                   batch_size=64, use_cache=True, device=None):
    """`evaluate` each of several sample files (one per seed) against one reference batch, the
    feature network (named by `features`, sized for the first file) loaded once; one result each."""
    _check_batch_size(batch_size)
    first = NpzImages(samples[0])
    extractor = get_extractor(features, first.shape[1], inception_weights, device, dinov2_weights)
    return [evaluate(f, reference_npz, extractor, batch_size=batch_size, use_cache=use_cache, device=device)
            for f in samples]


# -- reporting ---------------------------------------------------------------------------------
_LABELS = {"inception_score": "Inception Score", "fid": "FID", "fd_dinov2": "FD-DINOv2", "sfid": "sFID",
           "precision": "Precision", "recall": "Recall", "judge_accuracy": "Judge accuracy"}
METRICS = tuple(_LABELS)


def counts(res, key):
    """The sample counts behind one metric, in words."""
    n, m = res["num_samples"], res["num_reference"]
    if key == "judge_accuracy":
        return f"{res['num_labelled']} labelled samples"
    if key == "inception_score":
        return f"{n} samples"
    if key in ("precision", "recall"):
        return f"{n} samples, {m} reference, k=3"
    ref = "the reference's stored statistics" if res.get("reference_stats") == "npz" else f"{m} reference"
    return f"{n} samples, {ref}"


def format_result(res):
    """One line per metric, each with its sample count."""
    return [f"{_LABELS[key]}: {res[key]:.6g}  ({counts(res, key)})" for key in METRICS if key in res]


def format_summary(runs, names):
    """A table of several runs (one per sample file or seed) and their mean, std, min and max."""
    keys = [k for k in METRICS if any(k in r for r in runs)]
    width = max(len(n) for n in [*names, "file"])
    cell = lambda v: f"{v:>15.6g}" if v is not None else f"{'-':>15}"  # noqa: E731
    lines = [f"{'file':<{width}}  {'samples':>7}  " + "  ".join(f"{_LABELS[k]:>15}" for k in keys)]
    for name, r in zip(names, runs):
        lines.append(f"{name:<{width}}  {r['num_samples']:>7}  " + "  ".join(cell(r.get(k)) for k in keys))
    summary = {k: summarize([r.get(k) for r in runs]) for k in keys}
    for stat in ("mean", "std", "min", "max"):
        lines.append(f"{stat:<{width}}  {'':>7}  " + "  ".join(cell(summary[k][stat]) for k in keys))
    return lines, summary
