"""Tests for bcl_jax.checkpoint: atomic files, orbax round trips (state + data position),
weights-only restores, refusal of a checkpoint of another model, restores onto another mesh."""

import os
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import checkpoint, train
from bcl_jax import step as step_lib
from bcl_jax.data import pipeline, storage
from configs import common

NUM_CLASSES = 6


# --------------------------------------------------------------------------- write_atomic


def leftovers(directory):
    return [f for f in os.listdir(directory) if f.startswith('.tmp-')]


def test_write_atomic_text_and_bytes(tmp_path):
    path = tmp_path / 'sub' / 'dir' / 'results.json'  # parents are created
    checkpoint.write_atomic(str(path), '{"a": 1}\n')
    assert path.read_text() == '{"a": 1}\n'
    checkpoint.write_atomic(str(path), 'second')  # replaces, not appends
    assert path.read_text() == 'second'
    blob = bytes(range(256)) * 3
    checkpoint.write_atomic(str(tmp_path / 'b.npy'), blob)
    assert (tmp_path / 'b.npy').read_bytes() == blob
    assert leftovers(tmp_path / 'sub' / 'dir') == [] and leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ['b.npy', 'sub']


def test_write_atomic_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint.write_atomic('plain.txt', 'x')
    assert (tmp_path / 'plain.txt').read_text() == 'x'
    assert leftovers(tmp_path) == []


def test_write_atomic_gives_the_mode_of_a_plain_write(tmp_path):
    umask = os.umask(0o022)
    try:
        with open(tmp_path / 'plain.txt', 'w') as f:
            f.write('x')
        checkpoint.write_atomic(str(tmp_path / 'atomic.txt'), 'x')
    finally:
        os.umask(umask)
    plain = os.stat(tmp_path / 'plain.txt').st_mode & 0o777
    assert plain == 0o644
    assert os.stat(tmp_path / 'atomic.txt').st_mode & 0o777 == plain


def test_failure_mid_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / 'results.md'
    checkpoint.write_atomic(str(path), 'old content')

    def broken_fsync(fd):
        raise OSError('disk full')

    monkeypatch.setattr(storage.os, 'fsync', broken_fsync)
    with pytest.raises(OSError, match='disk full'):
        checkpoint.write_atomic(str(path), 'new content that never lands')
    monkeypatch.undo()
    assert path.read_text() == 'old content'
    assert leftovers(tmp_path) == []
    # A write of the wrong type fails inside the write itself, with the same guarantees.
    with pytest.raises(TypeError):
        checkpoint.write_atomic(str(path), 12345)
    assert path.read_text() == 'old content'
    assert leftovers(tmp_path) == []


def test_failed_rename_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / 'config.json'
    checkpoint.write_atomic(str(path), 'v1')

    def broken_replace(src, dst):
        raise PermissionError('no')

    monkeypatch.setattr(storage.os, 'replace', broken_replace)
    with pytest.raises(PermissionError):
        checkpoint.write_atomic(str(path), 'v2')
    monkeypatch.undo()
    assert path.read_text() == 'v1'
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- a train state


class TinySource:
    """24 distinct 6x6 images (pixel value encodes the index) in 4 classes."""

    num_classes = 4

    def __init__(self):
        self.labels = np.arange(24, dtype=np.int32) % 4

    def __len__(self):
        return 24

    def __getitem__(self, i):
        i = int(i)
        image = (np.arange(6 * 6 * 3).reshape(6, 6, 3) + 7 * i) % 256
        return {'image': image.astype(np.uint8), 'label': self.labels[i]}


def model_cfg(**kw):
    d = dict(arch='cifar_resnet', width=4, depth=8, embedding_dim=16, head='cosface')
    d.update(kw)
    return common.model(**d)


def meta_of(cfg, num_classes=NUM_CLASSES, **extra):
    """The meta dict train.train writes: the model's description and the class count."""
    desc = {k: cfg[k] for k in ('arch', 'width', 'depth', 'embedding_dim', 'head')}
    return dict(stage='old', model=desc, num_classes=num_classes, **extra)


