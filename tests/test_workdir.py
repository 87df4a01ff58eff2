"""One work directory, one experiment: a rerun with changed settings never reuses or resumes a
model trained under the old ones, and every config error comes before any work.

The first group of tests failed on bcl_jax before stage fingerprints (the rerun silently reported
the old models' numbers under the new config); each checks the refusal and what it names.
"""

import json
import os
import shutil

import pytest

from bcl_jax import data as data_lib
from bcl_jax import fingerprint, main, sharding, train, validate
from bcl_jax import plan as plan_lib
from configs import synthetic
from tests.test_main import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke(**changes):
    cfg = synthetic.get_config('smoke')
    cfg.methods = ('bct',)
    for field, value in changes.items():
        group = cfg
        *parents, leaf = field.split('.')
        for p in parents:
            group = group[p]
        group[leaf] = value
    return cfg


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished smoke run (old model + BCT): (workdir, results)."""
    workdir = str(tmp_path_factory.mktemp('finished'))
    return workdir, main.run(smoke(), workdir)


def stage_files(workdir):
    """Every file under the stage folders, with its modification time."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            p = os.path.join(root, f)
            out[p] = os.path.getmtime(p)
    # The results files, the figures and config.json at the top are rewritten by every run.
    return {k: v for k, v in out.items() if os.path.dirname(k) != workdir}


@pytest.mark.parametrize(
    'field, value, stage',
    [
        ('new.train.learning_rate', 0.05, 'new_bct'),
        ('new.train.epochs', 3.0, 'new_bct'),
        ('seed', 1, 'old'),
        ('data.synthetic.seed', 1, 'old'),
        ('old.train.learning_rate', 0.05, 'old'),
        ('compat.weight', 10.0, 'new_bct'),
    ],
)
def test_a_changed_setting_is_refused_not_reused(finished, tmp_path, field, value, stage):
    workdir = str(tmp_path / 'copy')
    shutil.copytree(finished[0], workdir)
    before = stage_files(workdir)
    with pytest.raises(fingerprint.ChangedConfigError) as err:
        main.run(smoke(**{field: value}), workdir)
    message = str(err.value)
    assert os.path.join(workdir, stage, 'ckpt') in message
    assert field in message and repr(value) in message
    assert '--workdir' in message and 'on_change=retrain' in message
    assert stage_files(workdir) == before  # nothing trained, nothing rewritten


def test_a_changed_old_model_is_refused_by_the_new_stages(finished, tmp_path):
    """The new model was trained against another old model: its reference identity differs."""
    workdir = str(tmp_path / 'copy')
    shutil.copytree(finished[0], workdir)
    shutil.rmtree(os.path.join(workdir, 'old'))
    cfg = smoke(**{'old.train.learning_rate': 0.05})
    with pytest.raises(fingerprint.ChangedConfigError, match=r'old_model: .*\n.*prototypes'):
        main.run(cfg, workdir)


def test_changing_exempt_fields_reuses_the_finished_stages(finished, tmp_path):
    workdir = str(tmp_path / 'copy')
    shutil.copytree(finished[0], workdir)
    before = stage_files(workdir)
    cfg = smoke(**{'log_every_steps': 1, 'ckpt.every_steps': 3, 'mesh.shard_classes': True})
    results = main.run(cfg, workdir)
    assert results['methods']['bct']['new_new'] == finished[1]['methods']['bct']['new_new']
    assert stage_files(workdir) == before
    # Another evaluation batch: nothing retrained (its float rounding may move a near-tie).
    results = main.run(smoke(**{'eval.batch_size': 8}), workdir)
    assert stage_files(workdir) == before
    assert results['methods']['bct']['new_new']['mAP'] == pytest.approx(
        finished[1]['methods']['bct']['new_new']['mAP'], abs=0.01
    )


@pytest.mark.slow
def test_on_change_retrain_moves_the_stage_aside_and_trains_it_anew(finished, tmp_path):
    workdir = str(tmp_path / 'copy')
    shutil.copytree(finished[0], workdir)
    changed = dict(**{'new.train.learning_rate': 0.05})
    retrained = main.run(smoke(on_change='retrain', **changed), workdir)
    assert os.path.isdir(os.path.join(workdir, 'new_bct.replaced-1', 'ckpt'))
    fresh = main.run(smoke(**changed), str(tmp_path / 'fresh'))
    assert retrained['methods']['bct']['new_new'] == fresh['methods']['bct']['new_new']
    assert retrained['old_old'] == finished[1]['old_old']  # the old stage was kept


def test_a_partly_trained_stage_never_resumes_under_another_schedule(tmp_path):
    cfg = smoke()
    data = data_lib.build(cfg.data)
    mesh = sharding.make_mesh(cfg.mesh)
    stage = plan_lib.old_stage(plan_lib.plan(cfg, data))
    train.train(
        stage,
        None,
        train.Loop.from_config(cfg),
        mesh=mesh,
        workdir=str(tmp_path),
        stop_after_steps=2,
    )
    longer = smoke(**{'old.train.epochs': 4.0})
    with pytest.raises(fingerprint.ChangedConfigError, match=r'old.train.epochs: 2.5 -> 4.0'):
        train.train(
            plan_lib.old_stage(plan_lib.plan(longer, data)),
            None,
            train.Loop.from_config(longer),
            mesh=mesh,
            workdir=str(tmp_path),
        )


