"""What every command sets up first: the compilation cache (and, in test_crosstest.py, the log)."""

import os
import subprocess
import sys

import jax
import pytest

from bcl_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_cache_set():
    """JAX's cache setting as the test found it, restored after."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update('jax_compilation_cache_dir', None)
    yield
    jax.config.update('jax_compilation_cache_dir', before)


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(console.COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert console.compile_cache_dir() == str(tmp_path / 'bcl_jax' / 'jax')
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert console.compile_cache_dir() == str(tmp_path / 'home' / '.cache' / 'bcl_jax' / 'jax')
    monkeypatch.setenv(console.COMPILE_CACHE_ENV, str(tmp_path / 'mine'))
    assert console.compile_cache_dir() == str(tmp_path / 'mine')
    for off in ('off', 'OFF', '0'):
        monkeypatch.setenv(console.COMPILE_CACHE_ENV, off)
        assert console.compile_cache_dir() is None


def test_use_compile_cache_sets_it_once_and_keeps_the_users(monkeypatch, tmp_path, no_cache_set):
    monkeypatch.setenv(console.COMPILE_CACHE_ENV, 'off')
    assert console.use_compile_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv(console.COMPILE_CACHE_ENV, str(tmp_path / 'a'))
    assert console.use_compile_cache() == str(tmp_path / 'a')
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'a')
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'users'))
    assert console.use_compile_cache() == str(tmp_path / 'users')  # the user's setting stays


# A process that turns the cache on, compiles one small program, and prints how many
# compilations it took from the cache (the program compiles faster than the threshold below
# which bcl_jax keeps no entry, so the test lowers it to 0).
_PROGRAM = """
import jax, jax.numpy as jnp
from bcl_jax import console
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith('cache_hits') else None)
console.use_compile_cache()
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0))
y = float(f(jnp.ones((64, 64))).sum())
print('hits', len(hits), y)
"""


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env = dict(os.environ, BCL_JAX_COMPILE_CACHE=str(tmp_path / 'cache'), XLA_FLAGS='')
    run = lambda: subprocess.run(
        [sys.executable, '-c', _PROGRAM], cwd=REPO, env=env, capture_output=True, text=True
    )
    first, second = run(), run()
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    assert first.stdout.split()[:2] == ['hits', '0'], first.stdout
    assert os.listdir(tmp_path / 'cache')  # it wrote the program
    assert int(second.stdout.split()[1]) >= 1, second.stdout + second.stderr[-2000:]
    assert first.stdout.split()[2] == second.stdout.split()[2]  # the same result


def test_profile_adds_up_parts_and_a_table_shows_their_share():
    console.take_profile()  # whatever earlier tests timed
    console.add_time('a', 1.0)
    console.add_time('b', 2.0)
    console.add_time('a', 1.0)
    with console.timed('c'):
        pass
    profile = console.take_profile()
    assert list(profile) == ['a', 'b', 'c'] and profile['a'] == 2.0 and profile['b'] == 2.0
    assert 0 <= profile['c'] < 1.0
    assert console.take_profile() == {}  # taken: a fresh profile
    # Hand-worked: 10 s in all, 2 + 2 timed: the untimed 6 s show as their own row.
    lines = console.profile_table({'a': 2.0, 'b': 2.0}, total=10.0).splitlines()
    assert [line.split() for line in lines] == [
        ['a', '2.0', 's', '20.0%'],
        ['b', '2.0', 's', '20.0%'],
        ['other', '(untimed)', '6.0', 's', '60.0%'],
    ]
    # Untimed time under 5% of the total is not a row.
    assert len(console.profile_table({'a': 9.7}, total=10.0).splitlines()) == 1
