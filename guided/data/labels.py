"""Class labels: the index <-> (key, human name) map stored beside checkpoints.

A `LabelMap` names every class index a model was trained with.  The *key*
is the class's identity in the data: the WordNet id for ImageNet folders
("n02099601"), the file-name prefix for flat folders, the digit for the
digits set.  The *name* is what people type ("golden retriever").

`LabelMap.index(query)` turns what a user typed (an index, a key, a name, or
for ImageNet classes any WordNet synonym, case-insensitive) into the index.

The ImageNet-1k table (`imagenet_classes()`) is read from
guided/assets/imagenet_classes.tsv: index, wnid, name, synonyms, in the
standard sorted-wnid order (0 = n01440764 tench, 207 = n02099601 golden
retriever, 999 = n15075141 toilet tissue).  `name` is the first WordNet
synonym, except that the two repeated ones are disambiguated as in
torchvision's list: 134 "crane bird" (517 is "crane", the machine) and
639 "maillot tank suit" (638 is "maillot").
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

from guided.errors import GuidedError


class ImageNetClass(NamedTuple):
    index: int
    wnid: str
    name: str
    synonyms: tuple[str, ...]


@functools.lru_cache(maxsize=None)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 ImageNet-1k classes in the standard (sorted-wnid) order."""
    text = (importlib.resources.files("guided") / "assets" / "imagenet_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines()[1:] if line]
    return tuple(ImageNetClass(int(i), w, n, tuple(s.split(", "))) for i, w, n, s in rows)


@functools.lru_cache(maxsize=None)
def _imagenet_by_wnid() -> dict[str, ImageNetClass]:
    return {c.wnid: c for c in imagenet_classes()}


def class_name(key: str) -> str:
    """The human name of a class key: the ImageNet name for a wnid, else the key."""
    entry = _imagenet_by_wnid().get(key)
    return entry.name if entry else key


@dataclass(frozen=True)
class LabelMap:
    """index i <-> keys[i] (wnid / file prefix / digit) and names[i]."""

    keys: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if len(self.keys) != len(self.names) or len(set(self.keys)) != len(self.keys):
            raise GuidedError("label map is malformed: keys must be unique and match names one to one")

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> "LabelMap":
        keys = tuple(keys)
        return cls(keys, tuple(class_name(k) for k in keys))

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, index: int) -> str:
        return self.keys[index]

    wnid = key  # for ImageNet data the key is the WordNet id

    def name(self, index: int) -> str:
        return self.names[index]

    def _imagenet_hint(self, i: int) -> str:
        """Where an ImageNet-1k index names a class this (subset) label map holds: which index it is here."""
        classes = imagenet_classes()
        if not 0 <= i < len(classes) or not all(k in _imagenet_by_wnid() for k in self.keys):
            return ""
        c = classes[i]
        if c.wnid in self.keys:
            return (f"; {i} is ImageNet's {c.name} ({c.wnid}), which is index {self.keys.index(c.wnid)} here: "
                    f"give --class {self.keys.index(c.wnid)} or --class {c.wnid}")
        return f"; {i} is ImageNet's {c.name} ({c.wnid}), which this model does not hold"

    def index(self, query) -> int:
        """Index of a class given as an index, key, name or ImageNet synonym."""
        if isinstance(query, numbers.Integral) or (isinstance(query, str) and query.strip().isdigit()
                                      and query.strip() not in self.keys):
            i = int(query)
            if not 0 <= i < len(self):
                raise GuidedError(f"class index {i} is out of range: this label map has {len(self)} classes"
                                  f"{self._imagenet_hint(i)} (a number is the model's own index)")
            return i
        q = str(query).strip().lower()
        for field in (self.keys, self.names):
            hits = [i for i, k in enumerate(field) if k.lower() == q]
            if hits:
                return hits[0]
        hits = [i for i, k in enumerate(self.keys)
                if k in _imagenet_by_wnid() and q in (s.lower() for s in _imagenet_by_wnid()[k].synonyms)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            options = ", ".join(f"{self.keys[i]} ({self.names[i]})" for i in hits)
            raise GuidedError(f"class {query!r} is ambiguous: it names {options}; give the wnid")
        sample = ", ".join(self.names[:5]) + (", ..." if len(self) > 5 else "")
        raise GuidedError(f"class {query!r} is not in this label map ({len(self)} classes: {sample})")

    def to_dict(self) -> dict:
        return {"classes": [{"index": i, "wnid": k, "name": n}
                            for i, (k, n) in enumerate(zip(self.keys, self.names))]}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelMap":
        try:
            rows = sorted(d["classes"], key=lambda r: int(r["index"]))
            if [int(r["index"]) for r in rows] != list(range(len(rows))):
                raise ValueError
            return cls(tuple(str(r["wnid"]) for r in rows), tuple(str(r["name"]) for r in rows))
        except (KeyError, TypeError, ValueError):
            raise GuidedError("label map JSON must be {\"classes\": [{\"index\", \"wnid\", \"name\"}, ...]} "
                              "with indices 0..K-1") from None

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "LabelMap":
        path = Path(path)
        if not path.is_file():
            raise GuidedError(f"label map {path} does not exist; it is written beside checkpoints by training")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise GuidedError(f"label map {path} is not valid JSON") from None
        return cls.from_dict(data)


def select_classes(available: list[str], classes, where: str) -> list[str]:
    """The sorted class keys to use out of `available` (sorted keys found in the data).

    classes: None (all), an int K (the first K in sorted order), or a list
    (or comma-separated string) of keys; an ImageNet name or synonym such as
    "golden retriever" is accepted for a wnid that is present.
    """
    if classes is None:
        return list(available)
    if isinstance(classes, bool):
        raise GuidedError(f"data.classes must be a count, a list of class ids or null, not {classes}")
    if isinstance(classes, int):
        if classes < 1:
            raise GuidedError(f"data.classes={classes}: the class count must be at least 1")
        if classes > len(available):
            raise GuidedError(f"data.classes={classes} but {where} has only {len(available)} classes; "
                              f"lower data.classes")
        return list(available[:classes])
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c.strip()]
    chosen = {_resolve(str(c).strip(), available, where) for c in classes}
    if not chosen:
        raise GuidedError("data.classes is an empty list; give class ids, a count, or null for all")
    return sorted(chosen)


def _resolve(query: str, available: list[str], where: str) -> str:
    if query in available:
        return query
    q = query.lower()
    table = _imagenet_by_wnid()
    hits = [k for k in available if k in table
            and (q == table[k].name.lower() or q in (s.lower() for s in table[k].synonyms))]
    if len(hits) == 1:
        return hits[0]
    sample = ", ".join(available[:5]) + (", ..." if len(available) > 5 else "")
    if hits:
        raise GuidedError(f"class {query!r} is ambiguous in {where}: it names {', '.join(hits)}; give the wnid")
    raise GuidedError(f"class {query!r} is not in {where} ({len(available)} classes: {sample})")
