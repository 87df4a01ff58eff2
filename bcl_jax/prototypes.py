"""Class-mean prototype banks (method.md §2): computed by segment sums, stored, reused.

A prototype is the L2-normalised mean of a class's L2-normalised embeddings. The old bank is
computed once with the frozen old model over the new training set and stored in the work
directory as `.npy` beside a JSON file naming the old model's weights, the data and the sha256
of the file's bytes; a rerun reuses it, a different old model or other data recomputes it, and
a file whose bytes differ from its digest stops (restore it, or recompute it with
--config.on_change=retrain).
"""

from __future__ import annotations

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import checkpoint, class_stats, sharding
from bcl_jax.data import storage
from bcl_jax.embed import embed_batches


@jax.jit(static_argnames=('num_classes', 'mesh'))
def class_sums(emb, labels, valid, *, num_classes: int, mesh=None):
    """Per-class sums of embeddings and counts; rows with valid=False are ignored.

    With `mesh`, the sums and counts are sharded by class over its 'data' axis (`num_classes`
    then a multiple of its size): each device adds the batch into its own classes.
    """
    w = valid.astype(emb.dtype)
    sums = jax.ops.segment_sum(emb * w[:, None], labels, num_segments=num_classes)
    counts = jax.ops.segment_sum(w, labels, num_segments=num_classes)
    if mesh is not None:
        sums = jax.lax.with_sharding_constraint(sums, NamedSharding(mesh, P(sharding.AXIS, None)))
        counts = jax.lax.with_sharding_constraint(counts, NamedSharding(mesh, P(sharding.AXIS)))
    return sums, counts


def ema_class_means(bank, emb, labels, *, decay: float):
    """One EMA update of per-class means: bank_c <- decay·bank_c + (1 − decay)·mean of the batch's
    class-c embeddings, for the classes in the batch; absent classes keep their value.

    On a bank sharded by class, the segment sums are a scatter-add of the (gathered, (B, D))
    batch into each device's own classes; nothing (C, D)-sized moves between devices."""
    num_classes = bank.shape[0]
    sums = jax.ops.segment_sum(emb, labels, num_segments=num_classes)
    counts = jax.ops.segment_sum(jnp.ones_like(labels, emb.dtype), labels, num_segments=num_classes)
    means = sums / jnp.maximum(counts, 1)[:, None]
    return jnp.where(counts[:, None] > 0, decay * bank + (1 - decay) * means, bank)


def class_means(sums, counts, *, what: str = 'prototype bank'):
    """Normalised class means; a class without a single image is an error that names it."""
    counts = np.asarray(counts)
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0)[:10].tolist()
        raise ValueError(f'{what}: classes {empty} have no images, so they have no prototype')
    means = np.asarray(sums) / counts[:, None]
    return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)


def compute(
    model, source, *, num_classes: int, mesh, batch_size: int, shard_classes: bool = False
) -> np.ndarray:
    """The (C, D) prototype bank of `model` over `source`, one pass, sums kept on device (sharded
    by class over `mesh` with `shard_classes`, the class axis padded as bcl_jax.sharding says)."""
    rows = sharding.padded(num_classes, sharding.class_multiple(mesh, shard_classes))
    sums = counts = 0
    for emb, labels, valid in embed_batches(model, source, mesh=mesh, batch_size=batch_size):
        s, c = class_sums(
            emb, labels, valid, num_classes=rows, mesh=mesh if shard_classes else None
        )
        sums, counts = sums + s, counts + c
    return class_means(sharding.to_host(sums)[:num_classes], sharding.to_host(counts)[:num_classes])


BANK_REMEDY = (
    'Restore it from a copy, or delete it and its .json to compute it anew from the old model '
    '(or rerun with --config.on_change=retrain, which does that).'
)


