"""tools/refresh_readings.py: a strength study's manipulation check, against hand-worked
metrics files."""

import importlib.util
import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tool():
    path = REPO / 'tools' / 'refresh_readings.py'
    spec = importlib.util.spec_from_file_location('refresh_readings', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: pathlib.Path, rows: list[dict]):
    folder.mkdir(parents=True)
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def _refresh(step, rho, common, own):
    return dict(step=step, event='refresh', rho=rho, common_mode=common, own_nearest=own)


@pytest.fixture
def workdir(tmp_path):
    for seed, rhos in ((1, (0.5, 3.0, 2.0)), (2, (1.0, 1.0, 4.0))):
        s = tmp_path / f'seed_{seed}'
        _write(
            s / 'new_ndpp_x',
            [
                dict(step=100, cls=9.0, comp=50.0, loss=59.0),  # before step 200: not counted
                _refresh(150, rhos[0], 0.1, 1.0),
                dict(step=200, cls=8.0, comp=4.0, loss=12.0),
                _refresh(250, rhos[1], 0.9, 0.5 if seed == 1 else 0.8),
                dict(step=300, cls=7.0, comp=2.0 * seed, loss=7.0 + 2 * seed),
                _refresh(350, rhos[2], 0.5, 0.9),
            ],
        )
        _write(s / 'new_bct', [dict(step=200, cls=6.0, comp=3.0, loss=9.0)])
        _write(s / 'new_independent', [dict(step=200, cls=5.0, loss=5.0)])
    return tmp_path


def test_per_seed_readings_by_hand(workdir):
    got = _tool().readings(workdir, [1, 2])
    assert set(got) == {'ndpp_x', 'bct'}  # independent has no compatibility loss
    one = got['ndpp_x']['1']
    assert one == dict(
        comp_late=3.0,  # (4 + 2) / 2, steps 200 and 300
        cls_last=7.0,
        refreshes=3,
        rho_median=2.0,
        rho_min=0.5,
        rho_max=3.0,
        common_mode_median=0.5,
        own_nearest_min=0.5,
    )
    assert got['ndpp_x']['2']['comp_late'] == 4.0 and got['ndpp_x']['2']['rho_median'] == 1.0
    assert got['bct']['2'] == dict(comp_late=3.0, cls_last=6.0)


def test_table_over_seeds_and_the_command(workdir, tmp_path, capsys):
    tool = _tool()
    out = tmp_path / 'readings.json'
    assert tool.main([str(workdir), '--seeds=1,2', f'--json={out}']) == 0
    printed = capsys.readouterr().out.splitlines()
    # Median of the seeds' medians (2.0, 1.0) is 1.5; range 0.5–4.0; lowest own-nearest 0.5;
    # mean late L_comp (3 + 4) / 2; L_cls 7 in both.
    assert '| ndpp_x | 2 | 1.50 (0.50–4.00) | 0.50 | 0.50 | 3.50 | 7.00 |' in printed
    assert '| bct | 2 |  |  |  | 3.00 | 6.00 |' in printed
    assert json.loads(out.read_text()) == tool.readings(workdir, [1, 2])


def test_a_missing_seed_is_named(workdir):
    with pytest.raises(FileNotFoundError, match='seed_3'):
        _tool().readings(workdir, [1, 3])
