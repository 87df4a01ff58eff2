"""gs:// paths through etils.epath, end to end, on an in-memory filesystem (no network): the
same calls that reach Google Cloud Storage through gcsfs reach fake_datasets.InMemoryGCS."""

import io
import json
import os

import fake_datasets
import numpy as np
import pytest
from etils import epath
from PIL import Image

from bcl_jax import data
from bcl_jax.data import gldv2, images, pipeline, prepare, prepared, split_file, storage
from configs import synthetic as synthetic_config

LAYOUT = {'train': {'ant': 3, 'bee': 2, 'cow': 2}, 'query': {'ant': 1}, 'gallery': {'ant': 2}}


def _write_folders(root):
    """The same small dataset at a local path or a gs:// URI."""
    rng = np.random.default_rng(0)
    for split, classes in LAYOUT.items():
        for name, count in classes.items():
            for k in range(count):
                path = epath.Path(root) / split / name / f'{k}.png'
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, 'PNG')
                path.write_bytes(buffer.getvalue())


def _folder_cfg(root):
    cfg = synthetic_config.get_config('smoke').data
    cfg.name, cfg.image_size = 'folder', 6
    for split in LAYOUT:
        cfg.folder[f'{split}_dir'] = f'{root}/{split}'
    return cfg


@pytest.fixture
def gcs():
    with fake_datasets.fake_gcs():
        yield 'gs://bucket/datasets'


def test_write_atomic_local_and_gcs(tmp_path, gcs):
    for path in (tmp_path / 'a' / 'b.json', f'{gcs}/a/b.json'):
        storage.write_atomic(path, '{"x": 1}\n')
        storage.write_atomic(path, b'{"x": 2}\n')  # replaces
        assert json.loads(epath.Path(path).read_text()) == {'x': 2}
        leftovers = [p.name for p in epath.Path(path).parent.iterdir() if p.name != 'b.json']
        assert leftovers == []  # the temporary file was renamed away
    assert storage.is_local(tmp_path) and not storage.is_local(gcs)
    assert storage.absolute(gcs) == gcs and storage.absolute('x').endswith('/x')


def test_folder_dataset_on_gcs_end_to_end(tmp_path, gcs):
    """data.name=folder read from gs://: the same classes, ids, labels, pixels and fingerprint
    as the same files on a local disk; the old split file of a gs:// workdir round-trips."""
    _write_folders(tmp_path)
    _write_folders(gcs)
    local, remote = data.build(_folder_cfg(tmp_path)), data.build(_folder_cfg(gcs))
    assert remote.train.paths[0].startswith('gs://bucket/datasets/train/ant/')
    assert remote.train.ids == local.train.ids and remote.train.classes == ['ant', 'bee', 'cow']
    np.testing.assert_array_equal(remote.train.labels, local.train.labels)
    assert remote.fingerprint == local.fingerprint  # where the data lives does not enter
    for k in range(len(local.train)):
        np.testing.assert_array_equal(remote.train[k]['image'], local.train[k]['image'])
    batch = next(pipeline.train_stream(remote.train, global_batch=8, seed=0, flip=True))
    assert batch['image'].shape == (8, 6, 6, 3)
    assert len(remote.tests[0].query) == 1 and len(remote.tests[0].gallery) == 2

    # A broken file on gs:// is found by the scan and named with its URI.
    epath.Path(f'{gcs}/train/bee/1.png').write_bytes(b'no image')
    with pytest.raises(images.CorruptImageError, match='gs://bucket/datasets/train/bee/1.png'):
        data.build(_folder_cfg(gcs))

    # A split file in a gs:// work directory.
    path = 'gs://bucket/run/old_split.json'
    old = split_file.OldSplit(indices=np.array([0, 1, 2]), old_label=remote.old_label)
    split_file.write_split(
        path, old, image_ids=remote.train.ids, seed=0, mode='classes', fraction=0.3
    )
    back, meta = split_file.read_split_file(path, image_ids=remote.train.ids)
    np.testing.assert_array_equal(back.indices, [0, 1, 2])
    assert meta['image_ids'] == remote.train.ids[:3]


def test_prepare_from_gcs_and_gldv2_split_on_gcs(tmp_path, gcs):
    """prepare reads a gs:// download (its shards are written where array_record can write:
    a local disk here, gs:// natively in production); GLDv2 on gs:// writes its old split into
    a gs:// work directory and reads it back on the rerun."""
    _write_folders(gcs)
    manifest = prepare.prepare(
        dataset='folder', src=gcs, dst=str(tmp_path / 'dst'), image_size=6, workers=2
    )
    assert manifest['src'] == gcs and manifest['splits']['train']['count'] == 7
    source = prepared.PreparedSource(tmp_path / 'dst', 'train', image_size=6)
    assert source.ids[0] == 'train/ant/0.png'

    root = 'gs://bucket/gld'
    local = fake_datasets.gldv2_root(tmp_path / 'gld', landmarks=4, queries=2)
    for folder, _, files in os.walk(local):
        for name in files:
            target = epath.Path(root) / os.path.relpath(os.path.join(folder, name), local)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(epath.Path(folder, name).read_bytes())
    cfg = synthetic_config.get_config('smoke').data
    cfg.name, cfg.gldv2.root, cfg.gldv2.tests = 'gldv2', root, ('gldv2',)
    first = data.build(cfg, workdir='gs://bucket/run')
    written = 'gs://bucket/run/old_split.json'
    assert epath.Path(written).is_file()
    again = data.build(cfg, workdir='gs://bucket/run')  # reads the recorded split
    np.testing.assert_array_equal(again.old_label, first.old_label)
    _, meta = gldv2.read_split_file(written, image_ids=first.train.ids)
    assert meta['mode'] == 'classes'
