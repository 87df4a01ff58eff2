"""Users' own images in the ImageFolder layout, for training and for query/gallery evaluation.

Layout (as in torchvision's ImageFolder)::

    root/
      <class_name>/          one folder per class; the folder's name is the class name
        img001.jpg           .jpg .jpeg .png, any case
        more/img002.PNG      subfolders inside a class folder are read recursively

Hidden files and folders (names starting with "."), files with other extensions and files placed
directly in `root` are ignored. Classes are sorted by name and labelled 0..C-1, unless
`class_names` fixes the mapping (so that query and gallery folders share one; see
`eval_folders`). Paths are sorted, so the order is the same on every host and every run.

`ImageFolder` is a grain random-access source: `ds[i]` decodes one image with PIL, converts it to
RGB, resizes its shorter side to `image_size` (bilinear) and centre-crops it to a square, giving
`{"image": uint8 (image_size, image_size, 3), "label": int32 scalar}`.

Construction raises FileNotFoundError or ValueError when `root` is missing, has no class folders
or no images at all, has a class folder without images (an empty class cannot be trained on or
evaluated), or has a class folder not listed in `class_names`. A file that cannot be decoded
raises `CorruptImageError` when it is read; with `skip_corrupt=True` every file is instead
decoded once at construction, and the bad ones are dropped and listed in `skipped`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image

from bcl_jax.data.dataset import DatasetParts, label_test

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_LAYOUT = "Expected the layout root/<class_name>/<image> with .jpg, .jpeg or .png images."
_NUM_SHOWN = 5  # How many paths or names an error or warning lists before "...".


class CorruptImageError(ValueError):
    """An image file that PIL cannot open or decode."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def preview(items) -> str:
    """The first few of `items` for an error message, then "..." if there are more."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:_NUM_SHOWN])
    return shown + (", ..." if len(items) > _NUM_SHOWN else "")


def list_class_dirs(root: str | os.PathLike) -> list[str]:
    """Sorted names of the non-hidden class folders in `root`; raises if there are none."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(
            f"Image folder {root!r} does not exist; check the path in the config. {_LAYOUT}"
        )
    if not os.path.isdir(root):
        raise ValueError(f"Image folder {root!r} is a file, not a directory. {_LAYOUT}")
    with os.scandir(root) as entries:
        names = sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))
    if not names:
        raise ValueError(
            f"Image folder {root!r} has no class subfolders; put each class's images in a "
            f"folder named after the class. {_LAYOUT}"
        )
    return names


