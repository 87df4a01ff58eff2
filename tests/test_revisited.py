"""Tests for bcl_jax.data.revisited on a tiny fake Revisited Oxford written in the real layout."""

import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from bcl_jax.data import revisited
from bcl_jax.data.folder import CorruptImageError
from bcl_jax.data.revisited import RevisitedSource, evaluate, load_gnd, protocol_gnd

RED, BLUE = (255, 0, 0), (0, 0, 255)

DATABASE = [
    "all_souls_000001",
    "ashmolean_000002",
    "balliol_000003",
    "bodleian_000004",
    "keble_000005",
    "magdalen_000006",
]
QUERIES = ["all_souls_000013", "christ_church_000179", "radcliffe_camera_000523"]
# Query 1 has no easy images, so the Easy protocol leaves it out of the mean.
GND = [
    {"bbx": [0.0, 0.0, 30.0, 32.0], "easy": [0, 1], "hard": [2], "junk": [3]},
    {"bbx": [8.0, 4.0, 56.0, 28.0], "easy": [], "hard": [4], "junk": [5]},
    {"bbx": [24.0, 0.0, 64.0, 32.0], "easy": [5], "hard": [0, 3], "junk": []},
]


def _red_blue(width=64, height=32):
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


def _write(root, queries=QUERIES, database=DATABASE, gnd=GND, name="gnd_roxford5k.pkl"):
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    for n in list(queries) + list(database):
        _red_blue().save(root / "jpg" / f"{n}.jpg", quality=95)
    with open(root / name, "wb") as f:
        pickle.dump({"imlist": list(database), "qimlist": list(queries), "gnd": gnd}, f)
    return root


@pytest.fixture
def root(tmp_path):
    return _write(tmp_path / "revisited")


# ------------------------------------------------------------------------------------ load_gnd


def test_load_gnd(root):
    cfg = load_gnd(root, "roxford5k")
    assert cfg["imlist"] == DATABASE and cfg["qimlist"] == QUERIES and len(cfg["gnd"]) == 3
    assert revisited.DATASETS == ("roxford5k", "rparis6k")