def trained_state(seed=0, steps=3):
    """A state as after `steps` optimizer steps with random gradients (no compilation)."""
    cfg = model_cfg()
    _, params, stats = step_lib.init_model(cfg, NUM_CLASSES, seed=seed)
    tx, _ = step_lib.make_optimizer(common.train(epochs=1.0, batch_size=16), 10.0)
    rng = np.random.default_rng(seed)
    # Running means and variances away from their init (variances stay positive).
    stats = jax.tree.map(
        lambda x: (
            np.asarray(x) * rng.uniform(0.5, 1.5, x.shape) + rng.uniform(0.0, 0.5, x.shape)
        ).astype(np.float32),
        stats,
    )
    opt = tx.init(params)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        updates, opt = tx.update(grads, opt, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    state = dict(
        step=np.int32(steps),
        params=params,
        batch_stats=stats,
        opt_state=opt,
        first_nonfinite_step=np.int32(-1),
    )
    return jax.tree.map(np.array, state), tx, cfg


def template_like(state, sharding):
    """A differently-valued state of the same structure on `sharding` (what train.train has)."""
    zeros = jax.tree.map(lambda x: np.zeros_like(x), state)
    if 'first_nonfinite_step' in zeros:
        zeros['first_nonfinite_step'] = np.int32(5)
    return jax.device_put(zeros, sharding)


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


def mesh_of(n):
    return jax.make_mesh(
        (n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )


def stream_of(source):
    return pipeline.train_stream(
        source, global_batch=8, seed=3, crop_padding=2, flip=True, num_threads=1
    )


def test_round_trip_of_state_and_data_position(tmp_path):
    state, _, _ = trained_state()
    mesh = mesh_of(8)
    replicated = NamedSharding(mesh, P())
    source = TinySource()

    stream = stream_of(source)
    for _ in range(5):  # past one epoch (3 batches of 8): reshuffled epoch 2
        next(stream)
    data_state = stream.get_state()
    continuation = [next(stream) for _ in range(4)]

    ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2)
    assert ckpt.latest_step() is None
    meta = meta_of(model_cfg(), seconds=12.5)
    ckpt.save(3, jax.device_put(state, replicated), data_state, meta)
    ckpt.close()

    ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=2)
    assert ckpt.latest_step() == 3
    restored, restored_data, restored_meta = ckpt.restore(
        3, template_like(state, replicated), meta_of(model_cfg())
    )
    ckpt.close()
    assert set(restored) == set(state)
    assert_trees_equal(restored, state)
    assert int(restored['step']) == 3 and int(restored['first_nonfinite_step']) == -1
    assert restored_meta == meta
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)

    resumed = stream_of(source)
    resumed.set_state(restored_data)
    for want in continuation:
        got = next(resumed)
        np.testing.assert_array_equal(got['image'], want['image'])
        np.testing.assert_array_equal(got['label'], want['label'])
    # The batches really depend on the position: a fresh stream starts elsewhere.
    fresh = next(stream_of(source))
    assert not np.array_equal(fresh['image'], continuation[0]['image'])


def test_max_to_keep_and_latest_step(tmp_path):
    state, _, _ = trained_state(steps=1)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
    for step in (2, 4, 6):
        state['step'] = np.int32(step)
        ckpt.save(step, state, {'position': step}, meta_of(model_cfg()))
    assert ckpt.latest_step() == 6
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [4, 6]


def test_restore_weights_only(tmp_path):
    state, _, cfg = trained_state(seed=1)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
    ckpt.save(9, state, {}, meta_of(cfg, seconds=3.0))
    ckpt.close()
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None, read_only=True)
    template = template_like(
        dict(params=state['params'], batch_stats=state['batch_stats']),
        NamedSharding(mesh_of(8), P()),
    )
    weights, meta = ckpt.restore_weights(9, template, meta_of(cfg))
    ckpt.close()
    assert set(weights) == {'params', 'batch_stats'}
    assert_trees_equal(weights, dict(params=state['params'], batch_stats=state['batch_stats']))
    assert meta['seconds'] == 3.0


def test_train_load_gives_the_saved_model(tmp_path):
    state, _, cfg = trained_state(seed=2)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
    ckpt.save(4, state, {}, meta_of(cfg, seconds=7.0))
    ckpt.close()
    model = train.load(str(tmp_path), cfg, NUM_CLASSES, mesh_of(8))
    assert (model.step, model.seconds, model.num_classes) == (4, 7.0, NUM_CLASSES)
    assert_trees_equal(model.params, state['params'])
    assert_trees_equal(model.batch_stats, state['batch_stats'])
    # The graph is the model's: embedding 8 images gives unit vectors of the configured size.
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    emb = model.embed_fn(mesh_of(8))(model.params, model.batch_stats, images)
    assert emb.shape == (8, 16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, rtol=1e-5)


