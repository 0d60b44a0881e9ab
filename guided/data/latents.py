"""A VAE's latents of a dataset, encoded once into a cache: what latent models train on.

`latent_dataset(dataset, space, folder)` encodes every image of `dataset` with the VAE of `space` (a
guided.diffusion.space.LatentSpace: the posterior mean, shifted and scaled as the latent models use it)
into shards of `folder` (shard-00000.pt, ...), each written atomically, and returns a dataset of the
latents with the images' labels and label map. A rerun (or a run killed part-way) keeps every finished
shard and encodes only the missing ones. The cache's manifest.json names the VAE and a digest of its
weights and scaling: a cache made by another VAE is refused in one line, never mixed. Images are
encoded without augmentation (a random flip of a latent is not the latent of the flipped image).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from guided.errors import GuidedError
from guided.files import atomic_save, atomic_write_text, read_file

SHARD = 256  # images per shard


def vae_digest(space) -> str:
    """sha256 of the VAE's weights with its scaling and shift: what makes a cache's latents."""
    h = hashlib.sha256(f"{space.scaling_factor}:{space.shift_factor}".encode())
    for name, t in sorted(space.vae.state_dict().items()):
        h.update(name.encode() + t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _manifest(space, dataset, image_size) -> dict:
    return {"vae": space.source, "vae_digest": vae_digest(space), "scaling_factor": space.scaling_factor,
            "shift_factor": space.shift_factor, "num_images": len(dataset), "image_size": image_size,
            "classes": list(dataset.label_map.keys) if dataset.label_map is not None else None, "shard": SHARD}


def _check(folder: Path, want: dict) -> None:
    f = folder / "manifest.json"
    if not f.is_file():
        return
    have = json.loads(f.read_text())
    if have.get("vae_digest") != want["vae_digest"]:
        raise GuidedError(f"the latent cache {folder} was made by another VAE ({have.get('vae')}, digest "
                          f"{have.get('vae_digest')}; this one is {want['vae_digest']}): delete it or set "
                          f"data.latent_cache to another folder")
    for key in ("num_images", "image_size", "classes", "shard"):
        if have.get(key) != want[key]:
            raise GuidedError(f"the latent cache {folder} holds other images ({key} {have.get(key)!r}, the data "
                              f"now {want[key]!r}): delete it or set data.latent_cache to another folder")


def build_cache(dataset, space, folder, image_size: int, batch_size: int = 32, progress: bool = True) -> Path:
    """Encode the shards of `folder` that are missing (see the module docstring); the folder."""
    folder = Path(folder)
    want = _manifest(space, dataset, image_size)
    _check(folder, want)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "manifest.json", json.dumps(want, indent=1) + "\n")
    device = next(space.vae.parameters()).device
    starts = [s for s in range(0, len(dataset), SHARD) if not (folder / f"shard-{s // SHARD:05d}.pt").is_file()]
    for s in tqdm(starts, desc="encoding latents", unit="shard", disable=not progress):
        idx = range(s, min(s + SHARD, len(dataset)))
        images, labels = zip(*(dataset[i] for i in idx))
        x = torch.stack(images)
        with torch.no_grad():
            z = torch.cat([space.encode(part.to(device)).float().cpu() for part in x.split(batch_size)])
        atomic_save({"latents": z, "labels": torch.as_tensor(labels)}, folder / f"shard-{s // SHARD:05d}.pt")
    return folder


class LatentDataset(torch.utils.data.Dataset):
    """The latents of a cache, in memory, with the encoded dataset's labels and label map."""

    def __init__(self, folder, source):
        folder = Path(folder)
        shards = sorted(folder.glob("shard-*.pt"))
        parts = [read_file(f) for f in shards]
        self.latents = torch.cat([p["latents"] for p in parts])
        self.labels = torch.cat([p["labels"] for p in parts])
        self.label_map, self.num_classes = source.label_map, source.num_classes
        self.skipped, self.skipped_files = source.skipped, source.skipped_files
        if len(self.latents) != len(source):
            raise GuidedError(f"the latent cache {folder} holds {len(self.latents)} latents for {len(source)} images: "
                              f"rerun to encode the rest")

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, item):
        i = item[0] if isinstance(item, tuple) else item  # (index, augmentation seed), as the batch stream asks
        return self.latents[int(i)], int(self.labels[int(i)])

    @property
    def shape(self) -> tuple:
        return tuple(self.latents.shape[1:])
