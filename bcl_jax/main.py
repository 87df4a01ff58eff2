"""bcl_jax entry point: python -m bcl_jax.main --config=configs/<experiment>.py --workdir=DIR

Runs the stages of a backward-compatible upgrade: train (or load) the old model, compute the old
prototypes, train each new model of `config.methods` against them, evaluate old/old, new/new and
new/old, and write results.json and results.md. Every stage resumes or is skipped when the
command is rerun; a stage trained under other settings stops the run (bcl_jax.fingerprint).
The stages, their settings and references come from the run's plan (bcl_jax.plan).
"""

from __future__ import annotations

import time

_IMPORTS_START = time.time()  # the profile's first part: importing bcl_jax and its libraries

import json
import os
import sys

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from bcl_jax import checkpoint, console, evaluate, sharding, stats, train, validate
from bcl_jax import data as data_lib
from bcl_jax import plan as plan_lib
from bcl_jax.console import quiet_logging  # noqa: F401 (notebooks call main.quiet_logging)
from bcl_jax.errors import ChangedConfigError, ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'experiment config file', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for everything the run writes')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'multi-host: see launch/README.md')
_FROM_RESULTS = flags.DEFINE_bool(
    'from_results',
    False,
    "with config.seeds: aggregate the seeds' results.json already in the workdir (each seed run "
    'by its own command, here or elsewhere); trains and evaluates nothing',
)


SMOKE_NOTE = (
    'smoke run: the pipeline shrunk to seconds to check that it runs; its numbers mean nothing '
    '(a few steps of tiny models: the old model may collapse, new/new may equal new/old)'
)


def run(config, workdir: str, *, from_results: bool = False) -> dict:
    """One run, or with `config.seeds` one run per seed (DIR/seed_<s>), aggregated and paired.

    `from_results`: aggregate the seeds' results.json files already in DIR (written by each
    seed's own command, on this machine or another) and train and evaluate nothing; each must
    hold this config with its seed."""
    validate.check_config(config)  # before anything trains: a typo must not cost an old model
    console.use_compile_cache()  # a rerun or another seed loads what an earlier one compiled
    if not config.seeds:
        if from_results:
            raise ConfigError('seeds', (), 'the seeds whose results.json to aggregate')
        return run_one(config, workdir)
    start, per_seed = time.time(), []
    for seed in config.seeds:
        seeded = config.copy_and_resolve_references()
        seeded.seed, seeded.seeds = seed, ()
        seed_dir = os.path.join(workdir, f'seed_{seed}')
        if from_results:
            per_seed.append(seed_results(seeded, seed_dir))
        else:
            per_seed.append(run_one(seeded, seed_dir))
    results = evaluate.aggregate(per_seed)
    if stats.strength_arms(results['methods']):  # method.md §11's selection phase
        results['selection'] = stats.select_strength(per_seed, results['paired'])
    if config.get('primary'):  # a confirmatory run's pre-registered arms (method.md §11)
        results['confirmation'] = stats.confirmatory(results['paired'], config.primary)
    if config.get('selected_by'):  # and the selection that chose their settings
        with open(config.selected_by) as f:
            results['selection'] = json.load(f)['selection']
    results.update(wall_seconds=time.time() - start, config=json.loads(config.to_json()))
    evaluate.write_results(results, workdir)
    return results


def seed_results(config, seed_dir: str) -> dict:
    """The results.json of one seed's finished run, which must have been made with `config`:
    a field whose value differs stops; a field only one side has (added to bcl_jax since, or
    removed) is named in a warning."""
    path = os.path.join(seed_dir, 'results.json')
    if not epath.Path(path).exists():
        raise FileNotFoundError(f'{path} not found: run that seed first (--config.seeds="(S,)")')
    results = json.loads(epath.Path(path).read_text())
    saved, wanted = _flat(results.get('config') or {}), _flat(json.loads(config.to_json()))
    shared = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
    changed = [f'{k}: {saved[k]!r} -> {wanted[k]!r}' for k in shared if not _is_location(k)]
    if changed or not saved:
        raise ChangedConfigError(
            f'{path} was made with other settings: {"; ".join(changed) or "(none saved)"}'
        )
    moved = [k for k in shared if _is_location(k)]
    one_side = sorted(saved.keys() ^ wanted.keys())
    if moved or one_side:
        logging.warning(
            '%s: other locations %s (another machine or folder); fields only one side has '
            '(bcl_jax versions): %s',
            path,
            moved,
            one_side,
        )
    return results


def _is_location(field: str) -> bool:
    """A field that says where something lies (data, a given model, phase 1's results), which
    differs between machines, not what it is."""
    return field == 'selected_by' or field.endswith(
        ('.root', '_dir', '.prepared', '.checkpoint', '.embeddings')
    )