def test_load_refuses_an_unfinished_model_unless_allowed(tmp_path):
    """A checkpoint at step 4 of 5 is not a finished old model: refused, or taken when allowed,
    and the model says which step it is."""
    state, _, cfg = trained_state(seed=2)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
    ckpt.save(4, state, {}, meta_of(cfg, total_steps=5))
    ckpt.close()
    with pytest.raises(ValueError, match=r'holds step 4 of 5.*allow_unfinished'):
        train.load(str(tmp_path), cfg, NUM_CLASSES, mesh_of(8), allow_unfinished=False)
    model = train.load(str(tmp_path), cfg, NUM_CLASSES, mesh_of(8), allow_unfinished=True)
    assert (model.step, model.total_steps) == (4, 5)


def damage(step_dir):
    """Corrupts a saved step the way a torn copy would: its weights' data files emptied. The
    step's digests are removed, as in a step written by an older bcl_jax: a step with digests
    stops on such damage instead (tests/test_integrity.py)."""
    os.remove(os.path.join(step_dir, checkpoint.DIGESTS))
    for root, _, files in os.walk(os.path.join(step_dir, 'weights')):
        for f in files:
            with open(os.path.join(root, f), 'w') as out:
                out.write('')


def test_a_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, caplog):
    directory = str(tmp_path / 'ckpt')
    cfg = model_cfg()
    states = {s: trained_state(seed=s)[0] for s in (1, 2)}
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None)
    for s, state in states.items():
        ckpt.save(s, state, {'position': s}, meta_of(cfg))
    ckpt.close()
    damage(os.path.join(directory, '2'))

    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None)
    template = template_like(states[1], NamedSharding(mesh_of(8), P()))
    with caplog.at_level('WARNING'):
        state, data_state, _, step_used = ckpt.restore_latest(template, meta_of(cfg))
    assert step_used == 1 and data_state == {'position': 1}
    assert_trees_equal(state['params'], states[1]['params'])
    assert 'step 2' in caplog.text and directory in caplog.text
    # The damaged step is kept aside, out of the way of the step that will be saved again.
    assert ckpt.latest_step() == 1
    assert os.path.isdir(directory + '-damaged/2')
    ckpt.save(2, states[2], {'position': 2}, meta_of(cfg))
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_a_damaged_given_model_uses_its_previous_step_without_touching_it(tmp_path, caplog):
    directory = str(tmp_path / 'old')
    cfg = model_cfg()
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=None)
    for s in (3, 5):
        ckpt.save(s, trained_state(seed=s)[0], {}, meta_of(cfg))
    ckpt.close()
    damage(os.path.join(directory, '5'))
    with caplog.at_level('WARNING'):
        model = train.load(directory, cfg, NUM_CLASSES, mesh_of(8))
    assert model.step == 3 and 'step 5' in caplog.text
    assert os.path.isdir(os.path.join(directory, '5'))  # read-only: left where it was


# --------------------------------------------------------------------------- mismatches


@pytest.fixture
def saved_model(tmp_path):
    state, _, cfg = trained_state(seed=3, steps=1)
    ckpt = checkpoint.Checkpointer(str(tmp_path / 'old'), max_to_keep=None)
    ckpt.save(1, state, {}, meta_of(cfg))
    ckpt.close()
    return str(tmp_path / 'old'), cfg


def test_load_refuses_another_architecture(saved_model):
    directory, cfg = saved_model
    other = model_cfg(arch='resnet18', width=8)
    with pytest.raises(ValueError) as err:
        train.load(directory, other, NUM_CLASSES, mesh_of(8))
    message = str(err.value)
    assert directory in message
    assert "model.arch: checkpoint has 'cifar_resnet', config says 'resnet18'" in message
    assert 'model.width: checkpoint has 4, config says 8' in message
    assert 'depth' not in message and 'embedding_dim' not in message


