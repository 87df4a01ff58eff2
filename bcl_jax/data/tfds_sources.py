"""Stanford Online Products, CUB-200-2011 and Cars196, read from tfds-prepared data (method.md §7).

The datasets are prepared once by TensorFlow Datasets in the array_record file format, in an
environment that has TensorFlow (tfds' builders and its CLI import it to read the original files)::

    pip install tensorflow tensorflow-datasets
    tfds build stanford_online_products --data_dir=DATA_DIR --file_format=array_record
    tfds build caltech_birds2011 --data_dir=DATA_DIR --file_format=array_record
    tfds build cars196 --data_dir=DATA_DIR --file_format=array_record

or in Python: ``tfds.builder(name, data_dir=DATA_DIR, file_format="array_record")
.download_and_prepare()``. Reading them needs no TensorFlow: `TfdsSource` opens
``tfds.data_source(name, split=..., data_dir=DATA_DIR, download=False)`` (random access) and never
downloads or prepares anything itself.

Splits follow the deep-metric-learning protocol, by class, with each split labelled densely
0..C-1 over its sorted tfds class ids:

- SOP (`stanford_online_products`, label `class_id`): tfds' `train` (11,318 classes) and `test`
  (11,316 classes) already are the DML splits.
- CUB-200-2011 (`caltech_birds2011`, label `label`): tfds' `train`/`test` splits are the
  classification split (by image, over all 200 classes), so both are read together
  (``train+test``) and split by class: 0-99 train, 100-199 test.
- Cars196 (`cars196`, label `label`): likewise, classes 0-97 train, 98-195 test.

The test split is both query set and gallery, each query excluded from its own ranking; `evaluate`
gives Recall@K (K = 1, 10, 100, 1000 for SOP; 1, 2, 4, 8 for CUB and Cars) and mAP.

Labels are read at construction without decoding any image (tfds' `SkipDecoding` on the image
features); `ds[i]` decodes the stored image bytes with `images.load_image` (RGB, shorter side
resized, centre crop), as every bcl_jax source does.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
from absl import logging
from etils import epath

try:
    import tensorflow_datasets as tfds
except ModuleNotFoundError as e:  # an extra: only these three datasets need it
    raise ModuleNotFoundError(
        'data.name=sop|cub|cars reads TensorFlow Datasets: pip install "bcl_jax[tfds]" '
        '(or tensorflow-datasets==4.9.10, as requirements-test.txt pins it)'
    ) from e

from bcl_jax import metrics
from bcl_jax.data.dataset import DatasetParts, label_test
from bcl_jax.data.images import (
    CorruptImageError,
    Preprocess,
    load_image,
    load_train_image,
    preprocess_from_config,
)

SPLITS = ("train", "test")
_READ_CHUNK = 4096  # Records deserialised per batched read while collecting labels.


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is read from tfds and evaluated.

    Attributes:
      tfds_name: the tfds builder name.
      label_key: the feature holding the class id.
      class_ranges: None when tfds' `train`/`test` splits already are the DML splits; otherwise
        {split: range of tfds class ids}, and both tfds splits are read together and split by
        class.
      num_classes: the protocol's number of classes per split (a warning is logged otherwise).
      ks: the K of Recall@K.
      image_features: image features left undecoded (`image` is decoded by `load_image`; the
        others, e.g. CUB's segmentation masks, are never needed).
    """

    tfds_name: str
    label_key: str
    class_ranges: dict[str, range] | None
    num_classes: dict[str, int]
    ks: tuple[int, ...]
    image_features: tuple[str, ...] = ("image",)

    def prepare_command(self, data_dir: str = "DATA_DIR") -> str:
        return f"tfds build {self.tfds_name} --data_dir={data_dir} --file_format=array_record"


DATASETS = {
    "sop": DatasetSpec(
        tfds_name="stanford_online_products",
        label_key="class_id",
        class_ranges=None,
        num_classes={"train": 11318, "test": 11316},
        ks=(1, 10, 100, 1000),
    ),
    "cub": DatasetSpec(
        tfds_name="caltech_birds2011",
        label_key="label",
        class_ranges={"train": range(100), "test": range(100, 200)},
        num_classes={"train": 100, "test": 100},
        ks=(1, 2, 4, 8),
        image_features=("image", "segmentation_mask"),
    ),
    "cars": DatasetSpec(
        tfds_name="cars196",
        label_key="label",
        class_ranges={"train": range(98), "test": range(98, 196)},
        num_classes={"train": 98, "test": 98},
        ks=(1, 2, 4, 8),
    ),
}