def _flat(tree: dict, prefix: str = '') -> dict:
    """A nested config dict as {'a.b.c': value}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f'{prefix}{k}.'))
        else:
            out[prefix + k] = v
    return out


def run_one(config, workdir: str) -> dict:
    start = time.time()
    # A fresh profile for this run (a notebook or a test may have trained before), from imports.
    imports = console.take_profile().get('start-up (imports)')
    if imports is not None:
        console.add_time('start-up (imports)', imports)
    if config.smoke:
        logging.warning('%s', SMOKE_NOTE)
    mesh = sharding.make_mesh(config.mesh)
    logging.info('bcl_jax: %s', sharding.describe(mesh))
    with console.timed('data'), console.input_errors():
        data = data_lib.build(config.data, workdir=workdir)
    logging.info('data: %s', evaluate.describe_data(data))
    plan = validate.check_run(config, data)  # the stages of this run, resolved once
    # config.json: the settings of the models in the work directory. Written once every setting
    # is known to work; over an earlier run's only once the stages are trained, so that a rerun
    # refused for changed settings (bcl_jax.fingerprint) leaves it as it was.
    config_json = os.path.join(workdir, 'config.json')
    if not epath.Path(config_json).exists():
        _write_config(config, config_json)

    # 1. The old model: given, or trained on the old split.
    old = plan_lib.old_model(plan, mesh=mesh, workdir=workdir)
    chain_models = {up.name: up.method for up in plan.upgrades}
    if config.old.checkpoint:  # the given model matches config.old.model: now its dim is known
        validate.check_dims(plan.methods, chain_models, config.old.model.embedding_dim)
    elif config.old.embeddings:  # the old model's files: their dim
        files = f'the dim of the files in {config.old.embeddings}'
        validate.check_dims(plan.methods, chain_models, old.dim, files)

    # 2. Old prototypes of every class of the new training set: what new models align to.
    with console.timed('old prototypes'):
        reference = plan_lib.reference(plan, old, mesh=mesh, workdir=workdir)

    # 3. New models, one per method, all from the same initialisation and data order; then the
    # sequential upgrades (config.upgrades), each trained against the model before it.
    where = dict(mesh=mesh, workdir=workdir)
    new_models, orders = {}, {}
    for name, method in plan.methods.items():
        stage = plan_lib.new_stage(plan, name, reference)
        new_models[name] = train.train(stage, reference, plan.loop, **where)
        orders[name] = method.backfill_order
    chain, before = {}, None  # the upgrade before the next one (None: the old model)
    for up in plan.upgrades:
        model_before = old if before is None else chain[before.name]
        up_reference = plan_lib.upgrade_reference(plan, up, before, model_before, **where)
        stage = plan_lib.upgrade_stage(plan, up, up_reference)
        chain[up.name] = train.train(stage, up_reference, plan.loop, **where)
        before = up
    _write_config(config, config_json)  # every stage now holds a model of these settings

    # 4. Retrieval tests, the compatibility matrix, backfill curves and the results files.
    orders = {k: v for k, v in orders.items() if v is not None}
    predecessors = dict(zip(chain, ['old', *chain]))
    kw = dict(mesh=mesh, eval_cfg=config.eval, predecessors=predecessors, orders=orders)
    with console.timed('evaluation'):
        results = evaluate.evaluate(old, {**new_models, **chain}, data, **kw)
    if config.smoke:
        results['note'] = SMOKE_NOTE
    results.update(
        benchmark=data.description,
        data=dict(
            fingerprint=data.fingerprint,
            skipped=list(data.skipped),
            validation_classes=list(data.validation_classes),
        ),
        old_model=evaluate.describe_model(old, config.old.checkpoint),  # or its embeddings
        upgrades=list(chain),
        machine=evaluate.machine(),
        wall_seconds=time.time() - start,
        profile=console.take_profile(),  # seconds per part, up to here (bcl_jax.console)
        config=json.loads(config.to_json()),
    )
    with console.timed('results and figures'):
        evaluate.write_results(results, workdir)
    profile = dict(results['profile'], **console.take_profile())
    total = time.time() - start + profile.get('start-up (imports)', 0.0)
    logging.info('where the time went (%.1f s):\n%s', total, console.profile_table(profile, total))
    return results


def _write_config(config, path: str):
    if jax.process_index() == 0:
        checkpoint.write_atomic(path, config.to_json(indent=1))


parse_flags = console.parse_flags  # a config error (unknown field, wrong type) in one line


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    quiet_logging()
    if _DISTRIBUTED.value:
        sharding.initialize_distributed()
    console.add_time('start-up (imports)', time.time() - _IMPORTS_START)
    try:
        with console.exit_on_input_error():  # a data error: one line naming the file
            run(_CONFIG.value, _WORKDIR.value, from_results=_FROM_RESULTS.value)
    except (ConfigError, ChangedConfigError, checkpoint.DamagedError) as e:
        sys.exit(f'bcl_jax: {e}')


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main, flags_parser=parse_flags)
