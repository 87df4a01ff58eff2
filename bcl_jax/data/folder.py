"""Users' own images in the ImageFolder layout, for training and for query/gallery evaluation.

Layout (as in torchvision's ImageFolder), on a local disk or any filesystem etils.epath opens
(``gs://...``)::

    root/
      <class_name>/          one folder per class; the folder's name is the class name
        img001.jpg           .jpg .jpeg .png, any case
        more/img002.PNG      subfolders inside a class folder are read recursively

Hidden files and folders (names starting with "."), files with other extensions and files placed
directly in `root` are ignored. A class folder may be a symlink to a folder outside `root`; one
that points at `root`, above it or inside it (another class) is refused, naming the link: it
would make one class of other classes' images. Class names are Unicode NFC-normalised, so a name spelled in
decomposed form (NFD, as macOS file systems store it) is the same class as its composed
spelling; two folders whose names differ only so are merged into one class, with a warning that
shows both spellings' code points. Classes are sorted by name and labelled 0..C-1, unless
`class_names` fixes the mapping (so that query and gallery folders share one; see
`eval_folders`). Paths are sorted, so the order is the same on every host and every run.

`ImageFolder` is a grain random-access source: `ds[i]` decodes one image (`images.load_image`:
RGB at the right scale for its mode, upright, shorter side resized to `image_size`,
centre-cropped), giving `{"image": uint8 (image_size, image_size, 3), "label": int32 scalar}`.

Construction raises FileNotFoundError or ValueError when `root` is missing, has no class folders
or no images at all, has a class folder without images (an empty class cannot be trained on or
evaluated), or has a class folder not listed in `class_names`. It then scans the files
(`images.scan`): an unreadable file stops with its path, or with `skip_corrupt=True` is dropped
and listed in `skipped`.
"""

from __future__ import annotations

import collections
import os
import unicodedata
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from bcl_jax.data import images, prepared
from bcl_jax.data.dataset import DatasetParts, label_test, preview, require_dir
from bcl_jax.data.images import (  # noqa: F401  (the names users of this module know)
    IMAGE_EXTENSIONS,
    CorruptImageError,
    ImageList,
    check_image_size,
    load_image,
)

_LAYOUT = "Expected the layout root/<class_name>/<image> with .jpg, .jpeg or .png images."


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def nfc(name: str) -> str:
    """`name` in Unicode normal form C (composed), the one spelling of a class name."""
    return unicodedata.normalize("NFC", name)


def _code_points(name: str) -> str:
    return " ".join(f"U+{ord(c):04X}" for c in name)


def _check_root(root: epath.Path) -> None:
    if not root.exists():
        raise FileNotFoundError(
            f"Image folder {os.fspath(root)!r} does not exist; check the path in the config. "
            + _LAYOUT
        )
    if not root.is_dir():
        raise ValueError(f"Image folder {os.fspath(root)!r} is a file, not a directory. {_LAYOUT}")


def _walk(root: epath.Path):
    """(relative folder, sub-folder names, file names) for every folder under `root`, top
    down, hidden folders pruned. Relative to the first folder walked: some epath filesystems
    (fsspec's) return folder names without their gs:// prefix."""
    top = None
    for folder, dirs, files in root.walk():
        folder = os.fspath(folder)
        top = folder if top is None else top
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        yield folder[len(top) :].strip("/"), dirs, files


def list_class_dirs(root: str | os.PathLike) -> list[str]:
    """Sorted names of the non-hidden class folders in `root`; raises if there are none."""
    root = epath.Path(root)
    _check_root(root)
    _, names, _ = next(_walk(root))
    if not names:
        raise ValueError(
            f"Image folder {os.fspath(root)!r} has no class subfolders; put each class's images "
            f"in a folder named after the class. {_LAYOUT}"
        )
    return sorted(names)


