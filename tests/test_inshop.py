"""Tests for bcl_jax.data.inshop on a tiny fake In-shop tree written with PIL."""

import grain
import numpy as np
import pytest
from PIL import Image

from bcl_jax.data import inshop, splits
from bcl_jax.data.inshop import InShopSource, evaluate, read_partition

HEADER = "image_name item_id evaluation_status"

# (path, item id, status), in file order. Train items: id_03, id_01 (sorted -> 0, 1).
# Eval items: id_02, id_04, id_05 (sorted union -> 0, 1, 2); id_05 is gallery-only.
ROWS = [
    ("img/WOMEN/Dresses/id_03/01_1_front.jpg", "id_03", "train"),
    ("img/WOMEN/Dresses/id_03/01_2_side.jpg", "id_03", "train"),
    ("img/MEN/Tees/id_01/01_1_front.jpg", "id_01", "train"),
    ("img/WOMEN/Dresses/id_02/01_1_front.jpg", "id_02", "query"),
    ("img/WOMEN/Dresses/id_02/01_2_side.jpg", "id_02", "gallery"),
    ("img/MEN/Tees/id_04/01_1_front.jpg", "id_04", "gallery"),
    ("img/MEN/Tees/id_04/01_2_side.jpg", "id_04", "query"),
    ("img/MEN/Tees/id_05/01_1_front.jpg", "id_05", "gallery"),
]


def _write_partition(root, rows=ROWS, count=None, header=HEADER, sep="  "):
    lines = [str(len(rows) if count is None else count), header]
    lines += [sep.join(r) if isinstance(r, tuple) else r for r in rows]
    (root / inshop.PARTITION_FILE).write_text("\n".join(lines) + "\n")


def _write_images(root, rows=ROWS):
    for k, (path, _, _) in enumerate(rows):
        p = root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 8), (20 * k, 255 - 20 * k, 7)).save(p)


@pytest.fixture
def root(tmp_path):
    _write_partition(tmp_path)
    _write_images(tmp_path)
    return tmp_path


def test_read_partition_labels(root):
    parts = read_partition(root)
    train, query, gallery = parts["train"], parts["query"], parts["gallery"]
    assert train.paths == [r[0] for r in ROWS[:3]]
    assert train.classes == ["id_01", "id_03"]
    np.testing.assert_array_equal(train.labels, [1, 1, 0])
    assert train.labels.dtype == np.int32 and train.num_classes == 2
    # Query and gallery share one label space over the union of their items.
    assert query.classes == gallery.classes == ["id_02", "id_04", "id_05"]
    assert query.item_ids == ["id_02", "id_04"]
    np.testing.assert_array_equal(query.labels, [0, 1])
    np.testing.assert_array_equal(gallery.labels, [0, 1, 2])
    assert gallery.labels.dtype == np.int32 and len(gallery) == 3


def test_read_partition_tolerates_spaces_tabs_and_blank_lines(tmp_path):
    rows = ["   ".join(r) + "  " for r in ROWS[:3]] + ["", "\t".join(ROWS[3])] + list(ROWS[4:])
    _write_partition(tmp_path, rows=rows, count=len(ROWS))
    parts = read_partition(tmp_path)
    assert len(parts["train"]) == 3 and len(parts["query"]) == 2 and len(parts["gallery"]) == 3


@pytest.mark.parametrize(
    "kwargs, line, message",
    [
        ({"count": 7}, 1, "says 7 images but the file lists 8"),
        ({"count": "eight"}, 1, "number of images"),
        ({"header": "image_name item_id"}, 2, "header"),
        ({"rows": ROWS[:4] + [("img/x.jpg", "id_02", "val")] + ROWS[5:]}, 7, "unknown"),
        ({"rows": ROWS[:2] + [("img/x.jpg", "id_01")] + ROWS[3:]}, 5, "3 columns"),
        ({"rows": ROWS[:5] + [("img/x.jpg id_04 gallery extra")] + ROWS[6:]}, 8, "got 4"),
        ({"rows": ROWS[:1] + [("img/y.jpg", "id_04", "train")] + ROWS[2:]}, 4, "id_04"),
        ({"rows": ROWS + [ROWS[0]]}, 11, "already listed on line 3"),
    ],
)
def test_read_partition_errors_name_file_and_line(tmp_path, kwargs, line, message):
    _write_partition(tmp_path, **kwargs)
    with pytest.raises(ValueError, match=message) as err:
        read_partition(tmp_path)
    assert f"{inshop.PARTITION_FILE}, line {line}:" in str(err.value)


def test_read_partition_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        read_partition(tmp_path)


