"""The old split as a file: JSON with its seed, mode and fraction, the old model's images and
classes, and a sha256 checksum, so that a split drawn once is reused exactly (and a changed or
truncated file is refused).

Used for GLDv2 (`gldv2.old_split_for`, the workdir's old_split.json), for every prepared dataset
(`prepare` writes one) and for splits published by others (`gldv2.split_from_advbct`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from bcl_jax.data import storage
from bcl_jax.data.splits import OldSplit

SPLIT_FORMAT = "bcl_jax.gldv2.split/1"


def _canonical(payload: Mapping) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


def write_split(
    path: str | os.PathLike,
    split: OldSplit,
    *,
    image_ids: Sequence[str],
    seed: int,
    mode: str,
    fraction: float,
    source: str = "",
) -> None:
    """Writes the old model's share as JSON: metadata, old image ids and indices, old classes.

    `old_classes` lists the (new) labels of the old classes in old-label order; `sha256` is the
    hex digest of the canonical JSON (sorted keys, no spaces) of every other field. `source`,
    when given, says where a split drawn elsewhere came from. The same inputs give
    byte-identical files; `path` may be on any epath filesystem (gs://...).
    """
    indices = np.asarray(split.indices, dtype=np.int64)
    old_label = np.asarray(split.old_label)
    if indices.size and (indices.min() < 0 or indices.max() >= len(image_ids)):
        raise ValueError(f"split indices out of range for {len(image_ids)} image ids.")
    old_classes = np.flatnonzero(old_label >= 0)
    old_classes = old_classes[np.argsort(old_label[old_classes], kind="stable")]
    if not np.array_equal(old_label[old_classes], np.arange(old_classes.size)):
        raise ValueError("split.old_label does not number the old classes densely from 0.")
    payload = {
        "format": SPLIT_FORMAT,
        "seed": int(seed),
        "mode": str(mode),
        "fraction": float(fraction),
        "num_images": len(image_ids),
        "num_classes": int(old_label.size),
        "old_classes": old_classes.tolist(),
        "indices": indices.tolist(),
        "image_ids": [image_ids[i] for i in indices.tolist()],
    }
    if source:
        payload["source"] = str(source)
    payload["sha256"] = hashlib.sha256(_canonical(payload)).hexdigest()
    storage.write_atomic(path, json.dumps(payload, sort_keys=True, indent=1) + "\n")


def read_split(path: str | os.PathLike, *, image_ids: Sequence[str] | None = None) -> OldSplit:
    """Reads and verifies a split file; returns its OldSplit (see `read_split_file`)."""
    return read_split_file(path, image_ids=image_ids)[0]


def read_split_file(
    path: str | os.PathLike, *, image_ids: Sequence[str] | None = None
) -> tuple[OldSplit, dict]:
    """Reads and verifies a split file; returns (OldSplit, metadata).

    metadata holds seed, mode, fraction, num_images, num_classes, the old image ids and the
    split's source ('' when bcl_jax drew it). With
    `image_ids` (the full training list), also checks that the file was drawn from that list.

    Raises ValueError naming the file on a bad format, a checksum mismatch or an id mismatch.
    """
    path = os.fspath(path)
    try:
        payload = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid split file ({e}).") from e
    if not isinstance(payload, dict) or payload.get("format") != SPLIT_FORMAT:
        raise ValueError(f"{path}: not a split file of format {SPLIT_FORMAT!r}.")
    stored = payload.pop("sha256", None)
    actual = hashlib.sha256(_canonical(payload)).hexdigest()
    if stored != actual:
        raise ValueError(
            f"{path}: checksum mismatch (stored {stored}, computed {actual}); the split file was "
            "modified or truncated. Regenerate it with old_split_for."
        )
    indices = np.asarray(payload["indices"], dtype=np.int64)
    if len(payload["image_ids"]) != indices.size:
        raise ValueError(f"{path}: {indices.size} indices but {len(payload['image_ids'])} ids.")
    if image_ids is not None:
        if len(image_ids) != payload["num_images"]:
            raise ValueError(
                f"{path}: drawn from {payload['num_images']} images, but the given list has "
                f"{len(image_ids)}."
            )
        wrong = [i for i, s in zip(indices.tolist(), payload["image_ids"]) if image_ids[i] != s]
        if wrong:
            raise ValueError(
                f"{path}: {len(wrong)} indices point at other image ids in the given list, e.g. "
                f"index {wrong[0]}; the split was drawn from a different CSV."
            )
    old_label = np.full(payload["num_classes"], -1, np.int32)
    old_label[np.asarray(payload["old_classes"], dtype=np.int64)] = np.arange(
        len(payload["old_classes"]), dtype=np.int32
    )
    meta = {k: payload[k] for k in ("seed", "mode", "fraction", "num_images", "num_classes")}
    meta["image_ids"] = list(payload["image_ids"])
    meta["source"] = payload.get("source", "")
    return OldSplit(indices=indices, old_label=old_label), meta