def _list_images(class_dir: str) -> list[str]:
    """All image files under `class_dir`, recursively, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    return found


def _check_class_names(class_names: Sequence[str], folder_classes: list[str], root: str):
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a sequence of names, not the string {class_names!r}.")
    duplicates = sorted(c for c, n in collections.Counter(class_names).items() if n > 1)
    if duplicates:
        raise ValueError(f"class_names has duplicates: {preview(duplicates)}.")
    unknown = sorted(set(folder_classes) - set(class_names))
    if unknown:
        raise ValueError(
            f"Image folder {root!r} has class folder(s) not in class_names: "
            f"{preview(unknown)}. Build query and gallery with eval_folders(...) so they share "
            "one mapping, or add the names to class_names, or remove those folders."
        )


def check_image_size(image_size) -> int:
    """`image_size` as an int; ValueError unless it is a positive int (not a bool)."""
    is_int = isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool)
    if not is_int or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
    return int(image_size)


def load_image(path: str, image_size: int, box=None) -> np.ndarray:
    """Decodes `path` to uint8 RGB, shorter side resized to `image_size`, centre-cropped square.

    `box` (x1, y1, x2, y2 in pixels, clipped to the image), when given, is cut out first and then
    treated as the whole image (Revisited Oxford/Paris query crops).

    Raises:
      CorruptImageError: the file cannot be opened or decoded.
      ValueError: `box` is empty inside the image.
    """
    try:
        with Image.open(path) as img:
            if box is None:  # A box is in full-resolution pixels: no reduced-scale decode then.
                img.draft("RGB", (image_size, image_size))  # JPEG only: decode at a reduced scale.
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # Avoids PIL's warning about palette transparency.
            img = img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files.
        raise CorruptImageError(
            f"Cannot decode image {path!r} ({type(e).__name__}: {e}). Fix or delete the file, "
            "or set data.skip_corrupt=True to skip unreadable images."
        ) from e
    width, height = img.size
    x1, y1, x2, y2 = (0.0, 0.0, width, height) if box is None else (float(v) for v in box)
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"Bounding box {list(box)} is empty inside {path!r} ({width}x{height}).")
    # Resizing the central square == resizing the shorter side, then centre-cropping.
    side = min(x2 - x1, y2 - y1)
    left, top = (x1 + x2 - side) / 2, (y1 + y2 - side) / 2
    img = img.resize(
        (image_size, image_size),
        Image.Resampling.BILINEAR,
        box=(left, top, left + side, top + side),
    )
    return np.asarray(img, dtype=np.uint8)


def _find_corrupt(paths: list[str], image_size: int) -> list[str]:
    """The paths that fail to decode, checked in a thread pool (PIL releases the GIL)."""

    def is_corrupt(path: str) -> bool:
        try:
            load_image(path, image_size)
        except CorruptImageError:
            return True
        return False

    with concurrent.futures.ThreadPoolExecutor() as pool:
        flags = list(pool.map(is_corrupt, paths))
    return [p for p, bad in zip(paths, flags) if bad]


class ImageList:
    """Random-access source (grain protocol) over image files `paths` with int32 `labels`.

    ``ds[i]`` is ``{'image': uint8 (image_size, image_size, 3), 'label': int32}``, decoded by
    `load_image`. The dataset sources (folders, GLDv2, In-shop) set the three attributes.
    """

    paths: list[str]
    labels: np.ndarray
    image_size: int

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        return {
            "image": load_image(self.paths[index], self.image_size),
            "label": np.int32(self.labels[index]),
        }


class ImageFolder(ImageList):
    """Random-access source (grain protocol) over `root/<class_name>/<image>`.

    Attributes:
      root: the folder, as a string.
      image_size: side of the square images returned.
      classes: class names; a label is an index into this list.
      num_classes: len(classes).
      paths: image paths, sorted.
      labels: int32 array, the label of each path.
      skipped: undecodable paths dropped at construction (only with skip_corrupt=True).
      num_skipped: len(skipped).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int,
        class_names: Sequence[str] | None = None,
        skip_corrupt: bool = False,
    ):
        check_image_size(image_size)
        self.root = os.fspath(root)
        self.image_size = int(image_size)
        folder_classes = list_class_dirs(self.root)
        if class_names is not None:
            _check_class_names(class_names, folder_classes, self.root)
        self.classes = list(folder_classes if class_names is None else class_names)
        self.num_classes = len(self.classes)

        per_class = {c: _list_images(os.path.join(self.root, c)) for c in folder_classes}
        if not any(per_class.values()):
            raise ValueError(
                f"Image folder {self.root!r} has {len(folder_classes)} class folder(s) but no "
                f"images in them (only .jpg, .jpeg and .png files are read). {_LAYOUT}"
            )
        self._check_no_empty_class(per_class, "has no images")
        self.skipped = self._drop_corrupt(per_class) if skip_corrupt else []
        self.num_skipped = len(self.skipped)

        label_of = {c: i for i, c in enumerate(self.classes)}
        pairs = sorted((p, label_of[c]) for c, ps in per_class.items() for p in ps)
        self.paths = [p for p, _ in pairs]
        self.labels = np.array([label for _, label in pairs], dtype=np.int32)
        logging.info(
            "ImageFolder %s: %d images in %d class folders (%d classes in the mapping).",
            self.root,
            len(self.paths),
            len(folder_classes),
            self.num_classes,
        )

    def _check_no_empty_class(self, per_class: dict[str, list[str]], why: str):
        empty = [c for c, ps in per_class.items() if not ps]
        if empty:
            raise ValueError(
                f"Image folder {self.root!r}: class folder(s) {preview(empty)} {why}; an empty "
                "class cannot be trained on or evaluated. Add images or remove the folder(s). "
                + _LAYOUT
            )

    def _drop_corrupt(self, per_class: dict[str, list[str]]) -> list[str]:
        """Removes undecodable files from `per_class` in place; returns them, sorted."""
        all_paths = sorted(p for ps in per_class.values() for p in ps)
        bad = _find_corrupt(all_paths, self.image_size)
        if not bad:
            return []
        logging.warning(
            "ImageFolder %s: skipping %d unreadable image(s) of %d: %s",
            self.root,
            len(bad),
            len(all_paths),
            preview(bad),
        )
        if len(bad) == len(all_paths):
            raise ValueError(
                f"Image folder {self.root!r}: all {len(bad)} images are "
                f"unreadable, e.g. {preview(bad)}."
            )
        bad_set = set(bad)
        for c, ps in per_class.items():
            per_class[c] = [p for p in ps if p not in bad_set]
        self._check_no_empty_class(per_class, "has only unreadable images")
        return bad

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={self.root!r}, images={len(self)}, "
            f"classes={self.num_classes}, image_size={self.image_size}, "
            f"skipped={self.num_skipped})"
        )


def eval_folders(
    query_dir: str | os.PathLike,
    gallery_dir: str | os.PathLike,
    *,
    image_size: int,
    skip_corrupt: bool = False,
) -> tuple[ImageFolder, ImageFolder]:
    """Query and gallery sources sharing one label mapping: the sorted union of class names.

    A query class without a gallery folder is allowed (its queries have no positives); a warning
    says how many there are.
    """
    query_classes = list_class_dirs(query_dir)
    gallery_classes = list_class_dirs(gallery_dir)
    class_names = sorted(set(query_classes) | set(gallery_classes))
    missing = sorted(set(query_classes) - set(gallery_classes))
    if missing:
        logging.warning(
            "%d of %d query classes have no folder in gallery %s, so their queries have no "
            "positives: %s",
            len(missing),
            len(query_classes),
            os.fspath(gallery_dir),
            preview(missing),
        )
    query = ImageFolder(
        query_dir, image_size=image_size, class_names=class_names, skip_corrupt=skip_corrupt
    )
    gallery = ImageFolder(
        gallery_dir, image_size=image_size, class_names=class_names, skip_corrupt=skip_corrupt
    )
    return query, gallery


def build(cfg, workdir: str | None) -> DatasetParts:
    """data.name=folder: data.folder.train_dir to train on, query_dir against gallery_dir (one
    shared label mapping) as the label mAP and Recall@K test."""
    del workdir  # The old split is drawn from the config.
    f = cfg.folder
    for key in ("train_dir", "query_dir", "gallery_dir"):
        if not f[key]:
            raise ValueError(
                f"data.name=folder needs data.folder.{key}: a folder laid out "
                "as <dir>/<class_name>/<image>"
            )
    train = ImageFolder(f.train_dir, image_size=cfg.image_size, skip_corrupt=f.skip_corrupt)
    query, gallery = eval_folders(
        f.query_dir, f.gallery_dir, image_size=cfg.image_size, skip_corrupt=f.skip_corrupt
    )
    return DatasetParts(
        train=train,
        tests=[label_test("folder", query, gallery)],
        description=f"folder {f.train_dir}",
    )
