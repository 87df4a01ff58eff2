"""Cross-test given models, trained here or anywhere: nothing is trained.

    python -m bcl_jax.crosstest --config=configs/synthetic.py --workdir=runs/cross \
        --model=old=runs/x/old/ckpt --model=bct=runs/x/new_bct/ckpt \
        --model=theirs=runs/embeddings/theirs

Each --model is NAME=PATH, in upgrade order (the first is the old model whose gallery the others
search): PATH is a bcl_jax checkpoint folder (a stage's ckpt/) or a folder of embedding files
(bcl_jax.export's format; a gallery embedded by any framework). A folder of files is checked
first: every file against the folder's manifest (written by bcl_jax.export) and each set's
digests, all sets from one model, and the ids and the label of every id against the dataset.
On the config's dataset, writes
results.json/md in the work directory as a run does: old/old, new/new and new/old against the
first model, the compatibility matrix of every pair, backfill curves and the figures.

Before the data is read the command checks that the work directory can be written, that each
PATH is a checkpoint or embedding files with their manifests, and that each checkpoint is
finished (`--allow_unfinished` accepts one short of its last step); an error in the inputs ends
it with one line naming the file.
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from bcl_jax import console, embedding_files, evaluate, export, sharding, train
from bcl_jax import data as data_lib
from bcl_jax import embed as embed_lib


def define_flags():
    """The command's flags (defined when it runs: other commands define --config too)."""
    config_flags.DEFINE_config_file('config', None, 'the experiment config (its dataset)')
    flags.DEFINE_string('workdir', None, 'where results.json, results.md and figures go')
    flags.DEFINE_multi_string('model', [], 'NAME=PATH: a checkpoint or embeddings folder')
    flags.DEFINE_bool('allow_unfinished', False, 'accept checkpoints short of their last step')
    flags.mark_flags_as_required(['config', 'workdir'])


class FileModel:
    """A model known only by its embeddings of the dataset's test sets (read from files)."""

    def __init__(self, directory: str, data):
        self.directory, self.seconds, self.step = directory, 0.0, None
        self.notes = {}  # nothing settled in training that results.json would record
        self.sets = {}
        folder = embedding_files.check_folder(directory)  # None: not written by bcl_jax.export
        identities = {}
        for name, source in export.sets(data):
            found = embedding_files.read_embeddings(
                directory, name, expected_ids=export.source_ids(source)
            )
            check_labels(found, source, f'embeddings {name!r} in {directory}')
            self.sets[name] = found.emb
            identities[name] = found.manifest.get('identity', {})
        first = next(iter(identities.values()))
        model = first if folder is None else folder.get('model', {})
        key = lambda i: i.get('weights', json.dumps(i, sort_keys=True))  # the model's digest
        mixed = {n: i.get('weights') for n, i in identities.items() if key(i) != key(model)}
        if mixed:
            raise ValueError(
                f'{directory} mixes embedding sets of different models: '
                + ', '.join(f'{n} (weights {w!r})' for n, w in mixed.items())
                + f' differ from {model.get("weights")!r}. Embed every set with one model, '
                'e.g. python -m bcl_jax.export into a new folder.'
            )
        self.dim, self.identity_of = found.emb.shape[1], model

    def identity(self) -> str:
        return str(self.identity_of.get('weights', self.directory))

    def embeddings(self, tests) -> list:
        g = lambda t: self.sets.get(f'{t.name}.gallery')
        return [(self.sets[f'{t.name}.query'], g(t)) for t in tests]


def check_labels(found, source, where: str):
    """The set's label of every id equals the dataset's (rows already in the dataset's order): a
    file whose ids were shuffled against its rows, or labels of another labelling, stops."""
    if found.labels is None:
        logging.warning('%s has no labels: its ids cannot be checked against its rows', where)
        return
    want = np.asarray(source.labels, np.int64)
    bad = np.flatnonzero(found.labels != want)
    if bad.size:
        shown = ', '.join(
            f'{found.ids[r]!r} (file {found.labels[r]}, dataset {want[r]})' for r in bad[:5]
        )
        raise ValueError(
            f'{where}: {bad.size} of {len(want)} ids have another label than in the dataset, '
            f'e.g. {shown}: the ids do not belong to their rows (shuffled?) or the set is of '
            'another dataset. Write the ids, rows and labels in one order, e.g. with '
            'python -m bcl_jax.export.'
        )


