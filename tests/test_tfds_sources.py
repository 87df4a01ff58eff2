"""Tests for bcl_jax.data.tfds_sources on tiny datasets written in tfds' array_record layout.

`tfds.testing.mock_data` cannot serve these tests without TensorFlow: with `decoders` its fake
generator encodes random images with TF, and random bounding boxes fail validation. So the fake
datasets are real tfds data dirs, written with the real builders' features (serialised by tfds'
own proto code), array_record shards and dataset_info.json, and read back through the real
`tfds.data_source`.
"""

import io
import os
import pickle

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from bcl_jax.data import tfds_sources
from bcl_jax.data.folder import CorruptImageError, load_image
from bcl_jax.data.tfds_sources import DATASETS, TfdsSource, evaluate

IMAGE_SIZE = 12

# The tfds class ids of the fake records, per tfds split, in the order written.
CLASS_IDS = {
    "cub": {"train": [3, 150, 3, 99, 100, 199, 57], "test": [150, 0, 120, 99, 3]},
    "cars": {"train": [97, 98, 0, 195, 97], "test": [10, 98, 150, 0]},
    "sop": {"train": [5, 0, 11317, 5, 42], "test": [22633, 11318, 20000, 11318]},
}
# Hand-made dense label maps {tfds class id: label} of each DML split.
MAPPINGS = {
    "cub": {"train": {0: 0, 3: 1, 57: 2, 99: 3}, "test": {100: 0, 120: 1, 150: 2, 199: 3}},
    "cars": {"train": {0: 0, 10: 1, 97: 2}, "test": {98: 0, 150: 1, 195: 2}},
    "sop": {"train": {0: 0, 5: 1, 42: 2, 11317: 3}, "test": {11318: 0, 20000: 1, 22633: 2}},
}
# The tfds splits each DML split reads, in order.
TFDS_SPLITS = {
    "cub": {"train": ("train", "test"), "test": ("train", "test")},
    "cars": {"train": ("train", "test"), "test": ("train", "test")},
    "sop": {"train": ("train",), "test": ("test",)},
}


def _image_bytes(rng, k: int) -> bytes:
    """A random image; sizes, formats and modes vary with k (non-square, JPEG/PNG, grey)."""
    h, w = 9 + (7 * k) % 23, 9 + (11 * k) % 29
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if k % 3 == 2:
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if k % 2 else "PNG")
    return buf.getvalue()


def _mask_bytes(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 2, (6, 5), dtype=np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _example(dataset: str, class_id: int, image: bytes, rng, key: str) -> dict:
    bbox = tfds.features.BBox(ymin=0.1, xmin=0.2, ymax=0.6, xmax=0.9)
    if dataset == "sop":
        return {
            "class_id": class_id,
            "super_class_id/num": class_id % 12,
            "super_class_id": "chair",
            "image": image,
        }
    if dataset == "cub":
        return {
            "image": image,
            "image/filename": key,
            "label": class_id,
            "label_name": f"bird_{class_id}",
            "bbox": bbox,
            "segmentation_mask": _mask_bytes(rng),
        }
    return {"image": image, "label": class_id, "bbox": bbox, "id": key}


def write_tfds(data_dir, dataset, class_ids=None, *, images=None, file_format="array_record"):
    """Writes a tfds data dir for `dataset`; returns {tfds split: [image bytes]}."""
    class_ids = CLASS_IDS[dataset] if class_ids is None else class_ids
    rng = np.random.default_rng(0)
    builder = tfds.builder(
        DATASETS[dataset].tfds_name, data_dir=os.fspath(data_dir), file_format=file_format
    )
    os.makedirs(builder.data_path)
    written, infos = {}, []
    for split, ids in class_ids.items():
        written[split] = [_image_bytes(rng, k) for k in range(len(ids))]
        if images and split in images:
            written[split] = images[split]
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_path,
            dataset_name=builder.name,
            split=split,
            filetype_suffix=file_format,
        )
        if file_format == "array_record":
            path = template.sharded_filepath(shard_index=0, num_shards=1)
            writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
            for k, (c, image) in enumerate(zip(ids, written[split])):
                ex = _example(dataset, c, image, rng, f"{split}_{k}")
                writer.write(builder.info.features.serialize_example(ex))
            writer.close()
        infos.append(
            tfds.core.SplitInfo(
                name=split, shard_lengths=[len(ids)], num_bytes=0, filename_template=template
            )
        )
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_path)
    return written


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """{dataset: (data_dir, {tfds split: [image bytes]})}, written once for the module."""
    out = {}
    for dataset in DATASETS:
        data_dir = tmp_path_factory.mktemp(dataset)
        out[dataset] = (str(data_dir), write_tfds(data_dir, dataset))
    return out


def _raw(dataset, data_dir, tfds_split, **kwargs):
    return tfds.data_source(
        DATASETS[dataset].tfds_name, split=tfds_split, data_dir=data_dir, download=False, **kwargs
    )


