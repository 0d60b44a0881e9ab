"""Evaluate a sample batch against a reference batch: FID, sFID, IS, precision, recall.

    python -m guided.evaluate SAMPLES.npz REFERENCE.npz [--features inception|digits]
        [--inception-weights PATH] [--batch-size N] [--json OUT]

Both files use the ADM paper's layout: `arr_0` uint8 N x H x W x C (C = 3, or 1),
optional `arr_1` integer labels. The metrics are those of openai/guided-diffusion's
`evaluations/evaluator.py` (see guided.metrics); reference features and statistics are
cached next to the reference file as REF.<features>.stats.npz and redone when the
reference file (size, mtime) or the feature network changes.
"""

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from guided.checkpoints import atomic_write
from guided.errors import GuidedError
from guided.features import compute_features, get_extractor
from guided.metrics import feature_stats, frechet_distance, inception_score, precision_recall

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
        if not os.path.isfile(self.path):
            raise GuidedError(f"no such file: {self.path}")
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
    atomic_write(Path(path), lambda f: np.savez(f, **arrays))
    return str(path)


def stats_cache_path(reference_npz, extractor):
    """REF.npz -> REF.<features>.stats.npz, next to the reference file."""
    p = str(reference_npz)
    return Path((p[:-4] if p.endswith(".npz") else p) + f".{extractor.name}.stats.npz")


def _fingerprint(path, extractor):
    st = os.stat(path)
    return f"v{CACHE_VERSION}|size={st.st_size}|mtime_ns={st.st_mtime_ns}|{extractor.cache_key}"


def reference_features(reference, extractor, batch_size=64, progress=True, use_cache=True):
    """Pool features and FID/sFID statistics of the reference batch, cached next to it."""
    cache, key = stats_cache_path(reference.path, extractor), _fingerprint(reference.path, extractor)
    if use_cache and cache.is_file():
        try:
            with np.load(cache) as c:
                if str(c["fingerprint"]) == key:
                    return {k: c[k] for k in ("pool", "mu", "sigma", "mu_s", "sigma_s")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: recompute and overwrite
    feats = compute_features(extractor, reference.batches(batch_size), reference.num_batches(batch_size),
                             progress, desc="reference features")
    mu, sigma = feature_stats(feats["pool"])
    mu_s, sigma_s = feature_stats(feats["spatial"])
    out = {"pool": feats["pool"].astype(np.float32), "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
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


def evaluate(samples_npz, reference_npz, extractor="inception", *, inception_weights=None,
             batch_size=64, k=3, progress=True, use_cache=True, device=None):
    """FID, sFID, Inception Score, precision and recall of samples against a reference batch.

    `extractor`: "inception", "digits" or a `guided.features.FeatureExtractor`. Returns a
    dict with fid, sfid, inception_score, precision, recall, num_samples, num_reference,
    features, and judge_accuracy when the extractor is a classifier of the labels in the
    samples' arr_1 (the digits judge).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise GuidedError(f"batch size must be a positive integer, got {batch_size!r}")
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
        extractor = get_extractor(extractor, samples.shape[1], inception_weights, device)
    ref = reference_features(reference, extractor, batch_size, progress, use_cache)
    smp = compute_features(extractor, samples.batches(batch_size), samples.num_batches(batch_size),
                           progress, desc="sample features")
    s = dict(zip(("mu", "sigma"), feature_stats(smp["pool"])))
    s.update(zip(("mu_s", "sigma_s"), feature_stats(smp["spatial"])))
    r = dict(ref)
    if extractor.uses_npz_stats:  # as the evaluator: statistics stored in an npz take precedence
        r.update(_npz_stats(reference.path) or {})
        s.update(_npz_stats(samples.path) or {})
    precision, recall = precision_recall(ref["pool"], smp["pool"], k=k, device=device)
    result = {
        "fid": frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"]),
        "sfid": frechet_distance(s["mu_s"], s["sigma_s"], r["mu_s"], r["sigma_s"]),
        "inception_score": inception_score(smp["probs"]),
        "precision": precision, "recall": recall,
        "num_samples": len(samples), "num_reference": len(reference), "features": extractor.name,
    }
    labels = samples.labels()
    if labels is not None and hasattr(extractor, "accuracy"):
        result["judge_accuracy"] = float(np.mean(smp["probs"].argmax(1) == labels))
    return result


def _parser():
    from guided.cli import Parser  # one-line argparse errors, exit 2

    p = Parser(prog="python -m guided.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="sample batch .npz (arr_0: uint8 N x H x W x C)")
    p.add_argument("reference", help="reference batch .npz; statistics are cached next to it")
    p.add_argument("--features", choices=["inception", "digits"], default="inception",
                   help="feature network: the paper's Inception-v3, or the digits judge (default: inception)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="weights-inception-2015-12-05-6726825d.pth (else $GUIDED_INCEPTION_WEIGHTS, ~/.cache/guided/)")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature batch (default: 64)")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference statistics cache")
    p.add_argument("--device", help="torch device for the Inception network (default: cuda if available)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        res = evaluate(args.samples, args.reference, args.features, inception_weights=args.inception_weights,
                       batch_size=args.batch_size, use_cache=not args.no_cache, device=args.device)
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
            except OSError as e:
                raise GuidedError(f"cannot write {args.json}: {e.strerror}") from None
    except GuidedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
             ("precision", "Precision"), ("recall", "Recall"), ("judge_accuracy", "Judge accuracy")]
    for key, label in names:
        if key in res:
            print(f"{label}: {res[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
