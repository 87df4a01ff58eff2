"""Tests for bcl_jax.data.prepare and bcl_jax.data.prepared on tiny fake raw datasets."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from bcl_jax import data
from bcl_jax.data import folder, gldv2, images, inshop, pipeline, prepare, prepared, splits
from configs import synthetic as synthetic_config

SIZE = 12  # stored image side
SHARD = 4  # images per shard
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(path, seed, w=20, h=15):
    """A smooth random RGB image (JPEG-friendly), saved in the format of the path's extension."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3)
    pixels = base + xx[..., None] * rng.uniform(-5, 5, 3) + yy[..., None] * rng.uniform(-5, 5, 3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def _corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8 this is not a JPEG")


def _hex_id(text):
    return hashlib.md5(text.encode()).hexdigest()[:16]


def _fake_gldv2(root):
    """train_clean.csv with 5 landmarks (one corrupt and one missing image), index, solution."""
    landmarks = {5: 3, 17: 3, 123: 2, 900: 2, 4: 2}
    rows, seed = [], 0
    for landmark, n in landmarks.items():
        ids = [_hex_id(f"train{landmark}-{k}") for k in range(n)]
        rows.append(f"{landmark},{' '.join(ids)}")
        for image_id in ids:
            seed += 1
            _image(gldv2.image_path(root, image_id, "train"), seed, w=14 + seed % 9)
    corrupt, missing = _hex_id("train123-1"), _hex_id("train17-0")
    _corrupt(gldv2.image_path(root, corrupt, "train"))
    os.remove(gldv2.image_path(root, missing, "train"))
    with open(os.path.join(root, "train_clean.csv"), "w") as f:
        f.write("landmark_id,images\n" + "\n".join(rows) + "\n")
    index_ids = [_hex_id(f"index{k}") for k in range(6)]
    for k, image_id in enumerate(index_ids):
        _image(gldv2.image_path(root, image_id, "index"), 100 + k)
    with open(os.path.join(root, "index.csv"), "w") as f:
        f.write("id\n" + "".join(i + "\n" for i in index_ids))
    queries = [_hex_id(f"test{k}") for k in range(4)]
    for k, image_id in enumerate(queries):
        _image(gldv2.image_path(root, image_id, "test"), 200 + k, w=15, h=22)
    with open(os.path.join(root, "retrieval_solution_v2.1.csv"), "w") as f:
        f.write("id,images,Usage\n")
        f.write(f"{queries[0]},{index_ids[0]} {index_ids[1]},Public\n")
        f.write(f"{queries[1]},None,Public\n")  # no ground truth: not a test query
        f.write(f"{queries[2]},{index_ids[2]},Ignored\n")
        f.write(f"{queries[3]},{index_ids[3]},Private\n")
    return {
        "corrupt": corrupt,
        "missing": missing,
        "index_ids": index_ids,
        "test_ids": [queries[0], queries[3]],
    }


def _fake_inshop(root):
    rows = []
    items = {"train": ["id_00000002", "id_00000005", "id_00000007"]}
    items["eval"] = ["id_00000003", "id_00000009"]
    for item in items["train"]:
        for k in range(2):
            rows.append((f"img/WOMEN/Dresses/{item}/0{k + 1}_1_front.jpg", item, "train"))
    for item in items["eval"]:
        for k, status in enumerate(["query", "gallery", "gallery"]):
            rows.append((f"img/MEN/Shirts/{item}/0{k + 1}_2_side.jpg", item, status))
    rows.append(("img/MEN/Shirts/id_00000011/01_1_front.jpg", "id_00000011", "gallery"))
    for seed, (path, _, _) in enumerate(rows):
        _image(os.path.join(root, path), 300 + seed, h=12 + seed)
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(rows)}\nimage_name item_id evaluation_status\n")
        f.write("".join(f"{p}  {i}  {s}\n" for p, i, s in rows))


