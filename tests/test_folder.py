"""Tests for bcl_jax.data.folder on tiny image folders written with PIL."""

import logging
import os

import grain
import numpy as np
import pytest
from PIL import Image

from bcl_jax.data import folder
from bcl_jax.data.folder import CorruptImageError, ImageFolder, eval_folders

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _save(path, img, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)
    return path


def _noise(size, mode="RGB", seed=0):
    """A noisy image: compresses badly, so a truncated JPEG of it loses pixel data."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def _split(width, height, colours, vertical=True):
    """Equal bands of `colours`, left to right (vertical=True) or top to bottom."""
    img = Image.new("RGB", (width, height))
    n = len(colours)
    for k, colour in enumerate(colours):
        if vertical:
            box = (k * width // n, 0, (k + 1) * width // n, height)
        else:
            box = (0, k * height // n, width, (k + 1) * height // n)
        img.paste(colour, box)
    return img


@pytest.fixture
def train_dir(tmp_path):
    """Classes made out of order; mixed formats, modes, sizes; files that must be ignored."""
    root = tmp_path / "train"
    _save(root / "dog" / "b.jpg", _noise((20, 12)))
    _save(root / "dog" / "a.PNG", _noise((9, 17), "L"))
    _save(root / "dog" / "nested" / "deeper" / "c.JPEG", _noise((16, 16)))
    _save(root / "cat" / "x.png", _noise((12, 30), "RGBA"))
    _save(root / "cat" / "y.png", _noise((5, 5)).convert("P"), transparency=0)
    _save(root / "bird" / "z.jpeg", Image.new("L", (40, 10), 128))
    # Ignored: hidden files and folders, other extensions, files directly in root.
    _save(root / "dog" / ".hidden.jpg", _noise((8, 8)))
    _save(root / "dog" / ".cache" / "d.jpg", _noise((8, 8)))
    _save(root / "stray.jpg", _noise((8, 8)))
    (root / "cat" / "notes.txt").write_text("not an image")
    _save(root / ".thumbnails" / "t.jpg", _noise((8, 8)))
    return root


def test_classes_paths_labels(train_dir):
    ds = ImageFolder(train_dir, image_size=8)
    assert ds.classes == ["bird", "cat", "dog"]
    assert ds.num_classes == 3
    rel = [os.path.relpath(p, train_dir) for p in ds.paths]
    assert rel == [
        "bird/z.jpeg",
        "cat/x.png",
        "cat/y.png",
        "dog/a.PNG",
        "dog/b.jpg",
        "dog/nested/deeper/c.JPEG",
    ]
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.labels, [0, 1, 1, 2, 2, 2])
    assert len(ds) == 6 and ds.num_skipped == 0 and ds.skipped == []
    again = ImageFolder(str(train_dir), image_size=8)
    assert again.paths == ds.paths
    np.testing.assert_array_equal(again.labels, ds.labels)


def test_items_are_square_uint8_rgb(train_dir):
    ds = ImageFolder(train_dir, image_size=8)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (8, 8, 3) and item["image"].dtype == np.uint8
        assert item["label"].dtype == np.int32 and item["label"].shape == ()
        assert item["label"] == ds.labels[i]
    np.testing.assert_array_equal(ds[0]["image"], 128)  # Grey "L" JPEG -> equal RGB channels.
    assert ds[np.int64(1)]["image"].shape == (8, 8, 3)


def test_upscales_small_images(tmp_path):
    _save(tmp_path / "a" / "tiny.png", Image.new("RGB", (3, 5), GREEN))
    item = ImageFolder(tmp_path, image_size=16)[0]
    assert item["image"].shape == (16, 16, 3)
    np.testing.assert_array_equal(item["image"], np.broadcast_to(GREEN, (16, 16, 3)))


@pytest.mark.parametrize("size,vertical", [((30, 10), True), ((10, 30), False)])
def test_center_crop_keeps_middle(tmp_path, size, vertical):
    """Shorter side == image_size: only the crop acts, keeping the middle (green) band."""
    _save(tmp_path / "a" / "bands.png", _split(*size, [RED, GREEN, BLUE], vertical))
    image = ImageFolder(tmp_path, image_size=10)[0]["image"]
    np.testing.assert_array_equal(image, np.broadcast_to(GREEN, (10, 10, 3)))


def test_resize_then_crop_two_colours(tmp_path):
    """40x20, red | blue: the central 20x20 square, halved, is red on the left, blue right."""
    _save(tmp_path / "a" / "split.png", _split(40, 20, [RED, BLUE]))
    image = ImageFolder(tmp_path, image_size=10)[0]["image"].astype(int)
    np.testing.assert_array_equal(image[:, :4], np.broadcast_to(RED, (10, 4, 3)))
    np.testing.assert_array_equal(image[:, 6:], np.broadcast_to(BLUE, (10, 4, 3)))
    assert (image[:, 4, 0] > image[:, 4, 2]).all() and (image[:, 5, 2] > image[:, 5, 0]).all()


def test_grain_source(train_dir):
    ds = ImageFolder(train_dir, image_size=8)
    item = grain.MapDataset.source(ds)[0]
    assert item["image"].shape == (8, 8, 3) and item["label"] == 0


def test_eval_folders_share_mapping(tmp_path, caplog):
    query, gallery = tmp_path / "query", tmp_path / "gallery"
    for cls in ["b", "d"]:
        _save(query / cls / "q.jpg", _noise((8, 8)))
    for cls in ["a", "b", "c"]:
        _save(gallery / cls / "g.png", _noise((8, 8)))
    with caplog.at_level(logging.WARNING):
        q, g = eval_folders(query, gallery, image_size=8)
    assert q.classes == g.classes == ["a", "b", "c", "d"]
    assert q.num_classes == g.num_classes == 4
    np.testing.assert_array_equal(q.labels, [1, 3])
    np.testing.assert_array_equal(g.labels, [0, 1, 2])
    assert "1 of 2 query classes have no folder in gallery" in caplog.text
    assert "positives: d" in caplog.text


def test_class_names_fix_the_mapping(tmp_path):
    _save(tmp_path / "b" / "x.png", _noise((8, 8)))
    ds = ImageFolder(tmp_path, image_size=8, class_names=["z", "b", "a"])
    assert ds.classes == ["z", "b", "a"] and ds.num_classes == 3
    np.testing.assert_array_equal(ds.labels, [1])


def test_unknown_class_is_an_error(tmp_path):
    _save(tmp_path / "a" / "x.png", _noise((8, 8)))
    _save(tmp_path / "intruder" / "x.png", _noise((8, 8)))
    with pytest.raises(ValueError, match="not in class_names: intruder"):
        ImageFolder(tmp_path, image_size=8, class_names=["a"])


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        ImageFolder(tmp_path / "nowhere", image_size=8)


def test_root_without_class_folders(tmp_path):
    _save(tmp_path / "loose.jpg", _noise((8, 8)))
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(tmp_path, image_size=8)


def test_empty_class_is_named(tmp_path):
    _save(tmp_path / "full" / "x.png", _noise((8, 8)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="class folder.*empty.*has no images"):
        ImageFolder(tmp_path, image_size=8)


def test_no_images_at_all(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "pic.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="2 class folder.*no images"):
        ImageFolder(tmp_path, image_size=8)


def test_bad_image_size(tmp_path):
    _save(tmp_path / "a" / "x.png", _noise((8, 8)))
    with pytest.raises(ValueError, match="image_size"):
        ImageFolder(tmp_path, image_size=0)


@pytest.fixture
def corrupt_dir(tmp_path):
    """Class 'a': one good and one truncated JPEG; class 'b': one good PNG, one text '.png'."""
    root = tmp_path / "data"
    _save(root / "a" / "good.jpg", _noise((64, 64)))
    jpeg = _save(root / "a" / "truncated.jpg", _noise((64, 64), seed=1)).read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    _save(root / "b" / "good.png", _noise((8, 8)))
    (root / "b" / "text.png").write_text("this is not a PNG")
    return root


def test_scan_finds_unreadable_headers_and_truncated_files(corrupt_dir):
    """The header scan stops on a file that is not an image and on a truncated JPEG (its end
    marker is missing), naming them and data.skip_corrupt; 'decode' finds the same two."""
    with pytest.raises(CorruptImageError, match="data.skip_corrupt=True") as info:
        ImageFolder(corrupt_dir, image_size=8)
    assert "2 of 4 images cannot be read" in str(info.value)
    assert str(corrupt_dir / "b" / "text.png") in str(info.value)
    assert str(corrupt_dir / "a" / "truncated.jpg") + " (truncated" in str(info.value)
    with pytest.raises(CorruptImageError, match="2 of 4 images cannot be read"):
        ImageFolder(corrupt_dir, image_size=8, scan="decode")


def test_scan_mode_is_checked(corrupt_dir):
    with pytest.raises(ValueError, match="data.scan_images='full'"):
        ImageFolder(corrupt_dir, image_size=8, scan="full")


@pytest.mark.parametrize("name", ["a/truncated.jpg", "b/text.png"])
def test_corrupt_image_raises_when_read(corrupt_dir, name):
    ds = ImageFolder(corrupt_dir, image_size=8, scan="off")
    assert len(ds) == 4
    index = ds.paths.index(str(corrupt_dir / name))
    with pytest.raises(CorruptImageError, match="data.skip_corrupt=True") as info:
        ds[index]
    assert str(corrupt_dir / name) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_skip_corrupt_drops_bad_files(corrupt_dir, caplog):
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(corrupt_dir, image_size=8, skip_corrupt=True, scan="decode")
    bad = [str(corrupt_dir / "a" / "truncated.jpg"), str(corrupt_dir / "b" / "text.png")]
    assert ds.skipped == bad and ds.num_skipped == 2
    assert [os.path.relpath(p, corrupt_dir) for p in ds.paths] == ["a/good.jpg", "b/good.png"]
    assert ds.ids == ["a/good.jpg", "b/good.png"]
    np.testing.assert_array_equal(ds.labels, [0, 1])
    assert all(ds[i]["image"].shape == (8, 8, 3) for i in range(len(ds)))
    assert "skipping 2 unreadable image(s) of 4" in caplog.text
    assert bad[0] in caplog.text and bad[1] in caplog.text
    # The header scan drops both too: the truncated JPEG has no end marker.
    ds = ImageFolder(corrupt_dir, image_size=8, skip_corrupt=True)
    assert ds.skipped == bad and len(ds) == 2


def test_skip_corrupt_class_left_empty(corrupt_dir):
    os.remove(corrupt_dir / "b" / "good.png")
    with pytest.raises(ValueError, match="b has only unreadable images"):
        ImageFolder(corrupt_dir, image_size=8, skip_corrupt=True)


def test_load_image_is_the_one_decoder(corrupt_dir):
    """The module-level decoder is what ImageFolder uses (for other sources to share)."""
    path = str(corrupt_dir / "b" / "good.png")
    ds = ImageFolder(corrupt_dir, image_size=8, scan="off")
    np.testing.assert_array_equal(folder.load_image(path, 8), ds[ds.paths.index(path)]["image"])


def test_class_names_are_nfc(tmp_path, caplog):
    """'café' spelled decomposed (NFD, as macOS stores names) and composed (NFC) is one class:
    two such folders are merged, with a warning showing both spellings' code points, and a
    query folder in one spelling meets a gallery folder in the other."""
    nfc_name, nfd_name = "caf\u00e9", "cafe\u0301"
    assert nfc_name != nfd_name
    root = tmp_path / "train"
    _save(root / nfc_name / "1.png", _noise((6, 6)))
    _save(root / nfd_name / "2.png", _noise((6, 6), seed=1))
    _save(root / "tea" / "3.png", _noise((6, 6), seed=2))
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(root, image_size=4)
    assert ds.classes == [nfc_name, "tea"]
    np.testing.assert_array_equal(ds.labels, [0, 0, 1])
    assert ds.ids == [f"{nfc_name}/1.png", f"{nfc_name}/2.png", "tea/3.png"]
    assert "U+0065 U+0301" in caplog.text and "U+00E9" in caplog.text and "merged" in caplog.text

    _save(tmp_path / "query" / nfd_name / "q.png", _noise((6, 6), seed=3))
    _save(tmp_path / "gallery" / nfc_name / "g.png", _noise((6, 6), seed=4))
    query, gallery = eval_folders(tmp_path / "query", tmp_path / "gallery", image_size=4)
    assert query.classes == gallery.classes == [nfc_name]
    np.testing.assert_array_equal(query.labels, gallery.labels)


def test_symlinked_class_folder_is_read(tmp_path):
    """A class folder that is a symlink (a common way to assemble a dataset) is followed."""
    _save(tmp_path / "elsewhere" / "owl" / "1.png", _noise((6, 6)))
    _save(tmp_path / "train" / "cat" / "2.png", _noise((6, 6), seed=1))
    os.symlink(tmp_path / "elsewhere" / "owl", tmp_path / "train" / "owl")
    ds = ImageFolder(tmp_path / "train", image_size=4)
    assert ds.classes == ["cat", "owl"] and ds.ids == ["cat/2.png", "owl/1.png"]
