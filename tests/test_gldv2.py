"""Tests for bcl_jax.data.gldv2 on tiny fake GLDv2 files written here."""

import json
import math
import os

import fake_datasets
import numpy as np
import pytest
from PIL import Image

from bcl_jax import data
from bcl_jax.data import gldv2, splits
from bcl_jax.data.folder import CorruptImageError
from configs import gldv2 as gldv2_config
from configs import synthetic as synthetic_config

IDS = ["abc001", "abd002", "bcd003", "bce004", "cde005", "cdf006", "def007"]
# landmark 42: abc001 abd002 bcd003; landmark 7: bce004 cde005; landmark 1000: cdf006 def007
CLEAN = "landmark_id,images\n42,abc001 abd002 bcd003\n7,bce004 cde005\n1000,cdf006 def007\n"
FULL = "id,url,landmark_id\n" + "".join(
    f"{i},http://x.org/{i}.jpg,{lm}\n" for i, lm in zip(IDS, [42, 42, 42, 7, 7, 1000, 1000])
)
EXPECTED_LABELS = [1, 1, 1, 0, 0, 2, 2]


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text", [CLEAN, FULL], ids=["train_clean", "train"])
def test_read_train_csv_both_formats(tmp_path, text):
    ids, labels, landmarks = gldv2.read_train_csv(_write(tmp_path, "t.csv", text))
    assert ids == IDS
    assert labels.dtype == np.int32
    assert labels.tolist() == EXPECTED_LABELS
    assert landmarks.tolist() == [7, 42, 1000]


def test_read_train_csv_bom_and_blank_lines(tmp_path):
    p = tmp_path / "t.csv"
    p.write_bytes(("\ufeff" + CLEAN + "\n").encode("utf-8"))
    ids, labels, _ = gldv2.read_train_csv(p)
    assert ids == IDS and labels.tolist() == EXPECTED_LABELS


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("landmark_id,images\n1,abc001\n2,abd002,extra\n", 3, "expected 2 columns"),
        ("landmark_id,images\n1,abc001\nx9,abd002\n", 3, "not an integer"),
        ("landmark_id,images\n1,abc001\n2,   \n", 3, "empty image list"),
        ("landmark_id,images\n1,abc001 abd002\n2,bcd003 abc001\n", 3, "duplicate image id"),
        ("landmark_id,images\n1,abc001\n1,abd002\n", 3, "repeated"),
        ("id,url,landmark_id\nabc001,u,1\nabd002,u\n", 3, "expected 3 columns"),
        ("id,url,landmark_id\nabc001,u,1\nabd002,u,1.5\n", 3, "not an integer"),
        ("id,url,landmark_id\nabc001,u,1\nabd002,u,2\nabc001,u,3\n", 4, "duplicate image id"),
        ("id,url,landmark_id\nab,u,1\n", 2, "invalid image id"),
        ("foo,bar\n1,2\n", 1, "unknown header"),
    ],
)
def test_read_train_csv_malformed(tmp_path, text, line, what):
    p = _write(tmp_path, "bad.csv", text)
    with pytest.raises(ValueError) as e:
        gldv2.read_train_csv(p)
    msg = str(e.value)
    assert str(p) in msg and f"line {line}:" in msg and what in msg


