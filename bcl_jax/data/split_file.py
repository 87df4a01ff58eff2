"""The old split as a file: JSON with its seed, mode and fraction, the old model's images and
classes, and a sha256 checksum, so that a split drawn once is reused exactly (and a changed or
truncated file is refused).

Used for GLDv2 (`gldv2.old_split_for`, the workdir's old_split.json), for every prepared dataset
(`prepare` writes one) and for splits published by others (`from_advbct`, used by
`gldv2.split_from_advbct`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
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


# ---------------------------------------------------------------------------------------------
# Splits published by others.


def _advbct_rows(path: str) -> list[tuple[int, str, int]]:
    """(line, image id, label) of each non-blank line '<dir>/<a>/<b>/<c>/<id>.jpg <label>'."""
    rows = []
    text = epath.Path(path).read_bytes().decode("utf-8")
    for line, content in enumerate(text.splitlines(), start=1):
        fields = content.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ValueError(
                f"{path}: line {line}: expected '<image path> <label>' (AdvBCT's split list), "
                f"got {content!r}."
            )
        image_id = posixpath.splitext(posixpath.basename(fields[0]))[0]
        rows.append((line, image_id, int(fields[1])))
    if not rows:
        raise ValueError(f"{path}: no images listed.")
    return rows


def _one_to_one(path: str, pairs: list[tuple[int, int, int]]) -> dict[int, int]:
    """{class: file label} from (line, class, label) rows; ValueError naming a line where a
    class has two labels or two classes share one."""
    label_of, class_of = {}, {}
    for line, c, label in pairs:
        if label_of.setdefault(c, label) != label:
            raise ValueError(
                f"{path}: line {line}: an image of the training CSV's class {c} has label "
                f"{label}, another has {label_of[c]}; one class must have one label."
            )
        if class_of.setdefault(label, c) != c:
            raise ValueError(
                f"{path}: line {line}: label {label} is given to images of two classes of the "
                f"training CSV ({class_of[label]} and {c})."
            )
    return label_of


def from_advbct(
    path: str | os.PathLike, image_ids: Sequence[str], labels: np.ndarray, *, mode: str
) -> OldSplit:
    """The old split of an AdvBCT split list, over a training list (`image_ids`, `labels`).

    AdvBCT (GitHub Ashespt/AdvBCT, utils/process_dataset.py) publishes GLDv2's old training
    sets as text, one image per line: '<path> <label>', the path relative to the dataset root
    ('train/<a>/<b>/<c>/<id>.jpg'). `gldv2_train_old_30percent_class.txt` (mode 'classes')
    lists every image of the old classes with its old label, dense from 0;
    `gldv2_train_old_30percent_data.txt` (mode 'images') lists the old images with their
    original labels, every class keeping some. The old split holds exactly the listed images;
    in 'classes' mode the file's labels are the old labels, in 'images' mode every class is old.

    Raises ValueError naming the file and line for a malformed line, an image id not in
    `image_ids`, a repeated image, or labels that do not map one to one onto classes; and, in
    'images' mode, when some class has no listed image.
    """
    if mode not in ("classes", "images"):
        raise ValueError(f"mode={mode!r}: AdvBCT's lists split by 'classes' or by 'images'.")
    path, labels = os.fspath(path), np.asarray(labels)
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    seen: dict[int, int] = {}
    pairs = []  # (line, class in the training list, label in the file)
    for line, image_id, label in _advbct_rows(path):
        if image_id not in position:
            raise ValueError(f"{path}: line {line}: image {image_id!r} is not in the training CSV.")
        index = position[image_id]
        if index in seen:
            raise ValueError(f"{path}: line {line}: image {image_id!r} repeats line {seen[index]}.")
        seen[index] = line
        pairs.append((line, int(labels[index]), label))
    label_of = _one_to_one(path, pairs)
    num_classes = int(labels.max()) + 1
    if mode == "images":
        missing = sorted(set(range(num_classes)) - set(label_of))
        if missing:
            raise ValueError(
                f"{path}: {len(missing)} classes of the training CSV have no listed image "
                f"(e.g. {missing[:5]}); a split by images keeps every class."
            )
        old_label = np.arange(num_classes, dtype=np.int32)
    else:
        if sorted(label_of.values()) != list(range(len(label_of))):
            raise ValueError(f"{path}: the old labels are not 0..{len(label_of) - 1}.")
        old_label = np.full(num_classes, -1, np.int32)
        old_label[list(label_of)] = list(label_of.values())
    return OldSplit(indices=np.array(sorted(seen), dtype=np.int64), old_label=old_label)
