"""Sample-quality metrics on feature arrays: FID, sFID, IS, improved precision/recall.

Pure math on numpy arrays; which network makes the features is `guided.evaluation.features`'
business. Every formula follows the evaluation suite of the ADM paper
(Dhariwal & Nichol 2021, openai/guided-diffusion `evaluations/evaluator.py`):

* FID  -- Heusel et al. 2017, "GANs trained by a two time-scale update rule converge
  to a local Nash equilibrium": Frechet distance between Gaussians fitted to
  Inception pool_3 features.
* sFID -- Nash et al. 2021, "Generating images with sparse representations": the same
  distance on spatial features (first 7 channels of Inception `mixed_6/conv`).
* IS   -- Salimans et al. 2016, "Improved techniques for training GANs".
* Precision / recall -- Kynkaenniemi et al. 2019, "Improved precision and recall metric
  for assessing generative models", k-NN manifolds with k = 3.
"""

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import xlogy

from guided.errors import GuidedError


def feature_stats(acts, chunk=4096):
    """Mean and covariance (ddof=1, like np.cov(rowvar=False)) of N x D features.

    Accumulates in float64 over row chunks, so 50k x 2048 never makes a float64 copy.
    """
    acts = np.asarray(acts)
    if acts.ndim != 2 or len(acts) < 2:
        raise GuidedError(f"feature statistics need an N x D array with N >= 2, got shape {acts.shape}")
    n, d = acts.shape
    mu = np.zeros(d, np.float64)
    for i in range(0, n, chunk):
        mu += acts[i:i + chunk].sum(0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((d, d), np.float64)
    for i in range(0, n, chunk):
        x = acts[i:i + chunk].astype(np.float64) - mu
        sigma += x.T @ x
    return mu, sigma / (n - 1)


def _sqrtm(a):
    """scipy's sqrtm, quiet about singular input like the evaluator's `sqrtm(..., disp=False)`
    (`disp` is deprecated since SciPy 1.16; non-finite results are handled by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):

        d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    As in the ADM evaluator (after TTUR's fid.py): if sqrtm of the product is not
    finite, `eps` is added to both diagonals and it is retried; a complex result is
    accepted only if the imaginary part of its diagonal is within 1e-3 of zero.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise GuidedError(
            f"feature statistics have different shapes ({mu1.shape} vs {mu2.shape}); "
            "compute both with the same feature extractor")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))  # product might be almost singular
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error might give a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise GuidedError(
                f"Frechet distance is ill-conditioned (imaginary component {m:.3g}); use more images than feature dims")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(softmax_probs, split_size=5000):
    """Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)).

    As the ADM evaluator (after openai/improved-gan): consecutive splits of
    `split_size` rows (the last one may be shorter), p(y) is each split's mean, and
    the result is the mean of the per-split scores. Terms with p(y|x) = 0 count as 0
    (the limit of p log p), so exactly one-hot inputs are allowed.
    """
    p = np.asarray(softmax_probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise GuidedError(f"inception_score needs an N x classes array of probabilities, got shape {p.shape}")
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        marginal = part.mean(0, keepdims=True)
        kl = xlogy(part, part) - xlogy(part, marginal)  # p (log p - log p(y))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _sq_dists(a, b):
    """Pairwise squared Euclidean distances max(|u|^2 - 2 u.v + |v|^2, 0), as the evaluator's
    `_batch_pairwise_distances` (which tries float16 first; here always float32)."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _as_tensor(feats, device):
    return torch.as_tensor(np.ascontiguousarray(feats, dtype=np.float32)).to(device)


def _device(device):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def manifold_radii(feats, k=3, block=4096, device=None):
    """Squared distance from each row to its k-th nearest neighbour (itself excluded).

    Kynkaenniemi et al. 2019, sec. 3: the manifold is the union of balls around each
    feature with radius NND_k. Rows are processed in blocks, keeping a running k+1
    smallest (self included at distance 0), so memory is O(block^2).
    """
    x = _as_tensor(feats, _device(device))
    n = len(x)
    radii = torch.empty(n, device=x.device)
    for i in range(0, n, block):
        rows, best = x[i:i + block], None
        for j in range(0, n, block):
            d = _sq_dists(rows, x[j:j + block])
            d = d if best is None else torch.cat([best, d], 1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[i:i + block] = best[:, k]
    return radii


def precision_recall(ref_feats, sample_feats, k=3, block=4096, device=None):
    """Improved precision and recall (Kynkaenniemi et al. 2019, eq. 1-2), k-NN with k = 3.

    precision = fraction of samples inside the reference manifold,
    recall    = fraction of reference features inside the sample manifold,
    where x is inside a manifold if |x - phi|^2 <= NND_k(phi)^2 for some phi of it.
    Distances are float32 on `device` (default: cuda if available); the evaluator tries
    float16 first, which only speeds it up. Returns (precision, recall) as floats.
    """
    ref = np.asarray(ref_feats)
    smp = np.asarray(sample_feats)
    for name, f in (("reference", ref), ("sample", smp)):
        if f.ndim != 2:
            raise GuidedError(f"{name} features must be N x D, got shape {f.shape}")
        if len(f) < k + 1:
            raise GuidedError(
                f"the {name} batch has {len(f)} images; precision/recall with k={k} needs at least {k + 1}")
    if ref.shape[1] != smp.shape[1]:
        raise GuidedError(f"reference and sample features differ in size ({ref.shape[1]} vs {smp.shape[1]})")
    dev = _device(device)
    r_ref, r_smp = manifold_radii(ref, k, block, dev), manifold_radii(smp, k, block, dev)
    a, b = _as_tensor(ref, dev), _as_tensor(smp, dev)
    ref_in = torch.zeros(len(a), dtype=torch.bool, device=dev)
    smp_in = torch.zeros(len(b), dtype=torch.bool, device=dev)
    for i in range(0, len(a), block):
        for j in range(0, len(b), block):
            d = _sq_dists(a[i:i + block], b[j:j + block])
            smp_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
            ref_in[i:i + block] |= (d <= r_smp[None, j:j + block]).any(1)
    return float(smp_in.double().mean()), float(ref_in.double().mean())


# -- honest counts and spread over seeds ------------------------------------------------------
MIN_FD_SAMPLES = 1000


def fd_count_warnings(metric, dim, n_samples, n_reference=None):
    """Warnings for a Frechet distance from too few images: below `dim` the covariance
    estimate is singular, and below 1,000 the distance is biased upwards and noisy
    (its expectation grows as the count shrinks), so it compares only at equal counts.
    `n_reference` None: the reference statistics came from elsewhere (a published batch)."""
    out = []
    for who, n in (("samples", n_samples), ("reference images", n_reference)):
        if n is None or n >= max(dim, MIN_FD_SAMPLES):
            continue
        why = (f"fewer than its {dim} feature dimensions: the covariance is singular" if n < dim
               else f"under {MIN_FD_SAMPLES:,}")
        out.append(f"{metric} from {n} {who} ({why}); it is biased upwards and noisy: "
                   f"compare it only with runs of the same count")
    return out


def summarize(values):
    """mean, standard deviation (ddof=1; None for one value), min and max of a metric over
    seeds, and how many values went in."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