# --------------------------------------------------------------------------- errors before work


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('new.train.epochs', -1.0, r'config.new.train.epochs=-1.0: >= 0'),
        (
            'new.train.batch_size',
            12,
            r'config.new.train.batch_size=12: a positive multiple of the 8',
        ),
        ('eval.batch_size', 20, r'config.eval.batch_size=20: a positive multiple of the 8'),
        ('old.train.batch_size', 0, r'config.old.train.batch_size=0'),
        ('new.model.head', 'cosine', r"config.new.model.head='cosine': one of"),
        ('methods', ('bct', 'btc'), r"unknown method 'btc'"),
        ('perturb.new_prototypes', 'exakt', r"config.perturb.new_prototypes='exakt'"),
        ('on_change', 'overwrite', r"config.on_change='overwrite'"),
        ('new.train.epochs', 0.01, r'config.new.train.epochs=0.01: gives 0 steps'),
    ],
)
def test_config_errors_stop_before_any_work(tmp_path, field, value, message):
    workdir = str(tmp_path / 'run')
    cfg = smoke(**{field: value})
    if field.startswith('perturb.'):  # checked by the methods that read it (bcl_jax.methods)
        cfg.methods = ('bct', 'ndpp')
    with pytest.raises(validate.ConfigError, match=message):
        main.run(cfg, workdir)
    # Nothing was written: no stage folder, no checkpoint, no config.json.
    assert not os.path.exists(workdir) or os.listdir(workdir) == []


def test_an_unfinished_old_checkpoint_is_refused_unless_allowed(finished, tmp_path):
    cfg = smoke()
    data = data_lib.build(cfg.data)
    train.train(
        plan_lib.old_stage(plan_lib.plan(cfg, data)),
        None,
        train.Loop.from_config(cfg),
        mesh=sharding.make_mesh(cfg.mesh),
        workdir=str(tmp_path / 'partial'),
        stop_after_steps=4,
    )
    cfg.old.checkpoint = str(tmp_path / 'partial' / 'old' / 'ckpt')
    workdir = str(tmp_path / 'run')
    with pytest.raises(ValueError, match='holds step 4 of 5'):
        main.run(cfg, workdir)
    assert not os.path.exists(os.path.join(workdir, 'new_bct'))
    cfg.old.allow_unfinished = True
    results = main.run(cfg, workdir)
    assert results['old_model']['step'] == 4 and results['old_model']['total_steps'] == 5
    assert results['old_model']['checkpoint'] == cfg.old.checkpoint


@pytest.mark.parametrize(
    'flag, says',
    [
        ('--config.not_a_key=1', 'not_a_key'),
        ('--config.new.train.epochs=-2', 'config.new.train.epochs=-2.0: >= 0'),
    ],
)
def test_cli_config_errors_are_one_clear_line(tmp_path, flag, says):
    workdir = str(tmp_path / 'run')
    out = cli(f'--workdir={workdir}', flag)
    assert out.returncode != 0
    assert says in out.stderr and 'Traceback' not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr
    assert not os.path.exists(os.path.join(workdir, 'config.json'))


def test_config_json_is_the_resolved_config(finished):
    with open(os.path.join(finished[0], 'config.json')) as f:
        assert json.load(f)['methods'] == ['bct']


def test_results_banks_and_logs_on_a_non_local_filesystem(monkeypatch):
    """A gs:// work directory (served from memory, no network): results files, the prototype
    bank (reused on a rerun) and metrics.jsonl (trimmed on resume) go through etils.epath.
    Orbax writes the checkpoints through its own gs:// client, which needs the real service."""
    import fake_datasets
    import numpy as np
    from etils import epath

    from bcl_jax import evaluate, prototypes
    from tests import stages

    with fake_datasets.fake_gcs():
        run = 'gs://bucket/run'
        evaluate.write_results(
            dict(columns=['mAP'], old_old={'mAP': 0.5}, methods={}, primary_metric='mAP'), run
        )
        assert json.loads(epath.Path(f'{run}/results.json').read_text())['old_old'] == {'mAP': 0.5}
        assert '| old | old/old | 50.00 |' in epath.Path(f'{run}/results.md').read_text()

        source = stages.RandomSource(n=16, num_classes=4)
        reference = stages.reference(num_classes=4, old_classes=2)
        kw = dict(num_classes=4, workdir=run, mesh=stages.mesh_of(8), batch_size=8)
        bank = prototypes.old_bank(reference.old, source, data_identity='d', **kw)
        monkeypatch.setattr(prototypes, 'compute', lambda *a, **k: 1 / 0)  # must not run
        again = prototypes.old_bank(reference.old, source, data_identity='d', **kw)
        np.testing.assert_array_equal(again, bank)

        log = train._Log(f'{run}/old', 'old', resume_step=0)
        for step in (1, 2, 3):
            log.write(dict(stage='old', step=step, loss=float(step)))
        log.close()
        train._Log(f'{run}/old', 'old', resume_step=2).close()  # resumed from checkpoint 2
        lines = epath.Path(f'{run}/old/metrics.jsonl').read_text().splitlines()
        assert [json.loads(l)['step'] for l in lines] == [1, 2]


def test_a_setting_added_later_at_its_off_value_changes_no_stage():
    """A stage saved before a field existed matches a config with the field off (None or
    False), and differs from one with it on."""
    saved = {'perturb.ndpp.alpha': 0.16}
    now = dict(saved, **{'perturb.ndpp.rho': None, 'perturb.ndpp.new_push': False})
    assert fingerprint.differences(saved, now) == []
    on = dict(now, **{'perturb.ndpp.rho': 0.5})
    assert fingerprint.differences(saved, on) == ["perturb.ndpp.rho: '(not set)' -> 0.5"]
    # A field dropped since, or one set to 0 (a value, not a switch), still differs.
    assert fingerprint.differences(now, saved) != []
    assert fingerprint.differences(saved, dict(saved, **{'data.validation_fraction': 0.0})) != []