def test_read_train_csv_empty(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        gldv2.read_train_csv(_write(tmp_path, "e.csv", "landmark_id,images\n"))


def test_image_path():
    assert gldv2.image_path("/r", "abc001") == os.path.join(
        "/r", "train", "a", "b", "c", "abc001.jpg"
    )
    assert gldv2.image_path("/r", "f00d", "index") == os.path.join(
        "/r", "index", "f", "0", "0", "f00d.jpg"
    )
    with pytest.raises(ValueError):
        gldv2.image_path("/r", "ab")


def _make_tree(root, ids, folder="train"):
    for n, i in enumerate(ids):
        p = gldv2.image_path(root, i, folder)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.new("RGB", (8, 8), (30 * n, 0, 255 - 30 * n)).save(p)


def test_gldv2_train_source(tmp_path):
    csv_path = _write(tmp_path, "train_clean.csv", CLEAN)
    _make_tree(tmp_path, IDS)
    ds = gldv2.GLDv2Train(csv_path, tmp_path, image_size=4)
    assert len(ds) == 7 and ds.num_classes == 3 and ds.image_ids == IDS
    assert ds.labels.tolist() == EXPECTED_LABELS
    rec = ds[3]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (4, 4, 3)
    assert rec["label"].dtype == np.int32 and int(rec["label"]) == 0
    np.testing.assert_allclose(rec["image"][0, 0], [90, 0, 165], atol=3)  # JPEG


def test_gldv2_train_missing_files(tmp_path):
    csv_path = _write(tmp_path, "train.csv", FULL)
    _make_tree(tmp_path, IDS[:4])
    with pytest.raises(FileNotFoundError) as e:
        gldv2.GLDv2Train(csv_path, tmp_path, image_size=4)
    msg = str(e.value)
    assert "3 of 7" in msg and "cde005.jpg" in msg
    ds = gldv2.GLDv2Train(csv_path, tmp_path, image_size=4, check_files=False)
    assert len(ds) == 7


def test_gldv2_train_corrupt_file(tmp_path):
    csv_path = _write(tmp_path, "train.csv", FULL)
    _make_tree(tmp_path, IDS)
    with open(gldv2.image_path(tmp_path, IDS[0]), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(CorruptImageError, match="abc001.jpg .UnidentifiedImageError"):
        gldv2.GLDv2Train(csv_path, tmp_path, image_size=4)  # the scan finds it
    ds = gldv2.GLDv2Train(csv_path, tmp_path, image_size=4, scan="off")
    with pytest.raises(CorruptImageError):
        ds[0]


# --- split files ------------------------------------------------------------------------------


def _big_clean(tmp_path, num_classes=20, per_class=3):
    lines = ["landmark_id,images"]
    for c in range(num_classes):
        lines.append(f"{c * 3 + 1}," + " ".join(f"{c:04x}{j:02x}" for j in range(per_class)))
    return _write(tmp_path, "train_clean.csv", "\n".join(lines) + "\n")


@pytest.mark.parametrize("mode", ["classes", "images"])
def test_split_file_deterministic_and_roundtrip(tmp_path, mode):
    csv_path = _big_clean(tmp_path)
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    split = gldv2.old_split_for(csv_path, fraction=0.3, mode=mode, seed=3, out=a)
    gldv2.old_split_for(csv_path, fraction=0.3, mode=mode, seed=3, out=b)
    gldv2.old_split_for(csv_path, fraction=0.3, mode=mode, seed=4, out=c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()

    ids, labels, landmarks = gldv2.read_train_csv(csv_path)
    ref = splits.old_split(labels, len(landmarks), fraction=0.3, mode=mode, seed=3)
    np.testing.assert_array_equal(split.indices, ref.indices)
    np.testing.assert_array_equal(split.old_label, ref.old_label)

    got, meta = gldv2.read_split_file(a, image_ids=ids)
    assert isinstance(gldv2.read_split(a), splits.OldSplit)
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.old_label, ref.old_label)
    assert got.old_label.dtype == np.int32
    assert meta["seed"] == 3 and meta["mode"] == mode and meta["fraction"] == 0.3
    assert meta["image_ids"] == [ids[i] for i in ref.indices]
    if mode == "classes":
        assert got.num_old_classes == 6


def test_split_file_tamper_detected(tmp_path):
    csv_path = _big_clean(tmp_path)
    path = tmp_path / "s.json"
    gldv2.old_split_for(csv_path, fraction=0.5, mode="classes", seed=0, out=path)
    payload = json.loads(path.read_text())
    payload["image_ids"][0] = "ffff00"
    path.write_text(json.dumps(payload, sort_keys=True, indent=1) + "\n")
    with pytest.raises(ValueError, match="checksum mismatch") as e:
        gldv2.read_split(path)
    assert str(path) in str(e.value)

    gldv2.old_split_for(csv_path, fraction=0.5, mode="classes", seed=0, out=path)
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 1'))
    with pytest.raises(ValueError, match="checksum"):
        gldv2.read_split(path)


def test_split_file_other_csv_detected(tmp_path):
    csv_path = _big_clean(tmp_path)
    path = tmp_path / "s.json"
    gldv2.old_split_for(csv_path, fraction=0.5, mode="images", seed=0, out=path)
    ids, _, _ = gldv2.read_train_csv(csv_path)
    with pytest.raises(ValueError, match="different CSV"):
        gldv2.read_split(path, image_ids=ids[::-1])
    with pytest.raises(ValueError, match="drawn from 60 images"):
        gldv2.read_split(path, image_ids=ids[:-1])


def test_thirty_percent_of_gldv2_clean_classes():
    """method.md §8: the old model of GLDv2-clean sees 24,393 of its 81,313 classes."""
    c = 81313
    labels = np.arange(c, dtype=np.int32)
    split = splits.old_split(labels, c, fraction=0.3, mode="classes", seed=0)
    assert split.num_old_classes == 24393


# --- retrieval --------------------------------------------------------------------------------

SOLUTION = (
    "id,images,Usage\n"
    "q1,i1 i3,Public\n"
    "q2,i4,Public\n"
    "q3,i0 i2,Private\n"
    "q4,None,Private\n"
    "q5,i0,Ignored\n"
    "q7,None,Ignored\n"
)


def test_read_retrieval_solution(tmp_path):
    sol = gldv2.read_retrieval_solution(_write(tmp_path, "sol.csv", SOLUTION))
    assert sol == {
        "q1": (["i1", "i3"], "Public"),
        "q2": (["i4"], "Public"),
        "q3": (["i0", "i2"], "Private"),
        "q4": ([], "Private"),
        "q5": (["i0"], "Ignored"),
        "q7": ([], "Ignored"),
    }


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("id,images,Usage\nq1,i1,Public\nq2,i1,Secret\n", 3, "Usage"),
        ("id,images,Usage\nq1,i1,Public\nq2,i1\n", 3, "expected 3 columns"),
        ("id,images,Usage\nq1,i1,Public\nq1,i2,Private\n", 3, "duplicate query"),
        ("id,images\nq1,i1\n", 1, "unknown header"),
    ],
)
def test_read_retrieval_solution_malformed(tmp_path, text, line, what):
    p = _write(tmp_path, "sol.csv", text)
    with pytest.raises(ValueError) as e:
        gldv2.read_retrieval_solution(p)
    assert str(p) in str(e.value) and f"line {line}:" in str(e.value) and what in str(e.value)


