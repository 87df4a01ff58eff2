"""Export a model's embeddings of a dataset's retrieval tests, as files any framework can read.

    python -m bcl_jax.export --config=configs/synthetic.py --checkpoint=runs/x/old/ckpt \
        --out=runs/x/embeddings/old [--sets=all]

For each retrieval test of the config's dataset, `<test>.query` and `<test>.gallery` (no
gallery for a test whose query set is its own gallery) and, with `--sets=all`, `train` (the new
training set: what `old.embeddings` needs of an old model, bcl_jax.old_embeddings), in
bcl_jax.embedding_files' format:
float32 .npy rows, the image ids, the labels, and a manifest naming the model (weights digest,
architecture, checkpoint, step). The folder is one unit: written under a temporary name and
renamed into place whole, with `manifest.json` naming every file with its sha256 and the model's
weights digest. `python -m bcl_jax.crosstest` scores such folders, from this command or from a
model of any other framework, against bcl_jax models, and refuses a folder whose files differ
from its manifest.

Before any work the command checks that `--out` can be written and that the checkpoint is
finished (`--allow_unfinished` accepts one short of its last step); an error in the inputs ends
it with one line naming the file.

`--format=stablehlo|onnx|torch` writes the model itself instead, for serving (bcl_jax.serving).
"""

from __future__ import annotations

import os
import shutil
import uuid

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from bcl_jax import console, embedding_files, serving, sharding, train
from bcl_jax import data as data_lib
from bcl_jax import embed as embed_lib
from bcl_jax.data import storage
from bcl_jax.old_embeddings import TRAIN_SET, set_names, source_ids  # noqa: F401 (crosstest)


def define_flags():
    """The command's flags (defined when it runs: other commands define --config too)."""
    config_flags.DEFINE_config_file('config', None, 'the experiment config (its dataset)')
    flags.DEFINE_string('checkpoint', None, "a stage's checkpoint folder (…/ckpt)")
    flags.DEFINE_string('out', None, 'the folder to write the embedding files to')
    flags.DEFINE_enum(
        'sets', 'tests', ['tests', 'all'], "the tests' sets, or all: the training set too"
    )
    flags.DEFINE_bool('allow_unfinished', False, 'accept a checkpoint short of its last step')
    flags.DEFINE_enum(
        'format',
        'embeddings',
        ['embeddings', 'stablehlo', 'onnx', 'torch'],
        "embeddings: the dataset's embedding files; stablehlo, onnx, torch: the model for "
        'serving (image batch in, embeddings out) and its manifest.json (bcl_jax.serving)',
    )
    flags.mark_flags_as_required(['config', 'checkpoint', 'out'])


def sets(data):
    """(file name, source) of every embedding set of the dataset's tests."""
    return [(name, source) for name, source in set_names(data) if name != TRAIN_SET]


def export(
    config, checkpoint_dir: str, out: str, *, which: str = 'tests', allow_unfinished: bool = False
) -> dict:
    """Writes the embedding files of the tests' sets (`which='all'`: and of the training set);
    returns the model's identity as written in the manifests. Before any work: `out` must be
    writable, and the checkpoint finished (unless `allow_unfinished`)."""
    console.check_writable(out, '--out')
    mesh = sharding.make_mesh(config.mesh)
    with console.input_errors():
        model = train.load_checkpoint(checkpoint_dir, mesh, allow_unfinished=allow_unfinished)
        data = data_lib.build(config.data)
    identity = embedding_files.model_identity(model, checkpoint_dir)
    out = storage.absolute(out)
    # A local folder is written whole under a temporary name, then renamed into place; on an
    # object store (no folder renames) the files are written in place, the manifest last.
    local = storage.is_local(out)
    target = f'{out.rstrip("/")}.tmp-{uuid.uuid4().hex}' if local else out
    try:
        for name, source in set_names(data) if which == 'all' else sets(data):
            emb = embed_lib.embed(
                model, source, mesh=mesh, batch_size=config.eval.batch_size, what=name
            )
            if jax.process_index() == 0:
                labels = np.asarray(source.labels)
                embedding_files.write_embeddings(
                    target, name, emb, ids=source_ids(source), labels=labels, identity=identity
                )
            logging.info('%s: %d embeddings of %d dimensions -> %s', name, *emb.shape, out)
        if jax.process_index() == 0:
            embedding_files.write_folder_manifest(target, identity)
            if local:
                _replace_folder(target, out)
    except BaseException:
        if local and jax.process_index() == 0:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return identity


def _replace_folder(new: str, out: str):
    """Puts the folder `new` at `out`: a folder already there (an earlier export) is renamed
    away first and removed after, so `out` holds one export whole, never a mix of two."""
    old = None
    if os.path.lexists(out):
        old = f'{out.rstrip("/")}.replaced-{uuid.uuid4().hex}'
        os.rename(out, old)
    os.rename(new, out)
    if old is not None:
        shutil.rmtree(old)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    console.quiet_logging()
    console.use_compile_cache()
    f = flags.FLAGS
    with console.exit_on_input_error():  # a bad input: one line naming the file
        if f.format == 'embeddings':
            export(f.config, f.checkpoint, f.out, which=f.sets, allow_unfinished=f.allow_unfinished)
        else:
            serving.export(f.config, f.checkpoint, f.out, f.format)


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
