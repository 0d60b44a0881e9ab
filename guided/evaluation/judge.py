"""An independent digits classifier (the "judge") to score samples of the digits data set.

Not the project's noise-aware guidance classifier: a small CNN trained once, on clean
images only, on scikit-learn's `load_digits` (1,797 8x8 images, values 0..16, 10
classes) upsampled bilinearly to `image_size`. It answers "is this sample recognisably
the digit that was asked for?" (`judge.accuracy`), and doubles as a feature space for
the metrics (`guided.evaluation.extractor.FeatureExtractor`): pool = penultimate layer (64 dims),
spatial = first 8 channels of the second conv map pooled to 4x4 (128 dims, the
analogue of the evaluator's first 7 channels of `mixed_6/conv`), probs = softmax.

Training is deterministic (fixed seed; the project's digits split: 1,500 train, 297
held out, as guided.data.digits) and takes a few seconds on a CPU; weights for 16x16 ship in
guided/assets/digits_judge.pt (regenerate with `python -m guided.evaluation.judge`).
"""

import contextlib
import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guided.errors import GuidedError
from guided.evaluation.extractor import FeatureExtractor

ASSET = Path(__file__).resolve().parents[1] / "assets" / "digits_judge.pt"
JUDGE_VERSION = 2  # bump when the data, network or recipe below changes


def digits_data(image_size=16):
    """All 1,797 digits as uint8 N x S x S x 1 (0..16 -> 0..255, bilinear upsampling) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, d.target.astype(np.int64)


def split_indices():
    """(train, held-out) indices into load_digits: the same split as guided.data.digits,
    297 held out, stratified by digit, train_test_split(random_state=0), sorted."""
    from sklearn.model_selection import train_test_split

    labels = digits_data(8)[1]
    train, held = train_test_split(np.arange(len(labels)), test_size=297, stratify=labels, random_state=0)
    return np.sort(train), np.sort(held)


class JudgeNet(nn.Module):
    """conv3x3(32) - maxpool2 - conv3x3(64) - avgpool to 4x4 - fc(64) - fc(10)."""

    def __init__(self, width=32, feat=64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, feat)
        self.fc2 = nn.Linear(feat, 10)

    def forward(self, x):
        """x: N x 1 x S x S in [-1, 1] -> (logits, pool features, conv map)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        conv = F.adaptive_avg_pool2d(F.relu(self.conv2(h)), 4)
        pool = F.relu(self.fc1(conv.flatten(1)))
        return self.fc2(pool), pool, conv


@contextlib.contextmanager
def _one_thread():
    """Run the tiny judge on one CPU thread: more only adds sync overhead, which on a
    busy machine costs 10x (measured); the previous setting is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _shift(x, gen, max_shift):
    """Random translation by up to `max_shift` pixels per image (background -1 fills in)."""
    s = max_shift
    padded = F.pad(x, (s, s, s, s), value=-1.0)
    offs = torch.randint(0, 2 * s + 1, (len(x), 2), generator=gen)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(offs.tolist())])


def train_judge(image_size=16, epochs=20, seed=0, lr=2e-3, batch_size=64):
    """Train the judge deterministically; its held-out accuracy is in `.heldout_accuracy`."""
    with _one_thread():
        return _train(image_size, epochs, seed, lr, batch_size)


def _train(image_size, epochs, seed, lr, batch_size):
    images, labels = digits_data(image_size)
    tr, te = split_indices()
    x = _to_input(images, image_size)
    y = torch.from_numpy(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = JudgeNet()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(tr) // batch_size))
    net.train()
    for _ in range(epochs):
        order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            xb = _shift(x[idx], gen, max(1, image_size // 16))
            loss = F.cross_entropy(net(xb)[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    judge = DigitsJudge(net, image_size)
    judge.heldout_accuracy = judge.accuracy(images[te], labels[te])
    return judge


def _to_input(images, image_size):
    """uint8 N x S x S [x C] (0..255) or float N x C x S x S (-1..1) -> float N x 1 x S x S."""
    if isinstance(images, np.ndarray):
        images = np.require(images, requirements="W")  # torch warns on read-only arrays
    x = torch.as_tensor(images).cpu()
    if x.dtype == torch.uint8:
        x = x[..., None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise GuidedError(f"judge expects uint8 images N x H x W x C (C = 1 or 3), got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    elif x.is_floating_point():
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise GuidedError(f"judge expects float images N x C x H x W in [-1, 1], got shape {tuple(x.shape)}")
        x = x.float()
    else:
        raise GuidedError(f"judge expects uint8 NHWC or float NCHW images, got {x.dtype}")
    if tuple(x.shape[-2:]) != (image_size, image_size):
        raise GuidedError(f"the digits judge was trained for {image_size}x{image_size} images, got "
                          f"{x.shape[-2]}x{x.shape[-1]}; use load_judge(image_size={x.shape[-1]})")
    return x.mean(1, keepdim=True)  # RGB with equal channels -> grey


class DigitsJudge(FeatureExtractor):
    """A trained JudgeNet plus the input handling; also a `FeatureExtractor`."""

    def __init__(self, net, image_size, heldout_accuracy=float("nan")):
        self.net = net.eval()
        self.image_size = image_size
        self.heldout_accuracy = heldout_accuracy
        self.name = f"digits{image_size}"

    @functools.cached_property
    def cache_key(self):
        h = hashlib.sha256()
        for t in self.net.state_dict().values():
            h.update(t.numpy().tobytes())
        return f"{self.name}-v{JUDGE_VERSION}-{h.hexdigest()[:12]}"

    @torch.inference_mode()
    def _run(self, images):
        x = _to_input(images, self.image_size)
        with _one_thread():
            return self.net(x)

    def logits(self, images):
        return self._run(images)[0]

    def predict(self, images):
        """Predicted digit per image (numpy int64)."""
        return self.logits(images).argmax(1).numpy()

    def accuracy(self, images, labels):
        """Fraction of images classified as their label (uint8 NHWC or float NCHW in [-1, 1])."""
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images) or len(labels) == 0:
            raise GuidedError(f"accuracy needs one label per image, got {len(labels)} labels for {len(images)} images")
        return float(np.mean(self.predict(images) == labels))

    def extract(self, images):
        logits, pool, conv = self._run(images)
        return {"pool": pool.numpy(), "spatial": conv[:, :8].flatten(1).numpy(),
                "probs": torch.softmax(logits.double(), 1).numpy()}


def save_judge(judge, path=ASSET):
    torch.save({"version": JUDGE_VERSION, "image_size": judge.image_size,
                "heldout_accuracy": judge.heldout_accuracy, "state_dict": judge.net.state_dict()}, path)


def _load_asset(path, image_size):
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable asset: fall back to training
        return None
    if blob.get("version") != JUDGE_VERSION or blob.get("image_size") != image_size:
        return None
    net = JudgeNet()
    net.load_state_dict(blob["state_dict"])
    return DigitsJudge(net, image_size, blob["heldout_accuracy"])


@functools.lru_cache(maxsize=4)
def load_judge(image_size=16):
    """The judge for `image_size`: shipped weights if they match, else trained now (seconds)."""
    if not isinstance(image_size, int) or image_size < 8:
        raise GuidedError(f"judge image_size must be an integer >= 8, got {image_size!r}")
    judge = _load_asset(ASSET, image_size) if ASSET.is_file() else None
    return judge or train_judge(image_size)


if __name__ == "__main__":
    j = train_judge(16)
    save_judge(j)
    print(f"wrote {ASSET} ({ASSET.stat().st_size} bytes), held-out accuracy {j.heldout_accuracy:.4f}")