INDEX_IDS = ["i0", "i1", "i2", "i3", "i4"]
INDEX_EMB = np.eye(5, dtype=np.float32)
QUERY_IDS = ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]
DOWN, UP = [5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5]  # rankings i0..i4 and i4..i0
QUERY_EMB = np.asarray([DOWN, UP, DOWN, DOWN, UP, UP, DOWN], dtype=np.float32)


@pytest.mark.parametrize("block", [(1024, 4096), 1, (2, 2)])
def test_evaluate_retrieval_by_hand(tmp_path, block):
    sol = gldv2.read_retrieval_solution(_write(tmp_path, "sol.csv", SOLUTION))
    # q1 ranks i0 i1 i2 i3 i4, relevant {i1, i3}: (1/2 + 2/4) / 2 = 0.5.
    # q2 ranks i4 first, relevant {i4}: 1.  Public = 0.75 over 2 queries.
    # q3 ranks i0 i1 i2, relevant {i0, i2}: (1 + 2/3) / 2 = 5/6. q4 (None) is not scored.
    # q5 (Ignored) and q6 (not in the solution) are not scored.
    r = gldv2.evaluate_retrieval(QUERY_IDS, QUERY_EMB, INDEX_IDS, INDEX_EMB, sol, block=block)
    assert r["num_public"] == 2 and r["num_private"] == 1
    assert r["public"] == pytest.approx(0.75)
    assert r["private"] == pytest.approx(5 / 6)

    # k=2: q1 (1/2) / min(2, 2) = 0.25, q2 1 -> 0.625; q3 1 / 2 = 0.5.
    r = gldv2.evaluate_retrieval(QUERY_IDS, QUERY_EMB, INDEX_IDS, INDEX_EMB, sol, k=2, block=block)
    assert r["public"] == pytest.approx(0.625)
    assert r["private"] == pytest.approx(0.5)