def test_load_gnd_missing_pickle(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gnd_roxford5k\.pkl.*revisitop"):
        load_gnd(tmp_path, "roxford5k")


def test_load_gnd_unknown_dataset(root):
    with pytest.raises(ValueError, match="Unknown revisited dataset"):
        load_gnd(root, "oxford105k")


def test_load_gnd_missing_keys(tmp_path):
    with open(tmp_path / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": DATABASE, "gnd": GND}, f)
    with pytest.raises(ValueError, match="qimlist"):
        load_gnd(tmp_path, "roxford5k")


def test_load_gnd_not_a_pickle(tmp_path):
    (tmp_path / "gnd_rparis6k.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="Cannot unpickle"):
        load_gnd(tmp_path, "rparis6k")


def test_load_gnd_wrong_dataset(tmp_path):
    paris_q = ["paris_defense_000605", "paris_eiffel_000266", "paris_louvre_000081"]
    paris_db = [f"paris_general_{i:06d}" for i in range(6)]
    # A Paris pickle saved under the Oxford name.
    _write(tmp_path, queries=paris_q, database=paris_db)
    with pytest.raises(ValueError, match="opened as roxford5k.*is rparis6k"):
        load_gnd(tmp_path, "roxford5k")
    # An Oxford pickle saved under the Paris name.
    _write(tmp_path, name="gnd_rparis6k.pkl")
    with pytest.raises(ValueError, match="opened as rparis6k.*is roxford5k"):
        load_gnd(tmp_path, "rparis6k")


def test_load_gnd_distractor_free_oxford_names(tmp_path):
    _write(tmp_path, queries=["oxc1_" + q for q in QUERIES])
    assert load_gnd(tmp_path, "roxford5k")["qimlist"][0] == "oxc1_all_souls_000013"


def test_load_gnd_index_out_of_range(tmp_path):
    bad = [dict(g) for g in GND]
    bad[2] = dict(bad[2], junk=[6])
    _write(tmp_path, gnd=bad)
    with pytest.raises(ValueError, match=r"gnd\[2\]\['junk'\].*outside"):
        load_gnd(tmp_path, "roxford5k")


# -------------------------------------------------------------------------------- protocol_gnd


def _as_sets(entries):
    return [(set(e["ok"].tolist()), set(e["junk"].tolist())) for e in entries]


def test_protocol_gnd(root):
    cfg = load_gnd(root, "roxford5k")
    assert _as_sets(protocol_gnd(cfg, "easy")) == [
        ({0, 1}, {3, 2}),
        (set(), {5, 4}),
        ({5}, {0, 3}),
    ]
    assert _as_sets(protocol_gnd(cfg, "medium")) == [
        ({0, 1, 2}, {3}),
        ({4}, {5}),
        ({5, 0, 3}, set()),
    ]
    assert _as_sets(protocol_gnd(cfg["gnd"], "hard")) == [
        ({2}, {3, 0, 1}),
        ({4}, {5}),
        ({0, 3}, {5}),
    ]
    for e in protocol_gnd(cfg, "easy"):
        assert e["ok"].dtype == np.int64 and e["junk"].dtype == np.int64
    with pytest.raises(ValueError, match="Unknown protocol"):
        protocol_gnd(cfg, "extreme")


# ----------------------------------------------------------------------------- RevisitedSource


def test_source_database(root):
    ds = RevisitedSource(root, "roxford5k", "database", image_size=16)
    assert len(ds) == ds.num_classes == 6 and ds.names == DATABASE
    np.testing.assert_array_equal(ds.labels, np.arange(6))
    item = ds[4]
    assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.uint8
    assert item["label"] == 4 and item["label"].dtype == np.int32
    # Centre square of a red|blue image: left half red, right half blue.
    img = item["image"].astype(int)
    assert img[8, 1, 0] > 200 and img[8, 1, 2] < 50
    assert img[8, 14, 2] > 200 and img[8, 14, 0] < 50
    assert grain.MapDataset.source(ds)[0]["image"].shape == (16, 16, 3)


def test_source_query_crop_vs_whole(root):
    cropped = RevisitedSource(root, "roxford5k", "query", image_size=8)
    whole = RevisitedSource(root, "roxford5k", "query", image_size=8, crop_queries=False)
    assert cropped.crop_queries and not whole.crop_queries
    assert cropped.names == QUERIES and len(cropped) == 3
    # Query 0's box (x 0-30) lies inside the red half.
    red = cropped[0]["image"].astype(int)
    assert red.shape == (8, 8, 3) and cropped[0]["label"] == 0
    assert (red[..., 0] > 200).all() and (red[..., 2] < 50).all()
    # Query 2's box is the right 40 px, (24..64): its central square (28..60) is mostly blue.
    blue = cropped[2]["image"].astype(int)
    assert (blue[:, 2:, 2] > 200).all() and (blue[:, 2:, 0] < 50).all()
    # Whole: the image's central square, half red and half blue.
    full = whole[0]["image"].astype(int)
    assert full.shape == (8, 8, 3)
    assert (full[:, 0, 0] > 200).all() and (full[:, -1, 2] > 200).all()


def test_source_errors(root):
    with pytest.raises(ValueError, match="split"):
        RevisitedSource(root, "roxford5k", "train", image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        RevisitedSource(root, "roxford5k", "query", image_size=0)
    with pytest.raises(FileNotFoundError, match="gnd_rparis6k"):
        RevisitedSource(root, "rparis6k", "query", image_size=8)


def test_source_missing_jpg(root):
    missing = root / "jpg" / f"{DATABASE[3]}.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        RevisitedSource(root, "roxford5k", "database", image_size=8)
    # Queries are all there; an image removed after construction fails when it is read.
    ds = RevisitedSource(root, "roxford5k", "query", image_size=8)
    gone = root / "jpg" / f"{QUERIES[1]}.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=str(gone)):
        ds[1]


def test_source_corrupt_jpg(root):
    (root / "jpg" / f"{QUERIES[0]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match=f"{QUERIES[0]}.*data.skip_corrupt=True"):
        RevisitedSource(root, "roxford5k", "query", image_size=8)  # the scan finds it
    for crop in (True, False):  # Unscanned, it fails when read.
        ds = RevisitedSource(
            root, "roxford5k", "query", image_size=8, crop_queries=crop, scan="off"
        )
        with pytest.raises(CorruptImageError, match=QUERIES[0]):
            ds[0]


# ------------------------------------------------------------------------------------ evaluate


def test_rank_database_stable_ties():
    query = np.array([[1.0, 0.0], [0.0, 1.0]])
    database = np.array([[0.5, 0.0], [1.0, 0.0], [0.5, 1.0], [1.0, 1.0]])
    np.testing.assert_array_equal(
        revisited.rank_database(query, database), [[1, 2], [3, 3], [0, 0], [2, 1]]
    )


# Each query's database ranking, best first. With one-hot database embeddings, query q's
# embedding is the score it gives each database image.
RANKINGS = [[4, 0, 3, 2, 1, 5], [0, 5, 4, 1, 2, 3], [5, 1, 0, 2, 3, 4]]


def _embeddings():
    query = np.zeros((3, 6), np.float32)
    for q, order in enumerate(RANKINGS):
        query[q, order] = np.arange(6, 0, -1)
    return query, np.eye(6, dtype=np.float32)


# Worked out by hand with revisitop's rules: junk removed from the ranking; AP sums, per positive
# j (0-based) at junk-free position r, (j / r + (j + 1) / (r + 1)) / 2 / #ok with j / r := 1 at
# r = 0; P@k = #positives in the top min(k, last positive's rank) / that number.
#   easy   q0: ok {0,1}, ranking 4 0 1 5 -> AP 5/12, P@1 0, P@5 2/3.  q1: no positives.
#          q2: ok {5}, ranking 5 1 2 4 -> AP 1, P 1.
#   medium q0: 4 0 2 1 5, ok at 1,2,3 -> 37/72, P@1 0, P@5 3/4.  q1: 0 4 1 2 3 -> 1/4, 0, 1/2.
#          q2: 5 1 0 2 3 4, ok at 0,2,4 -> 32/45, P@1 1, P@5 3/5.
#   hard   q0: 4 2 5 -> 1/4, 0, 1/2.  q1: as medium.  q2: 1 0 2 3 4, ok at 1,3 -> 1/3, 0, 1/2.
EXPECTED = {
    "easy": {"mAP": 17 / 24, "mP@1": 1 / 2, "mP@5": 5 / 6, "mP@10": 5 / 6},
    "medium": {"mAP": 59 / 120, "mP@1": 1 / 3, "mP@5": 37 / 60, "mP@10": 37 / 60},
    "hard": {"mAP": 5 / 18, "mP@1": 0.0, "mP@5": 1 / 2, "mP@10": 1 / 2},
}


def test_evaluate_by_hand(root):
    gnd = load_gnd(root, "roxford5k")
    query, database = _embeddings()
    result = evaluate(query, database, gnd, crop_queries=True)
    assert result["query_crop"] is True
    assert set(result) == {"query_crop", "easy", "medium", "hard"}
    for protocol, expected in EXPECTED.items():
        assert set(result[protocol]) == set(expected)
        for key, value in expected.items():
            assert result[protocol][key] == pytest.approx(value, abs=1e-6), (protocol, key)
    only_hard = evaluate(query, database, gnd, protocols=("hard",), kappas=(1,), crop_queries=False)
    assert only_hard == {"query_crop": False, "hard": {"mAP": pytest.approx(5 / 18), "mP@1": 0.0}}


def test_evaluate_mismatched_counts(root):
    gnd = load_gnd(root, "roxford5k")
    query, database = _embeddings()
    with pytest.raises(ValueError, match="query embeddings.*3 query images"):
        evaluate(query[:2], database, gnd, crop_queries=True)
    with pytest.raises(ValueError, match="database embeddings.*6 database images"):
        evaluate(query, database[:5], gnd, crop_queries=True)
    with pytest.raises(ValueError, match="sizes differ"):
        evaluate(query, database[:, :5], gnd, crop_queries=True)


def test_skipped_images_not_scored_or_never_retrieved(root):
    """With skip_corrupt, an unreadable query is left out and an unreadable database image
    stays relevant but is never retrieved. Database image 0 and query 1 are unreadable; by hand
    (Medium, rules above): q0 ok {0,1,2}, junk {3}: ranking 4 2 1 5, ok at 1, 2 of 3 ->
    (1/2)/2/3 + (1/2 + 2/3)/2/3 = 5/18; q2 ok {5,0,3}: ranking 5 1 2 3 4, ok at 0, 3 of 3 ->
    1/3 + (1/3 + 2/4)/2/3 = 17/36; mAP = (5/18 + 17/36) / 2 = 3/8."""
    (root / "jpg" / f"{DATABASE[0]}.jpg").write_bytes(b"")
    (root / "jpg" / f"{QUERIES[1]}.jpg").write_bytes(b"broken")
    with pytest.raises(CorruptImageError, match=DATABASE[0]):
        RevisitedSource(root, "roxford5k", "database", image_size=8)
    db = RevisitedSource(root, "roxford5k", "database", image_size=8, skip_corrupt=True)
    q = RevisitedSource(root, "roxford5k", "query", image_size=8, skip_corrupt=True)
    assert db.kept.tolist() == [1, 2, 3, 4, 5] and db.names == DATABASE[1:]
    assert q.kept.tolist() == [0, 2] and q.skipped == [str(root / "jpg" / f"{QUERIES[1]}.jpg")]
    crop = load_gnd(root, "roxford5k")["gnd"][2]["bbx"]  # query 2's box, not query 1's
    np.testing.assert_array_equal(q[1]["image"], revisited.load_image(q.paths[1], 8, box=crop))
    query, database = _embeddings()
    result = evaluate(
        query[q.kept],
        database[db.kept],
        q.gnd,
        protocols=("medium",),
        crop_queries=True,
        query_kept=q.kept,
        database_kept=db.kept,
    )
    assert result["medium"]["mAP"] == pytest.approx(3 / 8, abs=1e-9)