def test_specs_match_the_tfds_builders(tmp_path):
    assert set(DATASETS) == {"sop", "cub", "cars"}
    assert DATASETS["sop"].ks == (1, 10, 100, 1000)
    assert DATASETS["cub"].ks == DATASETS["cars"].ks == (1, 2, 4, 8)
    total = {"sop": 22634, "cub": 200, "cars": 196}
    for name, spec in DATASETS.items():
        features = tfds.builder(spec.tfds_name, data_dir=str(tmp_path)).info.features
        assert isinstance(features[spec.label_key], tfds.features.ClassLabel)
        assert features[spec.label_key].num_classes == total[name]
        assert sum(spec.num_classes.values()) == total[name]
        image_keys = {k for k, f in features.items() if isinstance(f, tfds.features.Image)}
        assert set(spec.image_features) == image_keys  # every image feature is skipped
        if spec.class_ranges is not None:
            train, test = spec.class_ranges["train"], spec.class_ranges["test"]
            assert (train.start, train.stop, test.stop) == (0, test.start, total[name])
            assert len(train) == spec.num_classes["train"]
            assert len(test) == spec.num_classes["test"]


@pytest.mark.parametrize("dataset", ["cub", "cars", "sop"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_class_split_labels_and_images(data_dirs, dataset, split):
    data_dir, written = data_dirs[dataset]
    ds = TfdsSource(dataset, split, data_dir=data_dir, image_size=IMAGE_SIZE)

    # Reference: every record read with tfds' full decoding, in the order of the tfds splits.
    raw_labels, raw_images, raw_bytes = [], [], []
    for tfds_split in TFDS_SPLITS[dataset][split]:
        full = _raw(dataset, data_dir, tfds_split)
        raw_labels += [int(full[i][DATASETS[dataset].label_key]) for i in range(len(full))]
        raw_images += [full[i]["image"] for i in range(len(full))]
        raw_bytes += written[tfds_split]
    written_ids = [c for s in TFDS_SPLITS[dataset][split] for c in CLASS_IDS[dataset][s]]
    assert raw_labels == written_ids  # the fake data dir holds what was written

    mapping = MAPPINGS[dataset][split]
    positions = [k for k, c in enumerate(raw_labels) if c in mapping]
    assert ds.record_indices.tolist() == positions
    assert len(ds) == len(positions)
    assert ds.labels.dtype == np.int32
    assert ds.labels.tolist() == [mapping[raw_labels[k]] for k in positions]
    assert ds.num_classes == len(mapping)
    assert ds.classes.tolist() == sorted(mapping)
    # Labels read without decoding images equal the labels read with full decoding.
    assert ds.classes[ds.labels].tolist() == [raw_labels[k] for k in positions]
    # Train classes and test classes never mix.
    other = MAPPINGS[dataset]["test" if split == "train" else "train"]
    assert not set(ds.classes.tolist()) & set(other)

    for i, k in enumerate(positions):
        item = ds[i]
        assert item["image"].dtype == np.uint8
        assert item["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert item["label"].dtype == np.int32 and item["label"] == ds.labels[i]
        np.testing.assert_array_equal(
            item["image"], load_image(io.BytesIO(raw_bytes[k]), IMAGE_SIZE)
        )
        assert raw_images[k].shape[:2] == Image.open(io.BytesIO(raw_bytes[k])).size[::-1]

    assert repr(ds) == (
        f"TfdsSource(dataset={dataset!r}, split={split!r}, data_dir={data_dir!r}, "
        f"images={len(positions)}, classes={len(mapping)}, image_size={IMAGE_SIZE})"
    )


def test_image_bytes_are_read_without_decoding(data_dirs, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tfds decoded an image")

    monkeypatch.setattr(tfds.features.Image, "decode_example_np", fail)
    data_dir, written = data_dirs["cub"]
    ds = TfdsSource("cub", "test", data_dir=data_dir, image_size=IMAGE_SIZE)
    assert ds[0]["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)  # decoded by load_image
    record = ds._source[0]
    assert record["image"] == written["train"][0]  # the stored bytes, undecoded
    assert isinstance(record["segmentation_mask"], bytes)


def test_pickles_and_feeds_grain(data_dirs):
    data_dir, _ = data_dirs["cars"]
    ds = TfdsSource("cars", "train", data_dir=data_dir, image_size=IMAGE_SIZE)
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy.labels, ds.labels)
    np.testing.assert_array_equal(copy[1]["image"], ds[1]["image"])
    item = grain.MapDataset.source(ds)[2]
    np.testing.assert_array_equal(item["image"], ds[2]["image"])


def _reference_metrics(emb, labels, ks):
    """NumPy float64 Recall@K and mAP, each query removed from its own gallery."""
    emb, labels = np.asarray(emb, np.float64), np.asarray(labels)
    hits, aps = {k: [] for k in ks}, []
    for q in range(len(emb)):
        others = [g for g in range(len(emb)) if g != q]
        scores = emb[others] @ emb[q]
        ranked = [others[j] for j in np.argsort(-scores, kind="stable")]
        rel = np.array([labels[g] == labels[q] for g in ranked])
        if not rel.any():
            continue
        for k in ks:
            hits[k].append(float(rel[:k].any()))
        ranks = np.flatnonzero(rel) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    out = {f"recall@{k}": np.mean(hits[k]) for k in ks}
    return out | {"mAP": np.mean(aps), "num_queries": len(aps)}


def test_evaluate_matches_numpy_tiny():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(11, 4))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 1, 0, 2, 1, 0, 3, 2, 1, 4, 0])  # classes 3 and 4: no positives
    got = evaluate(emb.astype(np.float32), labels, dataset="cub", query_block=4)
    want = _reference_metrics(emb, labels, (1, 2, 4, 8))
    assert got["num_queries"] == want["num_queries"] == 9
    assert got["num_queries_without_positives"] == 2
    assert set(got) == set(want) | {"num_queries_without_positives"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    # Self-exclusion matters: with the query in its own gallery, Recall@1 would be 1.
    assert got["recall@1"] < 1.0


def test_evaluate_matches_numpy_sop_ks():
    rng = np.random.default_rng(2)  # SOP's Recall@1000 needs more than 1000 gallery items
    emb = rng.normal(size=(1010, 3))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 400, size=len(emb))
    got = evaluate(emb.astype(np.float32), labels, dataset="sop", query_block=512)
    want = _reference_metrics(emb, labels, (1, 10, 100, 1000))
    assert {k for k in got if k.startswith("recall@")} == {
        f"recall@{k}" for k in DATASETS["sop"].ks
    }
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key


def test_argument_errors(data_dirs, tmp_path):
    data_dir, _ = data_dirs["cub"]
    with pytest.raises(ValueError, match="Unknown tfds dataset 'inshop'; known: sop, cub, cars"):
        TfdsSource("inshop", "train", data_dir=data_dir, image_size=8)
    with pytest.raises(ValueError, match="known: sop, cub, cars"):
        evaluate(np.eye(2), [0, 0], dataset="birds")
    with pytest.raises(ValueError, match=r"split='query' is not one of \('train', 'test'\)"):
        TfdsSource("cub", "query", data_dir=data_dir, image_size=8)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="image_size must be a positive int"):
            TfdsSource("cub", "train", data_dir=data_dir, image_size=bad)
    with pytest.raises(ValueError, match="data_dir is not set"):
        TfdsSource("cub", "train", data_dir="", image_size=8)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        TfdsSource("sop", "train", data_dir=missing, image_size=8)
    assert (
        f"tfds build stanford_online_products --data_dir={missing} --file_format=array_record"
        in str(e.value)
    )