def _fake_folder(root, layout=None):
    layout = layout or {
        "train": {"cat": 3, "dog": 2, "emu": 2},
        "query": {"cat": 1, "dog": 1},
        "gallery": {"cat": 2, "dog": 1, "fox": 1},
    }
    seed = 0
    for split, classes in layout.items():
        for name, n in classes.items():
            for k in range(n):
                seed += 1
                ext = ".png" if k % 2 else ".JPG"
                _image(os.path.join(root, split, name, f"im{k}{ext}"), 500 + seed)


def _run(dataset, src, dst, **kw):
    kw = {"image_size": SIZE, "shard_size": SHARD, "workers": 2, **kw}
    return prepare.prepare(dataset=dataset, src=str(src), dst=str(dst), **kw)


def _files(root):
    """{name: bytes} of every file in a prepared directory."""
    out = {}
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _check_images(dst, split, originals, size=SIZE, tol=3.0):
    source = prepared.PreparedSource(dst, split, image_size=size)
    assert len(source) == len(originals)
    for k, path in enumerate(originals):
        item = source[k]
        assert item["image"].dtype == np.uint8 and item["image"].shape == (size, size, 3)
        assert item["label"].dtype == np.int32 and item["label"] == source.labels[k]
        diff = np.abs(item["image"].astype(float) - folder.load_image(path, size)).mean()
        assert diff < tol, (split, k, diff)
    return source


@pytest.fixture(scope="module")
def gld(tmp_path_factory):
    """A fake GLDv2 download and one uninterrupted preparation of it."""
    src, dst = tmp_path_factory.mktemp("gld_src"), tmp_path_factory.mktemp("gld_dst")
    info = _fake_gldv2(str(src))
    manifest = _run("gldv2", src, dst)
    return src, dst, info, manifest


def test_gldv2_prepared_content(gld):
    src, dst, info, manifest = gld
    ids, labels, landmarks = gldv2.read_train_csv(os.path.join(src, "train_clean.csv"))
    keep = [k for k, i in enumerate(ids) if i not in (info["corrupt"], info["missing"])]
    kept_ids, kept_labels = [ids[k] for k in keep], labels[keep]

    train = _check_images(dst, "train", [gldv2.image_path(src, i, "train") for i in kept_ids])
    assert train.ids == kept_ids and train.labels.tolist() == kept_labels.tolist()
    assert train.classes == [str(x) for x in landmarks] and train.num_classes == 5
    index = _check_images(
        dst, "index", [gldv2.image_path(src, i, "index") for i in info["index_ids"]]
    )
    test = _check_images(dst, "test", [gldv2.image_path(src, i, "test") for i in info["test_ids"]])
    assert index.ids == info["index_ids"] and test.ids == info["test_ids"]
    assert index.labels.tolist() == list(range(6)) and index.num_classes == 6
    assert test.labels.tolist() == [0, 1] and test.classes == info["test_ids"]

    # Reading at another size re-decodes the stored image.
    small = prepared.PreparedSource(dst, "train", image_size=8)[0]["image"]
    ref = folder.load_image(gldv2.image_path(src, kept_ids[0], "train"), 8)
    assert small.shape == (8, 8, 3) and np.abs(small.astype(float) - ref).mean() < 8

    # Manifest: counts, classes, shards, checksums recomputed here.
    assert manifest == json.loads((dst / "manifest.json").read_text())
    assert manifest["format"] == "bcl_jax.prepared/1" and manifest["src"] == str(src)
    assert (manifest["dataset"], manifest["image_size"], manifest["quality"]) == ("gldv2", SIZE, 95)
    entry = manifest["splits"]["train"]
    assert entry["count"] == 10 and entry["num_unreadable"] == 2
    assert entry["shards"] == [f"train-0000{k}-of-00003.array_record" for k in range(3)]
    assert entry["ids_sha256"] == _sha(dst / "train.ids.txt")
    assert entry["labels_sha256"] == _sha(dst / "train.labels.npy")
    assert (dst / "train.ids.txt").read_text() == "".join(i + "\n" for i in kept_ids)
    assert np.load(dst / "train.labels.npy").dtype == np.int32
    assert [manifest["splits"][s]["count"] for s in ("index", "test")] == [6, 2]
    assert manifest["splits"]["index"]["classes"] is None
    solution = "retrieval_solution_v2.1.csv"
    assert (dst / solution).read_bytes() == (src / solution).read_bytes()
    assert manifest["files"] == {solution: _sha(src / solution)}

    # Unreadable images: listed in the manifest and in unreadable.txt.
    corrupt = gldv2.image_path(src, info["corrupt"], "train")
    missing = gldv2.image_path(src, info["missing"], "train")
    errors = {u["path"]: u["error"] for u in manifest["unreadable"]}
    assert errors.keys() == {corrupt, missing} and errors[missing] == "file not found"
    assert "cannot identify image file" in errors[corrupt]
    lines = (dst / "unreadable.txt").read_text().splitlines()
    assert sorted(line.split("\t")[:2] for line in lines) == sorted(
        [["train", corrupt], ["train", missing]]
    )

    # Old split: drawn on the kept train labels, recorded in the manifest.
    expected = splits.old_split(kept_labels, 5, fraction=0.3, mode="classes", seed=0)
    split = prepared.prepared_old_split(dst, fraction=0.3, mode="classes", seed=0)
    np.testing.assert_array_equal(split.indices, expected.indices)
    np.testing.assert_array_equal(split.old_label, expected.old_label)
    old = manifest["old_split"]
    assert old["sha256"] == _sha(dst / "old_split.json") and old["file"] == "old_split.json"
    assert (old["fraction"], old["mode"], old["seed"]) == (0.3, "classes", 0)
    assert (old["num_old_classes"], old["num_old_images"]) == (1, len(expected.indices))


