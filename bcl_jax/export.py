"""Export a model's embeddings of a dataset's retrieval tests, as files any framework can read.

    python -m bcl_jax.export --config=configs/synthetic.py --checkpoint=runs/x/old/ckpt \
        --out=runs/x/embeddings/old

For each retrieval test of the config's dataset, `<test>.query` and `<test>.gallery` (no
gallery for a test whose query set is its own gallery) in bcl_jax.embedding_files' format:
float32 .npy rows, the image ids, the labels, and a manifest naming the model (weights digest,
architecture, checkpoint, step). `python -m bcl_jax.crosstest` scores such folders, from this
command or from a model of any other framework, against bcl_jax models.

`--format=stablehlo|onnx|torch` writes the model itself instead, for serving (bcl_jax.serving).
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from bcl_jax import console, embedding_files, evaluate, sharding, train
from bcl_jax import data as data_lib


def define_flags():
    """The command's flags (defined when it runs: other commands define --config too)."""
    config_flags.DEFINE_config_file('config', None, 'the experiment config (its dataset)')
    flags.DEFINE_string('checkpoint', None, "a stage's checkpoint folder (…/ckpt)")
    flags.DEFINE_string('out', None, 'the folder to write the embedding files to')
    flags.DEFINE_enum(
        'format',
        'embeddings',
        ['embeddings', 'stablehlo', 'onnx', 'torch'],
        "embeddings: the dataset's embedding files; stablehlo, onnx, torch: the model for "
        'serving (image batch in, embeddings out) and its manifest.json (bcl_jax.serving)',
    )
    flags.mark_flags_as_required(['config', 'checkpoint', 'out'])


def source_ids(source) -> list[str]:
    """A source's image ids (file ids or relative paths), else its row numbers."""
    ids = getattr(source, 'ids', None)
    return [str(i) for i in (ids if ids is not None else range(len(source)))]


def sets(data):
    """(file name, source) of every embedding set of the dataset's tests."""
    for test in data.tests:
        yield f'{test.name}.query', test.query
        if test.gallery is not None:
            yield f'{test.name}.gallery', test.gallery


def export(config, checkpoint_dir: str, out: str) -> dict:
    """Writes the embedding files; returns the model's identity as written in the manifests."""
    mesh = sharding.make_mesh(config.mesh)
    data = data_lib.build(config.data)
    model = train.load_checkpoint(checkpoint_dir, mesh)
    identity = dict(
        framework='bcl_jax',
        weights=model.identity(),
        model=model.describe(),
        checkpoint=checkpoint_dir,
        step=model.step,
    )
    for name, source in sets(data):
        emb = evaluate.embed(model, source, mesh=mesh, batch_size=config.eval.batch_size, what=name)
        if jax.process_index() == 0:
            labels = np.asarray(source.labels)
            embedding_files.write_embeddings(
                out, name, emb, ids=source_ids(source), labels=labels, identity=identity
            )
        logging.info('%s: %d embeddings of %d dimensions -> %s', name, *emb.shape, out)
    return identity


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    console.quiet_logging()
    console.use_compile_cache()
    f = flags.FLAGS
    if f.format != 'embeddings':
        from bcl_jax import serving

        serving.export(f.config, f.checkpoint, f.out, f.format)
        return
    export(f.config, f.checkpoint, f.out)


if __name__ == '__main__':
    define_flags()
    app.run(main)
