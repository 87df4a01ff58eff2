"""DeepFashion In-shop Clothes Retrieval in its released layout (method.md §7–§8).

Layout::

    root/
      list_eval_partition.txt
      img/WOMEN/Dresses/id_00000002/02_1_front.jpg
      ...

`list_eval_partition.txt`: line 1 is the number of images, line 2 the header
``image_name item_id evaluation_status``, then one whitespace-separated row per image::

    img/WOMEN/Dresses/id_00000002/02_1_front.jpg  id_00000002  train

with status ``train``, ``query`` or ``gallery``. Blank lines are ignored.

Labels: the training split is labelled densely over its sorted item ids (3,997 in the real file);
query and gallery share one label space, dense over the sorted union of their item ids (3,985 in
the real file), so the same item has the same label in both. The old model's share of the training
items is `splits.old_split(train.labels, train.num_classes, fraction=..., mode="classes", seed=...)`.

`evaluate` gives Recall@{1,10,20,30,40,50} and mAP (query and gallery are disjoint image sets, so
no self-exclusion).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath

import numpy as np
from absl import logging
from etils import epath

from bcl_jax import metrics
from bcl_jax.data import images, prepared
from bcl_jax.data.dataset import DatasetParts, label_test, require_dir
from bcl_jax.data.images import CorruptImageError, ImageList, check_image_size  # noqa: F401

PARTITION_FILE = "list_eval_partition.txt"
SPLITS = ("train", "query", "gallery")
HEADER = ("image_name", "item_id", "evaluation_status")
KS = (1, 10, 20, 30, 40, 50)


@dataclasses.dataclass(frozen=True)
class Partition:
    """One split of the partition file, rows in file order.

    Attributes:
      paths: image paths relative to the dataset root, as in the file.
      item_ids: the item id of each image.
      labels: (len(paths),) int32, index of each image's item id in `classes`.
      classes: the sorted item ids of this split's label space (for query and gallery: the union
        of both splits' item ids).
    """

    paths: list[str]
    item_ids: list[str]
    labels: np.ndarray
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)


def read_partition(root: str | os.PathLike) -> dict[str, Partition]:
    """Parses `<root>/list_eval_partition.txt` into {"train", "query", "gallery"} partitions.

    Raises:
      FileNotFoundError: the partition file is missing.
      ValueError (naming the file and the 1-based line): line 1 not an integer or not equal to
        the number of rows, a wrong header, a row without exactly 3 columns, an unknown status,
        an image listed twice, or an item id both in train and in query/gallery.
    """
    path = posixpath.join(os.fspath(root), PARTITION_FILE)
    if not epath.Path(path).is_file():
        raise FileNotFoundError(
            f"In-shop partition file {path!r} not found; expected {PARTITION_FILE} and img/ "
            "in the dataset root (DeepFashion In-shop Clothes Retrieval layout)."
        )
    text = epath.Path(path).read_bytes().decode("utf-8")
    lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, cols) for n, cols in lines if cols]  # blank lines carry nothing

    def error(line_no: int, msg: str) -> ValueError:
        return ValueError(f"{path}, line {line_no}: {msg}")

    if not lines:
        raise ValueError(f"{path} is empty; expected the image count on line 1.")
    count_line, count_cols = lines[0]
    if len(count_cols) != 1 or not count_cols[0].isdigit():
        raise error(count_line, f"expected the number of images, got {' '.join(count_cols)!r}.")
    expected = int(count_cols[0])
    if len(lines) < 2 or tuple(lines[1][1]) != HEADER:
        line_no = lines[1][0] if len(lines) > 1 else count_line + 1
        got = " ".join(lines[1][1]) if len(lines) > 1 else "end of file"
        raise error(line_no, f"expected the header {' '.join(HEADER)!r}, got {got!r}.")

    rows = {s: ([], [], []) for s in SPLITS}  # split -> (paths, item ids, line numbers)
    first_line_of_path: dict[str, int] = {}
    for line_no, cols in lines[2:]:
        if len(cols) != 3:
            raise error(
                line_no,
                f"expected 3 columns ({' '.join(HEADER)}), got {len(cols)}: {' '.join(cols)!r}.",
            )
        image, item, status = cols
        if status not in SPLITS:
            raise error(line_no, f"unknown evaluation_status {status!r}; expected one of {SPLITS}.")
        if image in first_line_of_path:
            raise error(
                line_no, f"image {image!r} is already listed on line {first_line_of_path[image]}."
            )
        first_line_of_path[image] = line_no
        for acc, value in zip(rows[status], (image, item, line_no)):
            acc.append(value)
    num_rows = sum(len(r[0]) for r in rows.values())
    if num_rows != expected:
        raise error(count_line, f"says {expected} images but the file lists {num_rows}.")

    # The official split keeps training items disjoint from query/gallery items.
    eval_items = set(rows["query"][1]) | set(rows["gallery"][1])
    for image, item, line_no in zip(*rows["train"]):
        if item in eval_items:
            raise error(
                line_no,
                f"training item {item!r} also appears in query/gallery; the In-shop split keeps "
                "training items disjoint from evaluation items.",
            )

    def make(split: str, classes: list[str]) -> Partition:
        paths, items, _ = rows[split]
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[i] for i in items], dtype=np.int32)
        return Partition(paths=list(paths), item_ids=list(items), labels=labels, classes=classes)

    eval_classes = sorted(eval_items)
    return {
        "train": make("train", sorted(set(rows["train"][1]))),
        "query": make("query", eval_classes),
        "gallery": make("gallery", eval_classes),
    }


class InShopSource(ImageList):
    """Random-access source (grain protocol) over one In-shop split.

    `ds[i]` is `{"image": uint8 (image_size, image_size, 3), "label": int32 scalar}`, decoded by
    `images.load_image` (RGB, shorter side resized, centre crop); an undecodable file raises
    `CorruptImageError` when read. The files are scanned at construction (`images.scan`):
    missing or unreadable ones stop with their paths, or with `skip_corrupt` are dropped (a
    training item left without images stops).

    Attributes:
      root, split, image_size: as given.
      paths: image paths under root, in partition-file order.
      ids: the paths as the partition file lists them (relative to root).
      item_ids: the item id of each image.
      labels: int32 array, the label of each image.
      classes: item ids of the label space; num_classes = len(classes).
      skipped: paths dropped as unreadable.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        image_size: int,
        partition: dict[str, Partition] | None = None,
        skip_corrupt: bool = False,
        scan: str = "header",
        preprocess: images.Preprocess | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}.")
        self.preprocess = images.Preprocess.of(image_size, preprocess)
        self.root, self.split, self.image_size = os.fspath(root), split, int(image_size)
        part = (read_partition(self.root) if partition is None else partition)[split]
        if not len(part):
            raise ValueError(f"In-shop {self.root!r}: {PARTITION_FILE} lists no {split!r} images.")
        paths = [posixpath.join(self.root, p) for p in part.paths]
        what = f"In-shop {self.root} {split} images (listed in {PARTITION_FILE})"
        keep, self.skipped = images.scan(paths, what=what, skip_corrupt=skip_corrupt, mode=scan)
        self.paths = [paths[i] for i in keep]
        self.ids = [part.paths[i] for i in keep]
        self.item_ids = [part.item_ids[i] for i in keep]
        self.labels = part.labels[keep]
        self.classes = list(part.classes)
        self.num_classes = part.num_classes
        if self.skipped and split == "train":
            images.check_classes_kept(self.labels, self.classes, what)
        logging.info(
            "In-shop %s %s: %d images, %d items in the label space.",
            self.root,
            split,
            len(self.paths),
            self.num_classes,
        )

    def __repr__(self) -> str:
        return (
            f"InShopSource(root={self.root!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes}, image_size={self.image_size})"
        )