def _load(path: str, identity: dict, valid, retrain: bool = False) -> np.ndarray | dict | None:
    """What `path` holds if its sidecar names `identity`, the file is whole and `valid(value)`;
    else None (then it is computed anew). A file whose bytes differ from the digest in its
    sidecar stops with `storage.DamagedError` (with `retrain`: is reported and recomputed);
    a sidecar without a digest (an older bcl_jax) is trusted, with a warning."""
    try:
        saved = json.loads(epath.Path(path + '.json').read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logging.warning('%s.json is damaged (%s); recomputing', path, e)
        return None
    recorded = saved.pop(storage.DIGEST, None) if isinstance(saved, dict) else None
    if saved != identity:
        logging.info('%s was made by another old model or data; recomputing', path)
        return None
    try:
        data = epath.Path(path).read_bytes()
    except OSError as e:
        logging.warning('%s cannot be read (%s); recomputing', path, e)
        return None
    if recorded is None:
        logging.warning('%s has no content digest (written by an older bcl_jax): not checked', path)
    else:
        try:
            storage.check_digest(path, storage.bytes_digest(data), recorded, remedy=BANK_REMEDY)
        except storage.DamagedError:
            if not retrain:
                raise
            logging.warning('%s is damaged (differs from its digest); recomputing it', path)
            return None
    try:
        value = np.load(io.BytesIO(data))
        value = dict(value) if isinstance(value, np.lib.npyio.NpzFile) else value
    except (OSError, ValueError, EOFError) as e:
        logging.warning('%s is damaged (%s); recomputing', path, e)
        return None
    if not valid(value):
        logging.warning(
            '%s holds arrays of the wrong shape or non-finite values; recomputing', path
        )
        return None
    logging.info('reusing %s', path)
    return value


def _cached(path: str, identity: dict, compute, valid, retrain: bool = False):
    """`compute()` (an array, or a dict of arrays), stored at `path` beside a sidecar naming
    `identity` and the sha256 of the file's bytes (written atomically by process 0: the old
    sidecar removed first, the new one written last), and reused while it is current and whole."""
    value = _load(path, identity, valid, retrain)
    if value is not None:
        return value
    value = compute()
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.savez(buf, **value) if isinstance(value, dict) else np.save(buf, value)
        data = buf.getvalue()
        epath.Path(path + '.json').unlink(missing_ok=True)  # never a sidecar of other bytes
        checkpoint.write_atomic(path, data)
        record = dict(identity, **{storage.DIGEST: storage.bytes_digest(data)})
        checkpoint.write_atomic(path + '.json', json.dumps(record, indent=1))
    return value


def old_bank(
    old,
    source,
    *,
    num_classes: int,
    workdir: str,
    mesh,
    batch_size: int,
    data_identity: str,
    name: str = 'old',
    retrain: bool = False,
):
    """The old prototypes over the new training set, from the work directory when current
    (`prototypes/<name>.npy`).

    The bank is stored with the old model's weight digest and `data_identity` (what the
    training data is): another old model or other data recomputes it. A file whose bytes differ
    from the digest stored with it stops (`storage.DamagedError`); with `retrain` (the run's
    on_change='retrain') it is recomputed.
    """
    path = os.path.join(workdir, 'prototypes', f'{name}.npy')
    identity = dict(
        old_model=old.identity(),
        data=data_identity,
        num_classes=num_classes,
        num_images=len(source),
    )
    bank = _cached(
        path,
        identity,
        lambda: compute(old, source, num_classes=num_classes, mesh=mesh, batch_size=batch_size),
        valid=lambda b: b.shape[0] == num_classes and b.ndim == 2 and np.isfinite(b).all(),
        retrain=retrain,
    )
    logging.info('old prototypes: %d classes x %d dims (%s)', *bank.shape, path)
    return bank


def class_statistics(old, source, bank, old_label, *, mesh, batch_size: int) -> dict:
    """Per-class statistics of the old model's embeddings around its prototypes (LCE, AdvBCT).

    Over the images of `source` whose class the old model saw (`old_label >= 0`): for a class
    split, exactly the old model's training set. Returns (C,) arrays: `centre_norms` m_c (the
    norm of the mean of the class's unit old embeddings; the centre is m_c·p_c), `max_angle`
    and `max_distance` (the largest angle to p_c and distance to m_c·p_c after the 1.5·IQR
    outlier rule, bcl_jax.methods.class_stats.class_radii) and `kept` (radii kept; the references use a
    class's statistics when kept >= 2). Classes the old model never saw get zeros. And
    `mean_norms`, m_c over every image of every class (NDPP/ODPP's
    `perturb.prototype_norm='mean'`: negatives as unnormalised class means m_c·p_c).
    """
    c = len(old_label)
    sums = counts = all_sums = all_counts = 0
    batches = []
    for emb, labels, valid in embed_batches(old, source, mesh=mesh, batch_size=batch_size):
        emb, labels, valid = (sharding.to_host(x) for x in (emb, labels, valid))
        s, n = class_sums(emb, labels, valid, num_classes=c)
        all_sums, all_counts = all_sums + s, all_counts + n
        valid = valid & (old_label[labels] >= 0)
        s, n = class_sums(emb, labels, valid, num_classes=c)
        sums, counts = sums + s, counts + n
        batches.append((emb[valid], labels[valid]))
    _, norms = class_stats.class_centres(np.asarray(sums), np.asarray(counts))
    _, mean_norms = class_stats.class_centres(np.asarray(all_sums), np.asarray(all_counts))
    emb = np.concatenate([e for e, _ in batches])
    labels = np.concatenate([l for _, l in batches])
    out = dict(
        centre_norms=np.asarray(norms, np.float32), mean_norms=np.asarray(mean_norms, np.float32)
    )
    for name, metric in (('max_angle', 'angle'), ('max_distance', 'distance')):
        radii = class_stats.sample_radii(emb, labels, bank, norms, metric=metric)
        radius, kept = class_stats.class_radii(radii, labels, num_classes=c)
        out[name] = np.asarray(radius, np.float32)
    out['kept'] = np.asarray(kept, np.int32)
    return out


def old_class_statistics(
    old,
    source,
    bank,
    old_label,
    *,
    workdir,
    mesh,
    batch_size,
    data_identity,
    name: str = 'old',
    retrain=False,
):
    """`class_statistics`, stored beside the old bank (`prototypes/<name>_stats.npz`) and
    reused like it."""
    path = os.path.join(workdir, 'prototypes', f'{name}_stats.npz')
    identity = dict(old_model=old.identity(), data=data_identity, num_classes=len(old_label))
    return _cached(
        path,
        identity,
        lambda: class_statistics(old, source, bank, old_label, mesh=mesh, batch_size=batch_size),
        valid=lambda d: 'mean_norms' in d and all(v.shape == (len(old_label),) for v in d.values()),
        retrain=retrain,
    )