def test_evaluate_retrieval_no_private():
    sol = {"q1": (["i1", "i3"], "Public"), "q4": ([], "Private")}
    r = gldv2.evaluate_retrieval(QUERY_IDS, QUERY_EMB, INDEX_IDS, INDEX_EMB, sol)
    assert r["num_private"] == 0 and math.isnan(r["private"])
    assert r["public"] == pytest.approx(0.5)


def test_evaluate_retrieval_errors():
    sol = {"q1": (["i1"], "Public")}
    with pytest.raises(ValueError, match="not in query_ids: qX"):
        gldv2.evaluate_retrieval(
            QUERY_IDS, QUERY_EMB, INDEX_IDS, INDEX_EMB, {**sol, "qX": (["i1"], "Public")}
        )
    with pytest.raises(ValueError, match="2 solution index ids are not in index_ids: i8, i9"):
        gldv2.evaluate_retrieval(
            QUERY_IDS,
            QUERY_EMB,
            INDEX_IDS,
            INDEX_EMB,
            {**sol, "q2": (["i9", "i8", "i1"], "Private")},
        )
    with pytest.raises(ValueError, match="6 query embeddings but 7 query ids"):
        gldv2.evaluate_retrieval(QUERY_IDS, QUERY_EMB[:6], INDEX_IDS, INDEX_EMB, sol)
    with pytest.raises(ValueError, match="5 index embeddings but 4 index ids"):
        gldv2.evaluate_retrieval(QUERY_IDS, QUERY_EMB, INDEX_IDS[:4], INDEX_EMB, sol)
    with pytest.raises(ValueError, match="duplicate"):
        gldv2.evaluate_retrieval(QUERY_IDS, QUERY_EMB, ["i0"] * 5, INDEX_EMB, sol)


def test_evaluate_retrieval_unretrievable_index_images_are_misses():
    """Query q's relevant images are a and b; b was skipped (no embedding). a ranks first:
    AP@100 = (1/1) / min(2, 100) = 0.5. Without `unretrievable`, b's absence is an error."""
    solution = {"q": (["a", "b"], "Private")}
    index_emb = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # a, c
    query_emb = np.array([[0.9, 0.1]], np.float32)
    with pytest.raises(ValueError, match="not in index_ids"):
        gldv2.evaluate_retrieval(["q"], query_emb, ["a", "c"], index_emb, solution)
    out = gldv2.evaluate_retrieval(
        ["q"], query_emb, ["a", "c"], index_emb, solution, unretrievable={"b"}
    )
    assert out["private"] == pytest.approx(0.5) and out["num_private"] == 1