def test_load_refuses_another_embedding_size_and_class_count(saved_model):
    directory, cfg = saved_model
    with pytest.raises(ValueError) as err:
        train.load(directory, model_cfg(embedding_dim=32), NUM_CLASSES + 1, mesh_of(8))
    message = str(err.value)
    assert 'model.embedding_dim: checkpoint has 16, config says 32' in message
    assert f'num_classes: checkpoint has {NUM_CLASSES}, config says {NUM_CLASSES + 1}' in message
    assert 'width' not in message


def test_load_refuses_another_head(saved_model):
    directory, _ = saved_model
    with pytest.raises(
        ValueError, match="model.head: checkpoint has 'cosface', config says 'arcface'"
    ):
        train.load(directory, model_cfg(head='arcface'), NUM_CLASSES, mesh_of(8))


def test_load_of_a_missing_directory(tmp_path):
    missing = str(tmp_path / 'no' / 'such' / 'ckpt')
    with pytest.raises(FileNotFoundError, match='does not exist') as err:
        train.load(missing, model_cfg(), NUM_CLASSES, mesh_of(8))
    assert missing in str(err.value)
    assert not os.path.exists(missing)  # a read-only load creates nothing


def test_load_of_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint in') as err:
        train.load(str(tmp_path), model_cfg(), NUM_CLASSES, mesh_of(8))
    assert str(tmp_path) in str(err.value) and 'step folders' in str(err.value)


# --------------------------------------------------------------------------- another mesh


def test_restore_onto_a_different_mesh(tmp_path):
    state, _, cfg = trained_state(seed=4)
    mesh8, mesh1 = mesh_of(8), mesh_of(1)
    # One leaf sharded over the 8 devices, the rest replicated, as a sharded state would be.
    state['train_extra'] = np.arange(8 * 5, dtype=np.float32).reshape(8, 5)
    saved = jax.device_put(state, NamedSharding(mesh8, P()))
    saved['train_extra'] = jax.device_put(state['train_extra'], NamedSharding(mesh8, P('data')))
    assert len(saved['train_extra'].sharding.device_set) == 8
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
    ckpt.save(3, saved, {'k': 1}, meta_of(cfg))
    ckpt.close()

    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
    one = NamedSharding(mesh1, P())
    restored, data_state, _ = ckpt.restore(3, template_like(state, one), meta_of(cfg))
    ckpt.close()
    assert data_state == {'k': 1}
    assert_trees_equal(restored, state)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.device_set == {jax.devices()[0]}


def test_restore_from_one_device_onto_8_sharded(tmp_path):
    state, _, cfg = trained_state(seed=5, steps=1)
    state['train_extra'] = np.arange(16, dtype=np.float32).reshape(8, 2)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
    ckpt.save(1, jax.device_put(state, NamedSharding(mesh_of(1), P())), {}, meta_of(cfg))
    ckpt.close()
    template = template_like(state, NamedSharding(mesh_of(8), P()))
    template['train_extra'] = jax.device_put(
        np.zeros((8, 2), np.float32), NamedSharding(mesh_of(8), P('data'))
    )
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=None)
    restored, _, _ = ckpt.restore(1, template, meta_of(cfg))
    ckpt.close()
    assert_trees_equal(restored, state)
    extra = restored['train_extra']
    assert extra.sharding.is_equivalent_to(NamedSharding(mesh_of(8), P('data')), 2)
    assert [s.data.shape for s in extra.addressable_shards] == [(1, 2)] * 8


def test_an_async_checkpointer_silences_only_closed_loop_reports(tmp_path, monkeypatch):
    """Only 'Event loop is closed' from orbax's closed loop is left unsaid; any other unraisable
    error still reaches the hook that was there before."""
    seen = []
    monkeypatch.setattr(sys, 'unraisablehook', lambda u: seen.append(str(u.exc_value)))
    checkpoint.Checkpointer(str(tmp_path / 'ckpt'), max_to_keep=1, async_save=True).close()
    checkpoint.Checkpointer(str(tmp_path / 'ckpt2'), max_to_keep=1, async_save=True).close()

    class Report:  # what the interpreter hands sys.unraisablehook
        def __init__(self, message):
            self.exc_value = RuntimeError(message)

    for message in ('Event loop is closed', 'something else', 'Event loop is closed'):
        sys.unraisablehook(Report(message))
    assert seen == ['something else']