def eval_sources(root: str | os.PathLike, *, image_size: int) -> tuple[InShopSource, InShopSource]:
    """Query and gallery sources (one shared label space), parsing the partition file once."""
    partition = read_partition(root)
    return (
        InShopSource(root, "query", image_size=image_size, partition=partition),
        InShopSource(root, "gallery", image_size=image_size, partition=partition),
    )


def evaluate(
    query_emb, query_labels, gallery_emb, gallery_labels, *, query_block: int = 256
) -> dict:
    """In-shop Recall@{1,10,20,30,40,50} and mAP: `metrics.retrieval_metrics` with `KS`."""
    return metrics.retrieval_metrics(
        query_emb,
        query_labels,
        gallery_emb,
        gallery_labels,
        ks=KS,
        query_block=query_block,
        exclude_self=False,
    )


def build(cfg, workdir: str | None) -> DatasetParts:
    """In-shop's training items, and its query/gallery test (Recall@{1,10,...,50} and mAP), from
    data.inshop.root or from `data.prepared` (with the old split recorded there)."""
    del workdir  # The old split is drawn from the config (or read from the prepared data).
    split = None
    if cfg.prepared:
        train, split = prepared.train_and_split(cfg)
        query, gallery = (prepared.source(cfg, s) for s in ("query", "gallery"))
    else:
        root = cfg.inshop.root
        if not root:
            raise ValueError("data.name=inshop needs data.inshop.root (or data.prepared).")
        require_dir(root, "data.inshop.root")
        partition = read_partition(root)
        options = {
            "image_size": cfg.image_size,
            "partition": partition,
            "preprocess": images.preprocess_from_config(cfg),
            **images.read_options(cfg),
        }
        train, query, gallery = (InShopSource(root, s, **options) for s in SPLITS)
    test = label_test("inshop", query, gallery, ks=KS, protocol="In-shop Recall@K and mAP")
    return DatasetParts(
        train=train,
        tests=[test],
        description=f"In-shop {cfg.inshop.root or cfg.prepared}",
        old_split=split,
    )
