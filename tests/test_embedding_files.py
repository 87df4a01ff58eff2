"""embedding_files: exact round trip, reordering by id, and every bad input stops clearly."""

import json
import logging
import os

import numpy as np
import pytest

from bcl_jax import embedding_files as ef

IDENTITY = {'architecture': 'resnet18', 'weights_sha256': 'ab12', 'step': 7, 'framework': 'jax'}


def _exact_unit_rows(n=6, d=8, seed=0):
    """Rows of norm exactly 1 in float32 (four entries ±0.5, or one ±1), so that normalising
    on load changes no bit and the round trip can be compared exactly."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, d), np.float32)
    for r in range(n):
        cols = rng.choice(d, size=4 if r % 2 else 1, replace=False)
        rows[r, cols] = rng.choice([-1.0, 1.0], size=len(cols)) * (0.5 if r % 2 else 1.0)
    return rows


def _write(tmp_path, n=6, labels=True, **kw):
    emb = _exact_unit_rows(n)
    ids = [f'img{i:03d}' for i in range(n)]
    lab = np.arange(n) % 3 if labels else None
    ef.write_embeddings(tmp_path, 'gallery', emb, ids=ids, labels=lab, identity=IDENTITY, **kw)
    return emb, ids, lab


def _as_written_elsewhere(tmp_path, name='gallery'):
    """The manifest without its content digests, as a script of another framework writes it:
    the checks below then meet the files as they are (with digests, any change after writing
    stops first, tests/test_integrity.py)."""
    path = tmp_path / f'{name}.json'
    manifest = json.loads(path.read_text())
    del manifest['sha256']
    path.write_text(json.dumps(manifest))


def test_round_trip_exact(tmp_path):
    emb, ids, labels = _write(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        'gallery.ids.txt',
        'gallery.json',
        'gallery.labels.npy',
        'gallery.npy',
    ]  # no temporary file left
    got = ef.read_embeddings(tmp_path, 'gallery', expected_dim=8)
    assert got.emb.dtype == np.float32 and np.array_equal(got.emb, emb)
    assert got.ids == ids
    assert got.labels.dtype == np.int64 and np.array_equal(got.labels, labels)
    assert got.manifest['identity'] == IDENTITY
    assert (got.manifest['num_items'], got.manifest['dim'], got.manifest['dtype']) == (
        6,
        8,
        'float32',
    )
    # The files are plain NumPy and text, readable without bcl_jax.
    assert np.array_equal(np.load(tmp_path / 'gallery.npy'), emb)
    assert (tmp_path / 'gallery.ids.txt').read_text() == ''.join(i + '\n' for i in ids)
    assert json.loads((tmp_path / 'gallery.json').read_text())['has_labels'] is True


def test_unlabelled_set_and_rewrite(tmp_path):
    _write(tmp_path)
    _write(tmp_path, labels=False)  # the same name again, now without labels
    assert not (tmp_path / 'gallery.labels.npy').exists()
    assert ef.read_embeddings(tmp_path, 'gallery').labels is None


def test_rows_normalised_on_load_with_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((5, 4)).astype(np.float32) * 3.0
    ef.write_embeddings(tmp_path, 'q', raw, ids=range(5), identity={})
    with caplog.at_level(logging.WARNING):
        got = ef.read_embeddings(tmp_path, 'q')
    want = raw.astype(np.float64) / np.sqrt((raw.astype(np.float64) ** 2).sum(1, keepdims=True))
    np.testing.assert_allclose(got.emb, want, atol=1e-6)
    assert got.ids == ['0', '1', '2', '3', '4']
    assert '5 of 5 rows were not unit vectors' in caplog.text


def test_reordered_to_the_dataset_order(tmp_path):
    emb = _exact_unit_rows(6)
    ids = ['e', 'b', 'f', 'a', 'd', 'c']  # the order another framework happened to embed in
    labels = np.array([4, 1, 5, 0, 3, 2])
    ef.write_embeddings(tmp_path, 'g', emb, ids=ids, labels=labels, identity={})
    got = ef.read_embeddings(tmp_path, 'g', expected_ids=['a', 'b', 'c', 'd', 'e', 'f'])
    assert got.ids == ['a', 'b', 'c', 'd', 'e', 'f']
    assert np.array_equal(got.labels, [0, 1, 2, 3, 4, 5])
    assert np.array_equal(got.emb, emb[[3, 1, 5, 4, 0, 2]])
    # Integer dataset ids match their str form.
    ef.write_embeddings(tmp_path, 'n', emb, ids=[10, 11, 12, 13, 14, 15], identity={})
    got = ef.read_embeddings(tmp_path, 'n', expected_ids=np.array([15, 14, 13, 12, 11, 10]))
    assert np.array_equal(got.emb, emb[::-1])


def test_missing_and_unknown_ids(tmp_path):
    _write(tmp_path)
    expected = [f'img{i:03d}' for i in range(1, 6)] + ['other']
    with pytest.raises(ValueError, match=r"missing: 'other'; not in the dataset: 'img000'"):
        ef.read_embeddings(tmp_path, 'gallery', expected_ids=expected)
    many = [f'x{i}' for i in range(20)]
    with pytest.raises(ValueError, match=r"'x4' and 15 more"):
        ef.read_embeddings(tmp_path, 'gallery', expected_ids=many)


def test_wrong_dim_stops_before_reading_the_array(tmp_path):
    _write(tmp_path)
    _as_written_elsewhere(tmp_path)
    (tmp_path / 'gallery.npy').write_bytes(b'not an array')  # never read
    with pytest.raises(ValueError, match='embedding dim 8, but 16 is expected'):
        ef.read_embeddings(tmp_path, 'gallery', expected_dim=16)
    with pytest.raises(ValueError, match='not a readable .npy'):
        ef.read_embeddings(tmp_path, 'gallery', expected_dim=8)


def test_bad_files_stop_with_their_message(tmp_path):
    emb, ids, labels = _write(tmp_path)
    _as_written_elsewhere(tmp_path)
    ids_file, npy, labels_file = (
        tmp_path / f for f in ('gallery.ids.txt', 'gallery.npy', 'gallery.labels.npy')
    )

    ids_file.write_text(''.join(i + '\n' for i in ids[:-1]))
    with pytest.raises(ValueError, match=r'gallery.ids.txt\): 5 ids for 6 embeddings'):
        ef.read_embeddings(tmp_path, 'gallery')
    ids_file.write_text(''.join(i + '\n' for i in ids[:-1] + ['img002']))
    with pytest.raises(ValueError, match=r"duplicate ids 'img002'"):
        ef.read_embeddings(tmp_path, 'gallery')
    ids_file.write_text(''.join(i + '\r\n' for i in ids))  # Windows line ends are fine
    assert ef.read_embeddings(tmp_path, 'gallery').ids == ids

    np.save(labels_file, labels[:4])
    with pytest.raises(ValueError, match=r'labels must be \(6,\).*shape \(4,\)'):
        ef.read_embeddings(tmp_path, 'gallery')
    np.save(labels_file, labels)

    bad = emb.copy()
    bad[4, 2] = np.nan
    np.save(npy, bad)
    with pytest.raises(ValueError, match=r"1 rows hold NaN or inf, e.g. rows '4 \(id img004\)'"):
        ef.read_embeddings(tmp_path, 'gallery')
    np.save(npy, emb[:, :4])
    with pytest.raises(ValueError, match=r'holds float32 \(6, 4\), but the manifest says'):
        ef.read_embeddings(tmp_path, 'gallery')
    np.save(npy, emb.astype(np.float64))
    with pytest.raises(ValueError, match='holds float64'):
        ef.read_embeddings(tmp_path, 'gallery')
    zero = emb.copy()
    zero[1] = 0
    np.save(npy, zero)
    with pytest.raises(ValueError, match="1 all-zero rows, ids 'img001'"):
        ef.read_embeddings(tmp_path, 'gallery')
    with pytest.raises(FileNotFoundError, match='no manifest'):
        ef.read_embeddings(tmp_path, 'query')


def test_bad_input_to_write(tmp_path):
    emb = _exact_unit_rows(4)
    ids = ['a', 'b', 'c', 'd']
    write = lambda **kw: ef.write_embeddings(
        tmp_path,
        kw.pop('name', 's'),
        kw.pop('emb', emb),
        ids=kw.pop('ids', ids),
        identity=kw.pop('identity', {}),
        **kw,
    )
    with pytest.raises(ValueError, match=r'non-empty \(N, D\) array'):
        write(emb=emb[0])
    with pytest.raises(ValueError, match='3 ids for 4 embeddings'):
        write(ids=ids[:3])
    with pytest.raises(ValueError, match="duplicate ids 'a'"):
        write(ids=['a', 'b', 'a', 'd'])
    with pytest.raises(ValueError, match='on one line'):
        write(ids=['a', 'b\nc', 'x', 'd'])
    nan = emb.copy()
    nan[2, 0] = np.inf
    with pytest.raises(ValueError, match="rows '2 \\(id c\\)'"):
        write(emb=nan)
    with pytest.raises(ValueError, match='labels must be integers'):
        write(labels=np.ones(4))
    with pytest.raises(ValueError, match='not strict JSON'):
        write(identity={'loss': float('nan')})
    with pytest.raises(ValueError, match='plain file stem'):
        write(name='../s')
    assert os.listdir(tmp_path) == []  # nothing written by a refused call
