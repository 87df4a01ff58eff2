"""What happens when an input is wrong: each test is one bad input and what bcl_jax does.

Every test here failed on bcl_jax before these checks (a late TypeError, a raw traceback, a
silent misreading, advice that did not work). The first line of each test's docstring is a row
of the "What happens when" table in docs/running.md; `test_the_docs_table_lists_every_case`
keeps the two in step.
"""

import os

import pytest

from bcl_jax import data as data_lib
from bcl_jax import validate
from configs import synthetic, synthetic_sequential

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, 'docs', 'running.md')


def smoke(arg='smoke', module=synthetic, **changes):
    cfg = module.get_config(arg)
    if module is synthetic:
        cfg.methods = ('bct',)
    for field, value in changes.items():
        group = cfg
        *parents, leaf = field.split('.')
        for p in parents:
            group = group[p]
        group[leaf] = value
    return cfg


@pytest.fixture(scope='module')
def smoke_data():
    return data_lib.build(smoke().data)


# --------------------------------------------------------------------------- config checks


def test_new_embedding_dim_differs_from_old():
    """A new model's `embedding_dim` differs from the old model's"""
    cfg = smoke(**{'new.model.embedding_dim': 32})
    with pytest.raises(validate.ConfigError) as err:
        validate.check_config(cfg)
    message = str(err.value)
    assert 'config.new.model.embedding_dim=32' in message
    assert '16, as config.old.model.embedding_dim' in message
    assert 'no learned transformation' in message


def test_independent_embedding_dim_differs_from_old():
    """An independent model's `embedding_dim` differs from the old model's"""
    cfg = smoke(methods=('independent',), **{'new.model.embedding_dim': 32})
    with pytest.raises(validate.ConfigError, match='new/old cross-test'):
        validate.check_config(cfg)


def test_upgrade_embedding_dim_differs_from_its_predecessor():
    """An upgrade's `embedding_dim` differs from the model before it"""
    cfg = smoke(module=synthetic_sequential)
    cfg.upgrades.v3.model.embedding_dim = 32
    with pytest.raises(validate.ConfigError) as err:
        validate.check_config(cfg)
    assert 'config.upgrades.v3.model.embedding_dim=32' in str(err.value)
    assert 'config.upgrades.v2.model.embedding_dim' in str(err.value)


def test_unknown_upgrade_method():
    """An upgrade names an unknown method"""
    cfg = smoke(module=synthetic_sequential)
    cfg.upgrades.v2.method = 'bcd'
    with pytest.raises(validate.ConfigError) as err:
        validate.check_config(cfg)
    assert str(err.value).startswith("config.upgrades.v2.method='bcd': one of (")
    assert 'config.methods' not in str(err.value)


def test_upgrade_with_zero_steps(smoke_data):
    """An upgrade's schedule gives 0 steps"""
    cfg = smoke(module=synthetic_sequential)
    cfg.upgrades.v2.train = {'epochs': 0.01}
    validate.check_config(cfg)
    with pytest.raises(validate.ConfigError) as err:
        validate.check_run(cfg, smoke_data)
    message = str(err.value)
    assert message.startswith('config.upgrades.v2.train.epochs=0.01: gives 0 steps')
    assert "upgrade 'v2'" in message
