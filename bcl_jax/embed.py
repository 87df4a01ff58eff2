"""A model's embeddings of a dataset: batch by batch on the mesh (`embed_batches`), or gathered
on every host (`embed`, `embed_tests`). A model is a `stage.Trained` or the old model's embedding
files (`old_embeddings.GivenEmbeddings`)."""

from __future__ import annotations

import time

import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from bcl_jax.data import pipeline
from bcl_jax.old_embeddings import GivenEmbeddings


def embed_batches(model, source, *, mesh, batch_size: int):
    """Yields (embeddings, labels, valid) global arrays, batch by batch, sharded over the mesh."""
    if isinstance(model, GivenEmbeddings):  # an old model known by its embedding files
        yield from model.batches(source, mesh=mesh, batch_size=batch_size)
        return
    embed_fn = model.embed_fn(mesh)
    for batch, valid in pipeline.eval_batches(source, global_batch=batch_size):
        batch = pipeline.to_global(dict(batch, valid=valid), mesh)
        yield (
            embed_fn(model.params, model.batch_stats, batch['image']),
            batch['label'],
            batch['valid'],
        )


def embed(model, source, *, mesh, batch_size: int, what: str = '') -> np.ndarray:
    """(N, D) float32 embeddings of the whole source, in order, on every host. With `what`, a
    progress line with the rate and the ETA about every 30 s (a GLDv2 index takes a while)."""
    chunks, done, start, shown = [], 0, time.time(), time.time()
    for emb, _, valid in embed_batches(model, source, mesh=mesh, batch_size=batch_size):
        emb, valid = multihost_utils.process_allgather((emb, valid), tiled=True)
        chunks.append(np.asarray(emb)[np.asarray(valid)])
        done += len(chunks[-1])
        if what and time.time() - shown > 30:
            shown, rate = time.time(), done / (time.time() - start)
            eta = (len(source) - done) / max(rate, 1e-9)
            logging.info(
                'embedding %s: %d/%d images, %.0f/s, ETA %ds', what, done, len(source), rate, eta
            )
    return np.concatenate(chunks)


def embed_tests(model, tests, *, mesh, batch_size: int, name: str = '') -> list:
    """A model's (query, gallery or None) embeddings for each test (None: the query set is the
    gallery)."""
    emb = lambda s, what: embed(model, s, mesh=mesh, batch_size=batch_size, what=f'{name} {what}')
    return [
        (
            emb(t.query, f'{t.name} queries'),
            None if t.gallery is None else emb(t.gallery, f'{t.name} gallery'),
        )
        for t in tests
    ]