def test_retrieval_test_with_skipped_images(tmp_path):
    """data.skip_corrupt on the GLDv2 test: an unreadable scored query is not scored, an
    unreadable relevant index image counts as a miss. Reference: mAP@100 in numpy, over the
    readable scored queries, each AP divided by min(#relevant including the skipped one, 100)."""
    root = fake_datasets.gldv2_root(tmp_path / "gld", landmarks=4, queries=4)
    solution = gldv2.read_retrieval_solution(os.path.join(root, gldv2.SOLUTION_FILE))
    queries = gldv2.retrieval_queries(solution)
    index_ids = gldv2.read_id_csv(os.path.join(root, gldv2.INDEX_FILE))
    broken_query, broken_index = queries[1], solution[queries[2]][0][0]
    for image_id, folder in ((broken_query, "test"), (broken_index, "index")):
        with open(gldv2.image_path(root, image_id, folder), "wb") as f:
            f.write(b"not a jpeg")
    cfg = gldv2_config.get_config("methods=bct,smoke")
    cfg.data.gldv2.root, cfg.data.gldv2.tests = root, ("gldv2",)
    with pytest.raises(CorruptImageError, match=broken_query):
        gldv2.retrieval_test(cfg.data)
    cfg.data.skip_corrupt = True
    test = gldv2.retrieval_test(cfg.data)
    assert test.query.ids == [q for q in queries if q != broken_query]
    assert test.gallery.ids == [i for i in index_ids if i != broken_index]

    rng = np.random.default_rng(0)
    query_emb = rng.normal(size=(len(test.query.ids), 8))
    index_emb = rng.normal(size=(len(test.gallery.ids), 8))
    got = test.score(query_emb, index_emb, cfg.eval)
    for usage in ("Public", "Private"):
        aps = []
        for row, q in enumerate(test.query.ids):
            relevant, u = solution[q]
            if u != usage:
                continue
            ranked = [test.gallery.ids[i] for i in np.argsort(-(index_emb @ query_emb[row]))]
            hits = [k for k, i in enumerate(ranked[:100]) if i in relevant]
            precision = [(n + 1) / (k + 1) for n, k in enumerate(hits)]
            aps.append(sum(precision) / min(len(relevant), 100))
        assert got[f"mAP@100/{usage.lower()}"] == pytest.approx(np.mean(aps), abs=1e-6)
        assert got[f"num_{usage.lower()}"] == len(aps)


# --- AdvBCT split lists -------------------------------------------------------------------------
# AdvBCT's format (Ashespt/AdvBCT utils/process_dataset.py): '<path> <label>' per line, the path
# relative to the GLDv2 root. Class list: every image of the old classes, old labels dense from
# 0 in AdvBCT's class order (here landmark 1000 before 42). Data list: the old images with their
# original labels (AdvBCT's numbering: 42 -> 5, 7 -> 3, 1000 -> 9).
ADVBCT_CLASS = (
    "train/c/d/f/cdf006.jpg 0\n"
    "train/d/e/f/def007.jpg 0\n"
    "train/a/b/c/abc001.jpg 1\n"
    "train/a/b/d/abd002.jpg 1\n"
    "train/b/c/d/bcd003.jpg 1\n"
)
ADVBCT_DATA = "train/a/b/c/abc001.jpg 5\ntrain/b/c/e/bce004.jpg 3\ntrain/c/d/f/cdf006.jpg 9\n"


@pytest.mark.parametrize(
    "text, mode, indices, old_label",
    [
        # bcl_jax labels: landmark 7 -> 0, 42 -> 1, 1000 -> 2 (sorted landmark ids).
        (ADVBCT_CLASS, "classes", [0, 1, 2, 5, 6], [-1, 1, 0]),
        (ADVBCT_DATA, "images", [0, 3, 5], [0, 1, 2]),
    ],
    ids=["class", "data"],
)
def test_split_from_advbct_round_trip(tmp_path, text, mode, indices, old_label):
    csv_path = _write(tmp_path, "train_clean.csv", CLEAN)
    txt = _write(tmp_path, f"gldv2_train_old_30percent_{mode}.txt", text)
    out = tmp_path / "advbct_split.json"
    split = gldv2.split_from_advbct(txt, csv_path, out=out, mode=mode)
    assert split.indices.tolist() == indices and split.old_label.tolist() == old_label
    back, meta = gldv2.read_split_file(out, image_ids=IDS)  # checksum and ids verified
    assert back.indices.tolist() == indices and back.old_label.tolist() == old_label
    assert (meta["fraction"], meta["mode"], meta["seed"]) == (0.3, mode, 666)
    assert meta["source"] == f"AdvBCT split list gldv2_train_old_30percent_{mode}.txt"
    assert meta["image_ids"] == [IDS[i] for i in indices]
    payload = json.loads(out.read_text())
    payload["indices"][0] = 1  # an edited file no longer matches its checksum
    out.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="checksum mismatch"):
        gldv2.read_split_file(out)


