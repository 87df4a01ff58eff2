"""bcl_jax.bench's eval_topk measurement (knn.topk against faiss) at --quick sizes.

Only the plumbing and the agreement check are tested; no timing is compared."""

import json
import subprocess
import sys

import numpy as np
import pytest

from bcl_jax import bench

KEYS = {
    'seconds',
    'all_seconds',
    'warmup_seconds',
    'runs',
    'queries',
    'index',
    'dim',
    'k',
    'query_block',
    'gallery_block',
    'faiss',
    'memory',
    'target_ratio',
}


@pytest.fixture(scope='module')
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    subprocess.run(
        [sys.executable, '-m', 'bcl_jax.bench', '--quick', '--measure=eval_topk', f'--out={out}'],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def test_eval_topk_quick_keys(quick_report):
    assert list(quick_report['results']) == ['eval_topk']
    result = quick_report['results']['eval_topk']
    assert KEYS <= set(result)
    sizes = (result['queries'], result['index'], result['dim'], result['k'])
    assert sizes == (50, 3000, 32, 10)  # bench.QUICK
    assert len(result['all_seconds']) == result['runs'] == 1
    memory = result['memory']
    assert memory['full_matrix_bytes'] == 4 * 50 * 3000
    assert memory['score_block_bytes'] == 4 * 25 * 1024  # 50 queries split into 2 blocks of 25
    assert memory['temp_bytes'] is None or memory['temp_bytes'] > 0
    faiss = result['faiss']
    if faiss['available']:
        assert {'ratio_to_faiss', 'paired_ratios_to_faiss', 'agreement'} <= set(result)
    else:
        assert 'error' in faiss and 'ratio_to_faiss' not in result


def test_eval_topk_quick_agrees_with_faiss(quick_report):
    pytest.importorskip('faiss')
    result = quick_report['results']['eval_topk']
    faiss = result['faiss']
    assert faiss['available'] and faiss['threads'] >= 1
    assert {'add_seconds', 'seconds', 'all_seconds', 'version'} <= set(faiss)
    agreement = result['agreement']
    assert agreement['queries_set_differs_beyond_ties'] == 0
    assert agreement['ranks_score_within_tol'] == 1.0
    assert agreement['queries_same_set'] >= 0.9 * result['queries']


def test_eval_topk_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, 'faiss', None)  # `import faiss` raises ImportError
    result = bench.MEASUREMENTS['eval_topk'](dict(bench.QUICK), {})
    assert KEYS <= set(result)
    assert result['faiss']['available'] is False and 'faiss' in result['faiss']['error']
    assert 'ratio_to_faiss' not in result and 'agreement' not in result


def test_topk_agreement_tolerates_ties_only():
    scores = np.array([[0.9, 0.5, 0.3], [0.8, 0.7, 0.6]], np.float32)
    idx = np.array([[4, 1, 7], [0, 2, 5]])
    # Row 0: items 7 and 8 tie at the cut-off (a swap); row 1: item 9 is no tie for 2.
    other_scores = np.array([[0.9, 0.5, 0.3 + 1e-7], [0.8, 0.6, 0.6]], np.float32)
    other_idx = np.array([[4, 1, 8], [0, 5, 9]])
    got = bench.topk_agreement(scores, idx, other_scores, other_idx)
    assert got['queries_same_set'] == 0 and got['queries_same_order'] == 0
    assert got['queries_set_differs_beyond_ties'] == 1
    assert got['ranks_score_within_tol'] == pytest.approx(5 / 6)
    assert bench.topk_agreement(scores, idx, scores, idx)['fraction_same_set'] == 1.0


@pytest.mark.slow
def test_train_step_measurement_quick(tmp_path):
    """The train_step measurement builds and runs every model's step (no timing is judged)."""
    out = tmp_path / 'bench.json'
    subprocess.run(
        [sys.executable, '-m', 'bcl_jax.bench', '--quick', '--measure=train_step', f'--out={out}'],
        check=True,
        capture_output=True,
        timeout=600,
    )
    r = json.loads(out.read_text())['results']['train_step']
    assert set(r['steps']) == {
        'old_resnet18',
        'new_resnet50_independent',
        'new_resnet50_bct',
        'new_resnet50_ndpp',
        'new_resnet50_odpp',
    }
    for timing in r['steps'].values():
        assert timing['images_per_sec'] == pytest.approx(r['batch'] / timing['seconds'])
    assert set(r['ratio_to_bct']) == {'ndpp', 'odpp'}