def get_spec(dataset: str) -> DatasetSpec:
    """The `DATASETS` entry of `dataset`; ValueError listing the known names otherwise."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown tfds dataset {dataset!r}; known: {', '.join(DATASETS)}.")
    return DATASETS[dataset]


def _prepare_hint(spec: DatasetSpec, data_dir: str) -> str:
    return (
        f"Prepare it once, in an environment with TensorFlow installed (pip install tensorflow), "
        f"with `{spec.prepare_command(data_dir)}` or, in Python, "
        f"`tfds.builder({spec.tfds_name!r}, data_dir={data_dir!r}, "
        f'file_format="array_record").download_and_prepare()`.'
    )


def _is_prepared(spec: DatasetSpec, data_dir: str) -> bool:
    """Whether some version of the dataset has a dataset_info.json under `data_dir`."""
    root = epath.Path(data_dir) / spec.tfds_name
    if not root.is_dir():
        return False
    return any((version / "dataset_info.json").is_file() for version in root.iterdir())


def _open(spec: DatasetSpec, tfds_split: str, data_dir: str):
    """`tfds.data_source` with the image features left as encoded bytes; clear errors."""
    try:
        return tfds.data_source(
            spec.tfds_name,
            split=tfds_split,
            data_dir=data_dir,
            download=False,
            decoders={key: tfds.decode.SkipDecoding() for key in spec.image_features},
        )
    except Exception as e:  # tfds raises NotImplementedError, ValueError, ... here.
        if not _is_prepared(spec, data_dir):
            # tfds then falls back to the builder's code and complains about the file format.
            raise FileNotFoundError(
                f"{spec.tfds_name} is not prepared in data_dir {data_dir!r} (no "
                f"{spec.tfds_name}/<version>/dataset_info.json). {_prepare_hint(spec, data_dir)}"
            ) from e
        raise RuntimeError(
            f"Cannot open {spec.tfds_name} split {tfds_split!r} in {data_dir!r} as a random-access "
            f"tfds data source ({type(e).__name__}: {e}). It must be prepared in the array_record "
            f"format; delete {os.fspath(epath.Path(data_dir) / spec.tfds_name)!r} and prepare it "
            "again. " + _prepare_hint(spec, data_dir)
        ) from e


def _read_labels(source, label_key: str) -> np.ndarray:
    """The int64 class id of every record (the images are not decoded)."""
    labels = np.empty(len(source), dtype=np.int64)
    for start in range(0, len(source), _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, len(source))))
        labels[start : start + len(keys)] = [r[label_key] for r in source.__getitems__(keys)]
    return labels


class TfdsSource:
    """Random-access source (grain protocol) over one DML split of SOP, CUB or Cars.

    `ds[i]` is `{"image": uint8 (image_size, image_size, 3), "label": int32 scalar}`.

    Attributes:
      dataset, split, data_dir, image_size: as given.
      spec: the dataset's `DatasetSpec`.
      labels: (len,) int32, dense 0..num_classes-1 within the split.
      classes: (num_classes,) int64, the tfds class id of each label, sorted.
      num_classes: len(classes).
      record_indices: (len,) int64, each example's index in the tfds data source (`train` for
        SOP's train split, `test` for its test split, `train+test` for CUB and Cars).
    """

    def __init__(
        self,
        dataset: str,
        split: str,
        *,
        data_dir: str | os.PathLike,
        image_size: int,
        preprocess: Preprocess | None = None,
    ):
        spec = get_spec(dataset)
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}.")
        self.preprocess = Preprocess.of(image_size, preprocess)
        if not data_dir:
            raise ValueError(
                f"data_dir is not set; point it to the tfds data_dir holding {spec.tfds_name}. "
                + _prepare_hint(spec, "DATA_DIR")
            )
        data_dir = os.fspath(data_dir)
        if not epath.Path(data_dir).is_dir():
            raise FileNotFoundError(
                f"tfds data_dir {data_dir!r} (data.tfds.data_dir) does not exist. "
                + _prepare_hint(spec, data_dir)
            )
        self.dataset, self.split, self.spec = dataset, split, spec
        self.data_dir, self.image_size = data_dir, int(image_size)

        tfds_split = split if spec.class_ranges is None else "+".join(SPLITS)
        self._source = _open(spec, tfds_split, data_dir)
        class_ids = _read_labels(self._source, spec.label_key)
        if spec.class_ranges is None:
            keep = np.ones(len(class_ids), dtype=bool)
        else:
            wanted = spec.class_ranges[split]
            keep = (class_ids >= wanted.start) & (class_ids < wanted.stop)
        self.record_indices = np.flatnonzero(keep)
        if not len(self.record_indices):
            raise ValueError(
                f"{spec.tfds_name} in {data_dir!r} has no {split!r} examples "
                f"(tfds split {tfds_split!r}, {len(class_ids)} records). "
                + _prepare_hint(spec, data_dir)
            )
        self.classes, labels = np.unique(class_ids[keep], return_inverse=True)
        self.labels = labels.astype(np.int32)
        self.num_classes = len(self.classes)
        expected = spec.num_classes[split]
        if self.num_classes != expected:
            logging.warning(
                "%s %s: %d classes, but the standard protocol has %d; is the tfds data complete?",
                dataset,
                split,
                self.num_classes,
                expected,
            )
        logging.info(
            "%s %s (tfds %s %s): %d images, %d classes.",
            dataset,
            split,
            spec.tfds_name,
            tfds_split,
            len(self),
            self.num_classes,
        )

    @property
    def ids(self) -> list[str]:
        """Each example's record index in the tfds data source, as text."""
        return [str(i) for i in self.record_indices.tolist()]

    @property
    def identity(self) -> dict:
        return {"tfds": self.spec.tfds_name, "split": self.split}

    def __len__(self) -> int:
        return len(self.record_indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._item(index, train=False)

    def train_item(self, index: int) -> dict[str, np.ndarray]:
        """The image with its shorter side at `train_resize_size`, for random crops."""
        return self._item(index, train=True)

    def _item(self, index: int, *, train: bool) -> dict[str, np.ndarray]:
        index = int(index)
        record_index = int(self.record_indices[index])
        data = io.BytesIO(self._source[record_index]["image"])
        try:
            if train:
                image = load_train_image(data, self.preprocess.train_size)
            else:
                image = load_image(data, self.image_size, **self.preprocess.eval_args())
        except CorruptImageError as e:
            raise CorruptImageError(
                f"{self.dataset} {self.split} example {index} (tfds {self.spec.tfds_name} record "
                f"{record_index} in {self.data_dir!r}): cannot decode the image ({e.reason})."
            ) from e
        return {"image": image, "label": np.int32(self.labels[index])}

    def __repr__(self) -> str:
        return (
            f"TfdsSource(dataset={self.dataset!r}, split={self.split!r}, "
            f"data_dir={self.data_dir!r}, images={len(self)}, classes={self.num_classes}, "
            f"image_size={self.image_size})"
        )


def evaluate(embeddings, labels, *, dataset: str, query_block: int = 256) -> dict:
    """Recall@K (the dataset's `ks`) and mAP of the test split against itself, self excluded."""
    spec = get_spec(dataset)
    return metrics.retrieval_metrics(
        embeddings,
        labels,
        embeddings,
        labels,
        ks=spec.ks,
        query_block=query_block,
        exclude_self=True,
    )


def build(cfg, workdir: str | None) -> DatasetParts:
    """data.name = sop, cub or cars: the DML train split, and the test split searched against
    itself (each query excluded) with the dataset's Recall@K."""
    del workdir  # Nothing is written: the old split is drawn from the config.
    spec = get_spec(cfg.name)
    options = {"image_size": cfg.image_size, "preprocess": preprocess_from_config(cfg)}
    train, test = (
        TfdsSource(cfg.name, split, data_dir=cfg.tfds.data_dir, **options) for split in SPLITS
    )
    return DatasetParts(
        train=train,
        tests=[label_test(cfg.name, test, ks=spec.ks)],
        description=f"{cfg.name} (tfds)",
    )