def test_sources(root):
    query, gallery = inshop.eval_sources(root, image_size=6)
    train = InShopSource(root, "train", image_size=6)
    assert (len(train), len(query), len(gallery)) == (3, 2, 3)
    assert train.num_classes == 2 and query.num_classes == gallery.num_classes == 3
    assert query.classes == gallery.classes
    assert train.paths[0] == str(root / ROWS[0][0])
    np.testing.assert_array_equal(gallery.labels, [0, 1, 2])
    record = gallery[1]
    assert record["image"].shape == (6, 6, 3) and record["image"].dtype == np.uint8
    assert record["label"].dtype == np.int32 and int(record["label"]) == 1
    colour = record["image"][3, 3].astype(int)  # JPEG: within a few levels of the saved colour
    np.testing.assert_allclose(colour, (20 * 5, 255 - 20 * 5, 7), atol=4)
    loader = grain.MapDataset.source(query)
    assert [int(r["label"]) for r in loader] == [0, 1]


def test_source_argument_errors(root):
    with pytest.raises(ValueError, match="split"):
        InShopSource(root, "val", image_size=6)
    with pytest.raises(ValueError, match="image_size"):
        InShopSource(root, "train", image_size=0)


def test_source_empty_split(tmp_path):
    _write_partition(tmp_path, rows=ROWS[:3])
    _write_images(tmp_path, ROWS[:3])
    with pytest.raises(ValueError, match="no 'query' images"):
        InShopSource(tmp_path, "query", image_size=6)


def test_source_reports_missing_images(root):
    (root / ROWS[5][0]).unlink()
    (root / ROWS[7][0]).unlink()
    InShopSource(root, "train", image_size=6)  # other splits are unaffected
    with pytest.raises(FileNotFoundError, match="gallery images.*2 of 3 images are missing") as err:
        InShopSource(root, "gallery", image_size=6)
    assert "id_04/01_1_front.jpg" in str(err.value) and "id_05" in str(err.value)


def test_corrupt_image_raises_when_read(root):
    (root / ROWS[0][0]).write_bytes(b"not a jpeg")
    with pytest.raises(inshop.CorruptImageError, match=ROWS[0][0]):
        InShopSource(root, "train", image_size=6)  # the scan finds it
    source = InShopSource(root, "train", image_size=6, scan="off")
    with pytest.raises(inshop.CorruptImageError):
        source[0]


def test_old_split_on_inshop_labels(root):
    train = read_partition(root)["train"]
    split = splits.old_split(train.labels, train.num_classes, fraction=0.5, mode="classes", seed=3)
    assert split.num_old_classes == 1
    (old_class,) = np.flatnonzero(split.old_label >= 0)
    np.testing.assert_array_equal(split.indices, np.flatnonzero(train.labels == old_class))
    again = splits.old_split(train.labels, train.num_classes, fraction=0.5, mode="classes", seed=3)
    np.testing.assert_array_equal(again.indices, split.indices)


def _query_scores(num_gallery, rank_of):
    """Scores over an identity-embedded gallery putting item j at rank rank_of[j] (1-based);
    the remaining items fill the other ranks in index order."""
    taken = set(rank_of.values())
    free = iter(r for r in range(1, num_gallery + 1) if r not in taken)
    ranks = [rank_of[j] if j in rank_of else next(free) for j in range(num_gallery)]
    return np.array([1.0 - r / (2 * num_gallery) for r in ranks], np.float32)


def test_evaluate_hand_computed():
    n = 50  # KS goes up to 50, so the gallery needs at least 50 items
    gallery_emb = np.eye(n, dtype=np.float32)
    gallery_labels = np.arange(100, 100 + n)  # unique labels that match no query ...
    gallery_labels[[0, 1]] = 0  # ... except items 0, 1 (label 0), 2, 3 (label 1), 4 (label 2)
    gallery_labels[[2, 3]] = 1
    gallery_labels[4] = 2
    query_emb = np.stack(
        [
            _query_scores(n, {0: 1, 1: 3}),  # AP = (1/1 + 2/3) / 2 = 5/6, hit at 1
            _query_scores(n, {2: 5, 3: 20}),  # AP = (1/5 + 2/20) / 2 = 0.15, hit at 5
            _query_scores(n, {4: 12}),  # AP = 1/12, hit at 12
            _query_scores(n, {}),  # label 7 is not in the gallery: excluded
        ]
    )
    query_labels = np.array([0, 1, 2, 7])
    result = evaluate(query_emb, query_labels, gallery_emb, gallery_labels)
    assert result["num_queries"] == 3 and result["num_queries_without_positives"] == 1
    np.testing.assert_allclose(result["mAP"], (5 / 6 + 0.15 + 1 / 12) / 3, rtol=1e-6)
    np.testing.assert_allclose(result["recall@1"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(result["recall@10"], 2 / 3, rtol=1e-6)
    for k in (20, 30, 40, 50):
        assert result[f"recall@{k}"] == 1.0
    assert set(result) == {f"recall@{k}" for k in inshop.KS} | {
        "mAP",
        "num_queries",
        "num_queries_without_positives",
    }


def test_evaluate_needs_gallery_of_at_least_50():
    emb = np.eye(10, dtype=np.float32)
    with pytest.raises(ValueError, match="K must be"):
        evaluate(emb, np.arange(10), emb, np.arange(10))