def _list_images(root: epath.Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({NFC class name: image paths relative to root}, {NFC class name: its folders' names});
    every class folder is listed, even without images. Each class folder is walked on its own,
    so that a class folder that is a symlink is followed (links inside it are not)."""
    per_class: dict[str, list[str]] = {}
    spellings: dict[str, list[str]] = collections.defaultdict(list)
    _, class_dirs, _ = next(_walk(root))  # root's files are ignored
    for class_dir in class_dirs:
        _check_link(root, class_dir)
        spellings[nfc(class_dir)].append(class_dir)
        found = per_class.setdefault(nfc(class_dir), [])  # a class, with images or not
        for relative, _, files in _walk(root / class_dir):
            prefix = f"{class_dir}/{relative}".rstrip("/")
            found.extend(f"{prefix}/{f}" for f in files if _is_image(f))
    return per_class, dict(spellings)


def _check_link(root: epath.Path, class_dir: str) -> None:
    """A class folder that is a symlink must hold that class's images only: a link to the
    dataset root, to a folder above it or to another folder inside it (another class) would
    make one class of other classes' images. A link to a folder outside the root is followed."""
    link = os.path.join(os.fspath(root), class_dir)
    if not os.path.islink(link):  # also every non-local filesystem: no symlinks there
        return
    target, top = os.path.realpath(link), os.path.realpath(os.fspath(root))
    if target == top or top.startswith(target.rstrip(os.sep) + os.sep):
        where = "the dataset root" if target == top else "a folder above the dataset root"
    elif target.startswith(top + os.sep):
        where = f"{os.path.relpath(target, top)!r}, inside the dataset root"
    else:
        return
    raise ValueError(
        f"Image folder {os.fspath(root)!r}: class folder {class_dir!r} is a symlink to {target} "
        f"({where}); it would make one class of other classes' images. Remove the link, or "
        "point it at a folder of that class's images outside the root."
    )


def _warn_merged(root: str, spellings: dict[str, list[str]]) -> None:
    for name, dirs in spellings.items():
        if len(dirs) > 1:
            logging.warning(
                "Image folder %s: folders %s are one class name in Unicode NFC (%r, code points "
                "%s); their images are merged into that class.",
                root,
                " and ".join(f"{d!r} ({_code_points(d)})" for d in sorted(dirs)),
                name,
                _code_points(name),
            )


def _check_class_names(class_names: Sequence[str], folder_classes: list[str], root: str):
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a sequence of names, not the string {class_names!r}.")
    duplicates = sorted(c for c, n in collections.Counter(class_names).items() if n > 1)
    if duplicates:
        raise ValueError(f"class_names has duplicates (after NFC): {preview(duplicates)}.")
    unknown = sorted(set(folder_classes) - set(class_names))
    if unknown:
        raise ValueError(
            f"Image folder {root!r} has class folder(s) not in class_names: "
            f"{preview(unknown)}. Build query and gallery with eval_folders(...) so they share "
            "one mapping, or add the names to class_names, or remove those folders."
        )


class ImageFolder(ImageList):
    """Random-access source (grain protocol) over `root/<class_name>/<image>`.

    Attributes:
      root: the folder, as a string.
      image_size: side of the square images returned.
      classes: class names (NFC); a label is an index into this list.
      num_classes: len(classes).
      paths: image paths, sorted.
      ids: each image's path relative to root ('/'-separated, NFC): what it is, wherever the
        folder lives.
      labels: int32 array, the label of each path.
      skipped: unreadable paths dropped by the scan (only with skip_corrupt=True).
      num_skipped: len(skipped).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int,
        class_names: Sequence[str] | None = None,
        skip_corrupt: bool = False,
        scan: str = "header",
        preprocess: images.Preprocess | None = None,
    ):
        self.preprocess = images.Preprocess.of(image_size, preprocess)
        path = epath.Path(root)
        self.root = os.fspath(root)
        self.image_size = int(image_size)
        _check_root(path)
        per_class, spellings = _list_images(path)
        folder_classes = sorted(per_class)
        if not folder_classes:
            raise ValueError(
                f"Image folder {self.root!r} has no class subfolders; put each class's images "
                f"in a folder named after the class. {_LAYOUT}"
            )
        _warn_merged(self.root, spellings)
        if class_names is not None:
            class_names = [nfc(c) for c in class_names]
            _check_class_names(class_names, folder_classes, self.root)
        self.classes = list(folder_classes if class_names is None else class_names)
        self.num_classes = len(self.classes)
        if not any(per_class.values()):
            raise ValueError(
                f"Image folder {self.root!r} has {len(folder_classes)} class folder(s) but no "
                f"images in them (only .jpg, .jpeg and .png files are read). {_LAYOUT}"
            )
        self._check_no_empty_class(per_class, "has no images")

        label_of = {c: i for i, c in enumerate(self.classes)}
        # Sorted by id (the NFC relative path): the order of the full paths for NFC names, and
        # one order whichever way a name is spelled on disk.
        triples = sorted(
            (nfc(rel), os.fspath(path / rel), label_of[c])
            for c, rels in per_class.items()
            for rel in rels
        )
        paths = [p for _, p, _ in triples]
        keep, self.skipped = images.scan(
            paths, what=f"Image folder {self.root}", skip_corrupt=skip_corrupt, mode=scan
        )
        self.paths = [paths[i] for i in keep]
        self.ids = [triples[i][0] for i in keep]
        self.labels = np.array([triples[i][2] for i in keep], dtype=np.int32)
        self.num_skipped = len(self.skipped)
        if self.skipped:
            present = set(self.labels.tolist())
            lost = [c for c in folder_classes if label_of[c] not in present]
            self._check_no_empty_class({c: [] for c in lost}, "has only unreadable images")
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
    scan: str = "header",
    preprocess: images.Preprocess | None = None,
) -> tuple[ImageFolder, ImageFolder]:
    """Query and gallery sources sharing one label mapping: the sorted union of class names.

    A query class without a gallery folder is allowed (its queries have no positives); a warning
    says how many there are.
    """
    query_classes = {nfc(c) for c in list_class_dirs(query_dir)}
    gallery_classes = {nfc(c) for c in list_class_dirs(gallery_dir)}
    class_names = sorted(query_classes | gallery_classes)
    missing = sorted(query_classes - gallery_classes)
    if missing:
        logging.warning(
            "%d of %d query classes have no folder in gallery %s, so their queries have no "
            "positives: %s",
            len(missing),
            len(query_classes),
            os.fspath(gallery_dir),
            preview(missing),
        )
    options = {"image_size": image_size, "class_names": class_names, "skip_corrupt": skip_corrupt}
    query = ImageFolder(query_dir, scan=scan, preprocess=preprocess, **options)
    gallery = ImageFolder(gallery_dir, scan=scan, preprocess=preprocess, **options)
    return query, gallery


# ---------------------------------------------------------------------------------------------
# Wiring: data.name=folder.


def build(cfg, workdir: str | None) -> DatasetParts:
    """data.name=folder: data.folder.train_dir to train on, query_dir against gallery_dir (one
    shared label mapping) as the label mAP and Recall@K test; or all three from `data.prepared`
    (written by `prepare --dataset=folder`, with the old split recorded there)."""
    del workdir  # The old split is drawn from the config or read from the prepared data.
    if cfg.prepared:
        train, split = prepared.train_and_split(cfg)
        query, gallery = (prepared.source(cfg, s) for s in ("query", "gallery"))
        return DatasetParts(
            train=train,
            tests=[label_test("folder", query, gallery)],
            description=f"folder (prepared {cfg.prepared})",
            old_split=split,
        )
    f = cfg.folder
    for key in ("train_dir", "query_dir", "gallery_dir"):
        if not f[key]:
            raise ValueError(
                f"data.name=folder needs data.folder.{key}: a folder laid out "
                "as <dir>/<class_name>/<image> (or data.prepared)"
            )
        require_dir(f[key], f"data.folder.{key}")
    options = {**images.read_options(cfg), "preprocess": images.preprocess_from_config(cfg)}
    train = ImageFolder(f.train_dir, image_size=cfg.image_size, **options)
    query, gallery = eval_folders(f.query_dir, f.gallery_dir, image_size=cfg.image_size, **options)
    return DatasetParts(
        train=train,
        tests=[label_test("folder", query, gallery)],
        description=f"folder {f.train_dir}",
    )