def test_not_prepared_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cars196 is not prepared") as e:
        TfdsSource("cars", "train", data_dir=str(tmp_path), image_size=8)
    message = str(e.value)
    assert f"tfds build cars196 --data_dir={tmp_path} --file_format=array_record" in message
    assert 'file_format="array_record").download_and_prepare()' in message
    assert "TensorFlow" in message


def test_wrong_file_format_error(tmp_path):
    write_tfds(tmp_path, "cars", file_format="tfrecord")
    with pytest.raises(RuntimeError, match="array_record format") as e:
        TfdsSource("cars", "test", data_dir=str(tmp_path), image_size=8)
    assert "tfds build cars196" in str(e.value)


def test_empty_split_error(tmp_path):
    write_tfds(tmp_path, "cub", {"train": [1, 2], "test": [5]})  # no class >= 100
    assert len(TfdsSource("cub", "train", data_dir=str(tmp_path), image_size=8)) == 3
    with pytest.raises(ValueError, match="has no 'test' examples"):
        TfdsSource("cub", "test", data_dir=str(tmp_path), image_size=8)


def test_corrupt_image_error(tmp_path):
    images = {"train": [b"not an image", _image_bytes(np.random.default_rng(0), 0)]}
    write_tfds(tmp_path, "sop", {"train": [4, 7], "test": [11400]}, images=images)
    ds = TfdsSource("sop", "train", data_dir=str(tmp_path), image_size=8)
    assert ds[1]["image"].shape == (8, 8, 3)
    with pytest.raises(CorruptImageError, match="sop train example 0"):
        ds[0]


def test_unexpected_class_count_is_logged(data_dirs, caplog):
    data_dir, _ = data_dirs["cars"]
    with caplog.at_level("WARNING", logger="absl"):
        TfdsSource("cars", "test", data_dir=data_dir, image_size=8)
    assert "standard protocol has 98" in caplog.text
    assert tfds_sources.get_spec("cars").tfds_name == "cars196"
