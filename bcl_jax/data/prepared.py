"""Reads a dataset converted by `python -m bcl_jax.data.prepare` (ArrayRecord shards of JPEGs).

Layout of a prepared directory (see `prepare.py` for how it is made)::

    manifest.json                         written last: its presence means preparation finished
    <split>-00000-of-00003.array_record   one record per image: JPEG bytes
    <split>.labels.npy                    int32 label of each record
    <split>.ids.txt                       one id per line (GLDv2 image id, or the source path)
    old_split.json                        the old model's share of `train` (split_file.write_split)

`PreparedSource(root, split, image_size=...)` is a grain random-access source giving
``{"image": uint8 (image_size, image_size, 3), "label": int32}``; a stored image is re-decoded
with `images.load_image`, so a dataset prepared at 256 px serves any `image_size`. The split lists
are checked against the manifest's checksums when a source is built. `prepared_old_split` returns
the recorded old split, and refuses a config that asks for another fraction, mode or seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath

import grain
import numpy as np
from etils import epath

from bcl_jax.data import split_file, splits
from bcl_jax.data.dataset import require_dir
from bcl_jax.data.images import (
    Preprocess,
    check_image_size,
    load_image,
    load_train_image,
    preprocess_from_config,
)

FORMAT = "bcl_jax.prepared/1"
MANIFEST = "manifest.json"
_RERUN = (
    "Run (or re-run: it resumes) `python -m bcl_jax.data.prepare --dataset=... --src=... "
    "--dst={root}` to finish it."
)


def labels_file(split: str) -> str:
    return f"{split}.labels.npy"


def ids_file(split: str) -> str:
    return f"{split}.ids.txt"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_ids(path: str | os.PathLike) -> list[str]:
    """The ids of an `<split>.ids.txt` file: one per line."""
    text = epath.Path(path).read_bytes().decode("utf-8")
    return text.split("\n")[:-1] if text else []


def read_manifest(root: str | os.PathLike) -> dict:
    """Loads `<root>/manifest.json`.

    Raises:
      FileNotFoundError: no manifest, i.e. preparation never ran or did not finish.
      ValueError: the file is not a manifest of this format.
    """
    root = os.fspath(root)
    path = epath.Path(root) / MANIFEST
    if not path.is_file():
        what = "is incomplete" if epath.Path(root).is_dir() else "is missing"
        raise FileNotFoundError(
            f"Prepared dataset {root!r} {what}: no {MANIFEST} (it is written last, when "
            f"preparation finishes). " + _RERUN.format(root=root)
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format {got!r} is not {FORMAT!r}; prepare the dataset again.")
    return manifest


def _verified(root: str, name: str, entry: dict, key: str) -> str:
    """The path of `name` in `root` after checking its sha256 against `entry[key]`."""
    path = os.fspath(epath.Path(root) / name)
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing. " + _RERUN.format(root=root))
    actual = sha256_file(path)
    if actual != entry[key]:
        raise ValueError(
            f"{path}: sha256 {actual} does not match the manifest's {entry[key]}; the file was "
            "modified after preparation. Prepare the dataset again into a fresh directory."
        )
    return path


class PreparedSource:
    """Random-access source (grain protocol) over one split of a prepared dataset.

    Attributes:
      root, split, image_size: as given.
      labels: int32 array, the label of each record.
      ids: the id of each record (GLDv2 image id, or path relative to the raw dataset).
      classes: class names (landmark ids, item ids, folder names); for splits in which every
        image is its own class (GLDv2 index and test) the ids.
      num_classes: size of the label space.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        image_size: int,
        manifest: dict | None = None,
        preprocess: Preprocess | None = None,
    ):
        self.root, self.split = os.fspath(root), split
        self.image_size = check_image_size(image_size)
        self.preprocess = Preprocess.of(image_size, preprocess)
        manifest = read_manifest(self.root) if manifest is None else manifest
        if self.preprocess.eval_mode != "center_crop":
            raise ValueError(
                f"data.eval_preprocess={self.preprocess.eval_mode!r}, but prepared dataset "
                f"{self.root!r} stores centre-cropped squares (prepare crops them), so the "
                "whole images are not there to resize; use the raw files (data.prepared='') or "
                "data.eval_preprocess='center_crop'."
            )
        if split not in manifest["splits"]:
            raise ValueError(
                f"Prepared dataset {self.root!r} has no split {split!r}; available: "
                f"{sorted(manifest['splits'])}."
            )
        entry = manifest["splits"][split]
        labels_path = _verified(self.root, labels_file(split), entry, "labels_sha256")
        ids_path = _verified(self.root, ids_file(split), entry, "ids_sha256")
        with epath.Path(labels_path).open("rb") as f:
            self.labels = np.load(f).astype(np.int32, copy=False)
        self.ids = read_ids(ids_path)
        for path, n in ((labels_path, len(self.labels)), (ids_path, len(self.ids))):
            if n != entry["count"]:
                raise ValueError(f"{path}: {n} entries, but the manifest says {entry['count']}.")
        self.skipped = [
            u["path"] for u in manifest.get("unreadable", ()) if u.get("split") == split
        ]  # dropped by prepare
        # Where every image is its own class (GLDv2 index/test) the ids are file names.
        self.skipped_ids = (
            [posixpath.splitext(posixpath.basename(p))[0] for p in self.skipped]
            if entry["classes"] is None
            else []
        )
        self.identity = {
            "prepared": manifest["dataset"],
            "stored_size": manifest["image_size"],
            "quality": manifest["quality"],
        }
        self.num_classes = int(entry["num_classes"])
        self.classes = self.ids if entry["classes"] is None else list(entry["classes"])
        # array_record reads gs:// itself; other filesystems need a local mount.
        shards = [os.fspath(epath.Path(self.root) / s) for s in entry["shards"]]
        missing = [s for s in shards if not epath.Path(s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Prepared dataset {self.root!r}: shard(s) {missing[:3]} are missing. "
                + _RERUN.format(root=self.root)
            )
        self._records = grain.sources.ArrayRecordDataSource(shards)
        if len(self._records) != entry["count"]:
            raise ValueError(
                f"Prepared dataset {self.root!r}: the {split!r} shards hold "
                f"{len(self._records)} records, but the manifest says {entry['count']}."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        record = io.BytesIO(self._records[index])
        image = load_image(record, self.image_size, **self.preprocess.eval_args())
        return {"image": image, "label": np.int32(self.labels[index])}

    def train_item(self, index: int) -> dict[str, np.ndarray]:
        """The stored square, resized to `train_resize_size`, for random crops."""
        index = int(index)
        record = io.BytesIO(self._records[index])
        image = load_train_image(record, self.preprocess.train_size)
        return {"image": image, "label": np.int32(self.labels[index])}

    def __repr__(self) -> str:
        return (
            f"PreparedSource(root={self.root!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes}, image_size={self.image_size})"
        )


def prepared_old_split(
    root: str | os.PathLike,
    *,
    fraction: float,
    mode: str,
    seed: int,
    manifest: dict | None = None,
) -> splits.OldSplit:
    """The old split recorded at preparation; ValueError if it is not the one the config asks.

    Also checks old_split.json against the manifest's sha256 and against the train ids.
    """
    root = os.fspath(root)
    manifest = read_manifest(root) if manifest is None else manifest
    info = manifest["old_split"]
    if (float(info["fraction"]), info["mode"], int(info["seed"])) != (
        float(fraction),
        mode,
        int(seed),
    ):
        raise ValueError(
            f"prepared dataset {root} has old split fraction={info['fraction']} "
            f"mode={info['mode']} seed={info['seed']}, but the config asks for "
            f"fraction={fraction} mode={mode} seed={seed}; set data.old_fraction/old_split/"
            f"split_seed to match or re-run prepare with --old_fraction={fraction} "
            f"--old_split={mode} --split_seed={seed} (only the split is redrawn)."
        )
    path = _verified(root, info["file"], info, "sha256")
    train_ids = read_ids(
        _verified(root, ids_file("train"), manifest["splits"]["train"], "ids_sha256")
    )
    split, _ = split_file.read_split_file(path, image_ids=train_ids)
    return split


def train_and_split(cfg) -> tuple[PreparedSource, splits.OldSplit]:
    """The train source of `data.prepared` and its recorded old split, after checking that the
    directory holds `data.name` and that its split is the one the config asks for."""
    require_dir(cfg.prepared, "data.prepared")
    manifest = read_manifest(cfg.prepared)
    if manifest["dataset"] != cfg.name:
        raise ValueError(
            f"data.prepared={cfg.prepared!r} holds {manifest['dataset']!r}, but data.name is "
            f"{cfg.name!r}."
        )
    split = prepared_old_split(
        cfg.prepared,
        fraction=cfg.old_fraction,
        mode=cfg.old_split,
        seed=cfg.split_seed,
        manifest=manifest,
    )
    train = PreparedSource(
        cfg.prepared,
        "train",
        image_size=cfg.image_size,
        manifest=manifest,
        preprocess=preprocess_from_config(cfg),
    )
    return train, split


def source(cfg, split: str) -> PreparedSource:
    """The `split` of `data.prepared` (e.g. query, gallery, test, index) at data.image_size."""
    return PreparedSource(
        cfg.prepared, split, image_size=cfg.image_size, preprocess=preprocess_from_config(cfg)
    )