def test_unreadable_is_warned(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _fake_folder(src, {"train": {"a": 2, "b": 2}})
    _corrupt(str(src / "train" / "b" / "zz.jpg"))
    warnings = []
    monkeypatch.setattr(prepare.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    manifest = _run("folder", src, tmp_path / "dst")
    assert manifest["splits"]["train"]["num_unreadable"] == 1
    assert any("1 of 5 train images are unreadable" in w and "zz.jpg" in w for w in warnings)


def test_deterministic_and_seeded(gld, tmp_path):
    src, dst, _, _ = gld
    again = tmp_path / "again"
    _run("gldv2", src, again)
    assert _files(again) == _files(dst)  # shards, lists, old split and manifest: same bytes

    labels = np.load(dst / "train.labels.npy")
    seed = next(
        s
        for s in range(1, 100)
        if not np.array_equal(
            splits.old_split(labels, 5, fraction=0.3, mode="classes", seed=s).old_label,
            splits.old_split(labels, 5, fraction=0.3, mode="classes", seed=0).old_label,
        )
    )
    manifest = _run("gldv2", src, again, split_seed=seed)  # resumes: only the split is redrawn
    assert (again / "old_split.json").read_bytes() != (dst / "old_split.json").read_bytes()
    assert manifest["old_split"]["seed"] == seed
    split = prepared.prepared_old_split(again, fraction=0.3, mode="classes", seed=seed)
    expected = splits.old_split(labels, 5, fraction=0.3, mode="classes", seed=seed)
    np.testing.assert_array_equal(split.old_label, expected.old_label)


def test_resume_after_crash(gld, tmp_path, monkeypatch):
    src, reference, _, _ = gld
    dst = tmp_path / "dst"
    calls = []
    write = prepare._write_shard

    def crash_on_third(path, records):
        calls.append(os.path.basename(path))
        if len(calls) == 3:
            with open(path + ".tmp", "wb") as f:
                f.write(b"half a shard")
            raise KeyboardInterrupt("simulated crash")
        write(path, records)

    monkeypatch.setattr(prepare, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run("gldv2", src, dst)
    with pytest.raises(FileNotFoundError, match="incomplete.*resumes"):
        prepared.read_manifest(dst)
    done = {n: os.stat(dst / n).st_mtime_ns for n in calls[:2]}

    calls.clear()
    monkeypatch.setattr(prepare, "_write_shard", lambda p, r: (calls.append(p), write(p, r)))
    _run("gldv2", src, dst)
    assert len(calls) == 6 - 2  # 3 train + 2 index + 1 test shards, 2 were done
    assert {n: os.stat(dst / n).st_mtime_ns for n in done} == done
    assert _files(dst) == _files(reference)


def test_rerun_with_other_arguments_stops(gld, tmp_path):
    src, dst, _, _ = gld
    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    with pytest.raises(ValueError, match="other arguments.*image_size: 12 there, 16 now"):
        _run("gldv2", src, copy, image_size=16)
    with pytest.raises(ValueError, match="quality"):
        _run("gldv2", src, copy, quality=80)


def test_prepared_old_split_mismatch_and_tampering(gld, tmp_path):
    _, dst, _, _ = gld
    with pytest.raises(ValueError) as e:
        prepared.prepared_old_split(dst, fraction=0.5, mode="classes", seed=0)
    msg = str(e.value)
    assert "fraction=0.3 mode=classes seed=0" in msg and "fraction=0.5" in msg
    assert "data.old_fraction" in msg and "--old_fraction" in msg
    with pytest.raises(ValueError, match="seed=3"):
        prepared.prepared_old_split(dst, fraction=0.3, mode="classes", seed=3)

    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    path = copy / "old_split.json"
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 0 '))
    with pytest.raises(ValueError, match="old_split.json.*modified"):
        prepared.prepared_old_split(copy, fraction=0.3, mode="classes", seed=0)


def test_prepared_source_checks(gld, tmp_path):
    _, dst, _, _ = gld
    with pytest.raises(ValueError, match=r"no split 'query'.*\['index', 'test', 'train'\]"):
        prepared.PreparedSource(dst, "query", image_size=SIZE)
    source = prepared.PreparedSource(dst, "train", image_size=SIZE)
    assert "split='train'" in repr(source) and "images=10" in repr(source)
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone[3]["image"], source[3]["image"])
    items = list(grain.MapDataset.source(source).to_iter_dataset(grain.ReadOptions(num_threads=2)))
    assert [int(x["label"]) for x in items] == source.labels.tolist()

    copy = tmp_path / "copy"
    shutil.copytree(dst, copy)
    np.save(copy / "train.labels.npy", np.zeros(10, np.int32))
    with pytest.raises(ValueError, match="train.labels.npy.*sha256"):
        prepared.PreparedSource(copy, "train", image_size=SIZE)
    os.remove(copy / "manifest.json")
    with pytest.raises(FileNotFoundError) as e:
        prepared.PreparedSource(copy, "train", image_size=SIZE)
    assert "python -m bcl_jax.data.prepare" in str(e.value) and "resumes" in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        prepared.read_manifest(tmp_path / "nowhere")
    (copy / "manifest.json").write_text('{"format": "other/1"}')
    with pytest.raises(ValueError, match="format"):
        prepared.read_manifest(copy)


def test_inshop(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fake_inshop(str(src))
    manifest = _run("inshop", src, dst)
    partition = inshop.read_partition(src)
    for name in ("train", "query", "gallery"):
        part = partition[name]
        source = _check_images(dst, name, [os.path.join(src, p) for p in part.paths])
        assert source.ids == part.paths and source.labels.tolist() == part.labels.tolist()
        assert source.classes == part.classes == manifest["splits"][name]["classes"]
    assert manifest["splits"]["query"]["num_classes"] == 3  # query ∪ gallery items
    assert manifest["unreadable"] == [] and (dst / "unreadable.txt").read_text() == ""


def test_folder_command_line(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fake_folder(src)
    command = [sys.executable, "-m", "bcl_jax.data.prepare", "--dataset=folder", f"--src={src}"]
    command += [f"--dst={dst}", f"--image_size={SIZE}", "--shard_size=3", "--workers=2"]
    command += ["--old_fraction=0.5", "--split_seed=7"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    manifest = prepared.read_manifest(dst)
    train = folder.ImageFolder(src / "train", image_size=SIZE)
    query, gallery = folder.eval_folders(src / "query", src / "gallery", image_size=SIZE)
    for name, ref in (("train", train), ("query", query), ("gallery", gallery)):
        source = _check_images(dst, name, ref.paths)
        assert source.ids == [os.path.relpath(p, src) for p in ref.paths]
        assert source.labels.tolist() == ref.labels.tolist() and source.classes == ref.classes
    assert manifest["splits"]["train"]["shards"][-1] == "train-00002-of-00003.array_record"
    assert manifest["old_split"]["seed"] == 7 and manifest["old_split"]["fraction"] == 0.5
    prepared.prepared_old_split(dst, fraction=0.5, mode="classes", seed=7)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _run("folder", tmp_path / "absent", tmp_path / "dst")
    with pytest.raises(ValueError, match="Unknown dataset 'sop'"):
        _run("sop", tmp_path, tmp_path / "dst")
    (tmp_path / "g").mkdir()
    with pytest.raises(FileNotFoundError, match="train_clean.csv"):
        _run("gldv2", tmp_path / "g", tmp_path / "dst")
    (tmp_path / "g" / "train_clean.csv").write_text("landmark_id,images\n1,abc001\nx,abd002\n")
    with pytest.raises(ValueError, match="line 3: landmark id 'x'"):
        _run("gldv2", tmp_path / "g", tmp_path / "dst")


def test_lost_class_and_empty_split_stop(tmp_path):
    src = tmp_path / "src"
    _fake_folder(src, {"train": {"ant": 2, "bee": 0}})
    _corrupt(str(src / "train" / "bee" / "x.jpg"))
    with pytest.raises(ValueError, match="1 train class.*bee"):
        _run("folder", src, tmp_path / "dst1")
    shutil.rmtree(src / "train" / "ant")
    with pytest.raises(ValueError, match="All 1 'train' images are unreadable"):
        _run("folder", src, tmp_path / "dst2")


def test_data_name_folder_reads_prepared_shards(tmp_path):
    """data.prepared with data.name=folder: the raw folders are not needed (nor read), the old
    split is the manifest's, a config asking another split stops before anything trains, and
    the training stream reads the shards."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    _fake_folder(src)
    _run("folder", src, dst, old_fraction=0.5, split_seed=3)
    cfg = synthetic_config.get_config("smoke").data
    cfg.name, cfg.image_size, cfg.prepared = "folder", SIZE, str(dst)
    cfg.old_fraction, cfg.split_seed = 0.5, 3
    built = data.build(cfg)
    assert isinstance(built.train, prepared.PreparedSource)
    raw = folder.ImageFolder(src / "train", image_size=SIZE)
    assert built.train.labels.tolist() == raw.labels.tolist() and built.num_classes == 3
    want = splits.old_split(raw.labels, 3, fraction=0.5, mode="classes", seed=3)
    np.testing.assert_array_equal(built.old_label, want.old_label)
    test = built.tests[0]
    assert (len(test.query), len(test.gallery)) == (2, 4)
    batch = next(pipeline.train_stream(built.train, global_batch=8, seed=0))
    for image, label in zip(batch["image"], batch["label"]):  # each a shard image of its class
        k = next(
            k for k in range(len(raw)) if np.abs(image.astype(float) - raw[k]["image"]).mean() < 3.0
        )
        assert raw.labels[k] == label

    cfg.split_seed = 4
    with pytest.raises(ValueError, match="old split .*seed=3.*seed=4"):
        data.build(cfg)
    cfg.split_seed, cfg.prepared = 3, str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="data.prepared=.*absent"):
        data.build(cfg)


def test_prepared_preprocessing(gld, tmp_path):
    """Prepared images are centre-cropped squares: 'resize' evaluation, which needs the whole
    image, stops; random crops read the stored square at data.train_resize_size."""
    _, dst, _, _ = gld
    squash = images.Preprocess(8, eval_mode="resize")
    with pytest.raises(ValueError, match="data.eval_preprocess='resize'.*centre-cropped"):
        prepared.PreparedSource(dst, "train", image_size=8, preprocess=squash)
    source = prepared.PreparedSource(
        dst, "train", image_size=8, preprocess=images.Preprocess(8, train_resize_size=12)
    )
    record = source.train_item(0)
    assert record["image"].shape == (12, 12, 3) and record["label"] == source.labels[0]
    # The stored square, resized: its centre agrees with the evaluation image's.
    np.testing.assert_allclose(
        record["image"].mean((0, 1)), source[0]["image"].mean((0, 1)), atol=6
    )
