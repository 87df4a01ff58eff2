"""bcl_jax entry point: python -m bcl_jax.main --config=configs/<experiment>.py --workdir=DIR

Runs the stages of a backward-compatible upgrade: train (or load) the old model, compute the old
prototypes, train each new model of `config.methods`, evaluate old/old, new/new and new/old, and
write results.json and results.md. Every stage resumes or is skipped when the command is rerun.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from bcl_jax import checkpoint, evaluate, prototypes, train
from bcl_jax import data as data_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'experiment config file', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for everything the run writes')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed',
    False,
    'multi-host: call jax.distributed.initialize() first (Cloud TPU slices and SLURM are '
    'detected; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)',
)


def initialize_distributed():
    """Joins the hosts of a multi-host run, or says what is missing."""
    env = {k: os.environ.get(f'JAX_{k.upper()}') for k in ('num_processes', 'process_id')}
    try:
        jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v is not None})
    except ValueError as e:  # jax found no cluster and no coordinator address
        raise SystemExit(
            f'--distributed: no multi-host coordinator found ({e}). Launch on a Cloud TPU slice '
            'or under SLURM (see launch/), or set JAX_COORDINATOR_ADDRESS=host:port, '
            'JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host; drop --distributed on one host.'
        ) from e


def run(config, workdir: str) -> dict:
    """One run, or with `config.seeds` one run per seed (DIR/seed_<s>) and their mean ± std."""
    train.check_config(config)  # before anything trains: a typo must not cost an old model
    if not config.seeds:
        return run_one(config, workdir)
    start, per_seed = time.time(), []
    for seed in config.seeds:
        seeded = config.copy_and_resolve_references()
        seeded.seed, seeded.seeds = seed, ()
        per_seed.append(run_one(seeded, os.path.join(workdir, f'seed_{seed}')))
    results = evaluate.aggregate(per_seed)
    results.update(
        benchmark=per_seed[0]['benchmark'],
        seeds=list(config.seeds),
        machine=per_seed[0]['machine'],
        wall_seconds=time.time() - start,
        config=json.loads(config.to_json()),
    )
    _write_results(results, workdir)
    return results


def _write_results(results: dict, workdir: str):
    table = evaluate.markdown(results)
    if jax.process_index() == 0:
        checkpoint.write_atomic(
            os.path.join(workdir, 'results.json'), json.dumps(results, indent=1, allow_nan=False)
        )
        checkpoint.write_atomic(os.path.join(workdir, 'results.md'), table)
    print(table, flush=True)


def run_one(config, workdir: str) -> dict:
    start = time.time()
    mesh = train.make_mesh(config.mesh)
    logging.info(
        'bcl_jax: %d process(es), %d device(s) (%s), mesh %s',
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        dict(mesh.shape),
    )
    if jax.process_index() == 0:
        checkpoint.write_atomic(os.path.join(workdir, 'config.json'), config.to_json(indent=1))
    data = data_lib.build(config.data, workdir=workdir)
    logging.info(
        'data: %s: %d classes, %d training images (old model: %d classes, %d images); tests: %s',
        data.description,
        data.num_classes,
        len(data.train),
        data.old_train.num_classes,
        len(data.old_train),
        ', '.join(
            f'{t.name} ({len(t.query)} queries'
            + ('' if t.gallery is None else f', {len(t.gallery)} gallery images')
            + ')'
            for t in data.tests
        ),
    )
    common = dict(
        workdir=workdir,
        mesh=mesh,
        data_cfg=config.data,
        ckpt_cfg=config.ckpt,
        log_every_steps=config.log_every_steps,
        compat_cfg=config.compat,
        perturb_cfg=config.perturb,
        shard_classes=config.mesh.shard_classes,
    )

    # 1. The old model: given, or trained on the old split.
    if config.old.checkpoint:
        old = train.load(
            config.old.checkpoint,
            config.old.model,
            data.old_train.num_classes,
            mesh,
            shard_classes=config.mesh.shard_classes,
        )
    else:
        old = train.train(
            stage='old',
            model_cfg=config.old.model,
            train_cfg=config.old.train,
            source=data.old_train,
            num_classes=data.old_train.num_classes,
            seed=config.seed,
            **common,
        )

    # 2. Old prototypes of every class of the new training set.
    bank = prototypes.old_bank(
        old,
        data.train,
        num_classes=data.num_classes,
        workdir=workdir,
        mesh=mesh,
        batch_size=config.eval.batch_size,
    )
    aux = dict(
        prototypes=bank,
        old_params=old.params,
        old_batch_stats=old.batch_stats,
        old_label=data.old_label,
    )

    # 3. New models, one per method, all from the same initialisation.
    new_models = {
        method: train.train(
            stage=f'new_{method}',
            method=method,
            model_cfg=config.new.model,
            train_cfg=config.new.train,
            source=data.train,
            num_classes=data.num_classes,
            seed=config.seed + 1,
            old=old,
            aux=aux,
            **common,
        )
        for method in config.methods
    }

    # 4. Retrieval tests and the results files.
    results = evaluate.evaluate(old, new_models, data, mesh=mesh, eval_cfg=config.eval)
    results.update(
        benchmark=data.description,
        old_model=old.identity(),
        machine=f'{platform.machine()} {os.cpu_count()} cores, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s)',
        wall_seconds=time.time() - start,
        config=json.loads(config.to_json()),
    )
    _write_results(results, workdir)
    return results


def _quiet_libraries(record) -> bool:
    """Keeps the log to bcl_jax's own lines: orbax and grain speak at INFO on every save."""
    return record.levelno >= logging.converter.STANDARD_WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'grain', 'jax')
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    logging.get_absl_handler().python_handler.addFilter(_quiet_libraries)
    if _DISTRIBUTED.value:
        initialize_distributed()
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main)