@pytest.mark.parametrize(
    "text, mode, match",
    [
        ("train/a/b/c/abc001.jpg\n", "classes", "line 1: expected '<image path> <label>'"),
        ("train/x/y/z/xyz999.jpg 0\n", "classes", "line 1: image 'xyz999' is not in"),
        ("train/a/b/c/abc001.jpg 0\n\ntrain/a/b/c/abc001.jpg 0\n", "classes", "line 3: .*repeats"),
        ("train/a/b/c/abc001.jpg 0\ntrain/a/b/d/abd002.jpg 1\n", "classes", "line 2: an image"),
        ("train/a/b/c/abc001.jpg 0\ntrain/b/c/e/bce004.jpg 0\n", "classes", "line 2: label 0"),
        ("train/a/b/c/abc001.jpg 1\n", "classes", "old labels are not 0..0"),
        ("train/a/b/c/abc001.jpg 5\n", "images", "2 classes of the training CSV have no"),
        ("train/a/b/c/abc001.jpg 0\n", "thirds", "mode='thirds'"),
    ],
)
def test_split_from_advbct_errors(tmp_path, text, mode, match):
    csv_path = _write(tmp_path, "train_clean.csv", CLEAN)
    txt = _write(tmp_path, "list.txt", text)
    with pytest.raises(ValueError, match=match):
        gldv2.split_from_advbct(txt, csv_path, out=tmp_path / "x.json", mode=mode)
    assert not (tmp_path / "x.json").exists()


def test_data_build_trains_on_an_advbct_split(tmp_path):
    """data.gldv2.split_file pointing at a converted AdvBCT list: the old model's images and
    labels are the list's, once the config records AdvBCT's fraction, mode and seed."""
    root = fake_datasets.gldv2_root(tmp_path / "gld", landmarks=5, queries=2)
    csv_path = os.path.join(root, "train_clean.csv")
    image_ids, labels, _ = gldv2.read_train_csv(csv_path)
    # Old classes 3 then 1 (AdvBCT's order), each with all its images.
    lines = [
        f"train/{i[0]}/{i[1]}/{i[2]}/{i}.jpg {old}\n"
        for old, c in enumerate((3, 1))
        for i, label in zip(image_ids, labels)
        if label == c
    ]
    txt = _write(tmp_path, "gldv2_train_old_30percent_class.txt", "".join(lines))
    out = str(tmp_path / "advbct.json")
    gldv2.split_from_advbct(txt, csv_path, out=out)
    cfg = synthetic_config.get_config("smoke").data
    cfg.name, cfg.gldv2.root, cfg.gldv2.tests = "gldv2", root, ("gldv2",)
    cfg.gldv2.split_file = out
    with pytest.raises(ValueError, match="seed=666"):  # the config must say it is AdvBCT's
        data.build(cfg)
    cfg.split_seed = 666
    built = data.build(cfg)
    assert built.old_label.tolist() == [-1, 1, -1, 0, -1]
    assert built.old_train.num_classes == 2 and len(built.old_train) == 8
    first = built.old_train[0]
    assert first["label"] == 1  # the first old image (CSV order) is of class 1: old label 1