def parse(specs: list[str]) -> dict[str, str]:
    """{name: path} of NAME=PATH specs, in order; at least two models, names once each."""
    models = {}
    for spec in specs:
        name, sep, path = spec.partition('=')
        if not sep or not name or not path:
            raise ValueError(f'--model={spec!r}: give NAME=PATH')
        if name in models:
            raise ValueError(f'--model: the name {name!r} is given twice')
        models[name] = path
    if len(models) < 2:
        raise ValueError('crosstest needs at least two --model=NAME=PATH (the first is the old)')
    return models


def kind(path: str) -> str:
    """'checkpoint' (numbered step folders) or 'files' (embedding files with manifests), by what
    the folder holds; a ValueError naming the folder for anything else."""
    folder = epath.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f'--model path {path} is not a folder')
    names = [p.name for p in folder.iterdir()]
    if any(n.isdigit() and (folder / n).is_dir() for n in names):
        return 'checkpoint'
    arrays = sorted(n for n in names if n.endswith('.npy') and not n.endswith('.labels.npy'))
    manifests = {n.removesuffix('.json') for n in names if n.endswith('.json')}
    if arrays and manifests:
        return 'files'
    if arrays:
        raise ValueError(
            f'{path} holds embeddings ({", ".join(arrays[:3])}) but no manifests '
            '(<set>.json): embedding files need theirs (bcl_jax.embedding_files; '
            'bcl_jax.export writes them)'
        )
    raise ValueError(
        f'{path} is not a bcl_jax checkpoint folder (numbered step folders: give a stage\'s '
        'ckpt/ folder) nor a folder of embedding files (<set>.npy with its <set>.json manifest)'
    )


def load_checkpoints(paths: dict, mesh, *, allow_unfinished: bool = False) -> dict:
    """The checkpoints among `paths`, loaded (an unfinished one refused unless
    `allow_unfinished`), after every folder is known to be a checkpoint or embedding files."""
    kinds = {name: kind(path) for name, path in paths.items()}
    return {
        name: train.load_checkpoint(path, mesh, allow_unfinished=allow_unfinished)
        for name, path in paths.items()
        if kinds[name] == 'checkpoint'
    }


def load(paths: dict, data, mesh, *, allow_unfinished: bool = False, checkpoints=None):
    """Every model: a checkpoint (loaded; an unfinished one refused unless `allow_unfinished`)
    or embedding files (read and checked), by what the folder holds; the embedding dimensions
    must agree before anything is embedded."""
    if checkpoints is None:
        checkpoints = load_checkpoints(paths, mesh, allow_unfinished=allow_unfinished)
    models = {
        name: checkpoints[name] if name in checkpoints else FileModel(path, data)
        for name, path in paths.items()
    }
    dims = {
        n: m.dim if isinstance(m, FileModel) else m.model_cfg.embedding_dim
        for n, m in models.items()
    }
    if len(set(dims.values())) > 1:
        raise ValueError(
            f'the models embed in different dimensions {dims}: they cannot search each other'
        )
    return models


def run(config, paths: dict, workdir: str, *, allow_unfinished: bool = False) -> dict:
    """Scores the models of `paths` ({name: folder}); the work directory and every folder are
    checked (writable; a checkpoint or embedding files; checkpoints finished) before the data is
    read or anything embedded."""
    start = time.time()
    console.check_writable(workdir, '--workdir')
    mesh = sharding.make_mesh(config.mesh)
    with console.input_errors():
        checkpoints = load_checkpoints(paths, mesh, allow_unfinished=allow_unfinished)
        data = data_lib.build(config.data)
        models = load(paths, data, mesh, checkpoints=checkpoints)
    (first, old), *new = models.items()
    embeddings = {
        name: m.embeddings(data.tests)
        if isinstance(m, FileModel)
        else embed_lib.embed_tests(
            m, data.tests, mesh=mesh, batch_size=config.eval.batch_size, name=name
        )
        for name, m in models.items()
    }
    results = evaluate.score(embeddings, dict(new), data, eval_cfg=config.eval, old_name=first)
    results.update(
        benchmark=data.description,
        models={
            n: (m.identity() if isinstance(m, FileModel) else evaluate.describe_model(m, paths[n]))
            for n, m in models.items()
        },
        machine=evaluate.machine(),
        wall_seconds=time.time() - start,
        config=json.loads(config.to_json()),
    )
    evaluate.write_results(results, workdir)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    console.quiet_logging()
    console.use_compile_cache()
    f = flags.FLAGS
    with console.exit_on_input_error():  # a bad input: one line naming the file
        run(f.config, parse(f.model), f.workdir, allow_unfinished=f.allow_unfinished)


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
