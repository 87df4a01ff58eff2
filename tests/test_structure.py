"""The package's structure: its imports form no circle, none hides in a function, and a method
is one file that declares its settings and checks them before any work."""

import ast
import os

import pytest
from ml_collections import config_dict

from bcl_jax import methods, validate
from bcl_jax.errors import ConfigError, require
from configs import synthetic

PACKAGE = os.path.join(os.path.dirname(__file__), '..', 'bcl_jax')
# Modules that exist to hold a heavy optional library (PyTorch): imported where it runs only.
LAZY = ('bcl_jax.serving_torch',)


def _modules() -> dict[str, str]:
    """module name -> file, for every module of bcl_jax."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith('.py'):
                path = os.path.join(folder, f)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    return out


def _imported(node, module: str, is_package: bool, modules) -> list[str]:
    """The bcl_jax modules an import statement in `module` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = module.split('.') if is_package else module.split('.')[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = '.'.join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ''
        names = [
            f'{prefix}.{a.name}' if f'{prefix}.{a.name}' in modules else prefix for a in node.names
        ]
    return [n for n in names if n.split('.')[0] == 'bcl_jax']


def _imports(modules):
    """(module -> the bcl_jax modules it imports, [(module, line) of imports inside functions])."""
    graph, local = {}, []
    for module, path in modules.items():
        tree = ast.parse(open(path).read())
        in_function = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
        }
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _imported(node, module, path.endswith('__init__.py'), modules)
                graph[module].update(t for t in targets if t != module)
                if set(targets) - set(LAZY) and id(node) in in_function:
                    local.append((module, node.lineno))
    return graph, local


def _circle(graph) -> list[str] | None:
    """A circle of imports in `graph`, or None (depth-first search)."""
    state, path = {}, []

    def visit(m):
        state[m] = 'open'
        path.append(m)
        for n in sorted(graph.get(m, ())):
            n = n if n in graph else n.rpartition('.')[0]  # `from pkg import name`
            if state.get(n) == 'open':
                return path[path.index(n) :] + [n]
            if n in graph and n not in state and (found := visit(n)):
                return found
        state[m] = 'done'
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_package_imports_form_no_circle_and_none_hides_in_a_function():
    modules = _modules()
    assert {'bcl_jax.plan', 'bcl_jax.stage', 'bcl_jax.methods.lce'} <= set(modules)
    graph, local = _imports(modules)
    assert _circle(graph) is None, ' -> '.join(_circle(graph))
    assert local == [], f'function-local bcl_jax imports (module, line): {local}'


def test_the_circle_finder_finds_a_circle():
    """The check above can fail: a hand-made graph with a circle through three modules."""
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert _circle(graph) == ['a', 'b', 'c', 'a']
    assert _circle({'a': {'b'}, 'b': set()}) is None


def test_each_method_declares_its_own_settings_in_its_file():
    """The config's method sections are the registered methods' `config_defaults`."""
    c = synthetic.get_config()
    declared = methods.config_defaults()
    assert set(declared) == {'perturb', 'lce', 'unibct', 'hot_refresh', 'advbct'}
    for section, fields in declared.items():
        assert c[section].to_dict() == config_dict.ConfigDict(fields).to_dict()
    # A fresh copy each time: two configs never share a placeholder.
    a, b = synthetic.get_config(), synthetic.get_config()
    a.perturb.ndpp.rho = 0.5
    assert b.perturb.ndpp.rho is None


@pytest.mark.parametrize(
    'field, value, message',
    [
        (
            'lce.align_over',
            'batches',
            r"config.lce.align_over='batches': one of \('batch', 'classes'\)",
        ),
        (
            'perturb.odpp.margin_old',
            2.0,
            r'config.perturb.odpp.margin_old=2.0: .*outside \[-1, 1\]',
        ),
        ('unibct.kind', 'cos', r"config.unibct.kind='cos'"),
    ],
)
def test_a_method_setting_that_cannot_work_stops_before_any_work(field, value, message):
    """Checked with the config alone (before the data is read or any model trains)."""
    method = field.split('.')[0].replace('perturb', 'odpp')
    c = synthetic.get_config(f'smoke,methods=bct+{method}')
    group, _, leaf = field.rpartition('.')
    node = c
    for part in group.split('.'):
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
        validate.check_config(c)


def test_a_method_is_one_file_registered_by_name(tmp_path):
    """What a plug-in file holds: a registered class with its settings and its check. Its
    section joins every config made after it registered, its check runs with the others, and a
    variant of it resolves like any method's."""

    @methods.register
    class Toy(methods.Method):
        name = 'toy'
        needs_reference = True
        config_sections = ('compat', 'toy')

        @staticmethod
        def config_defaults():
            return {'toy': dict(strength=1.0)}

        def check(self):
            s = self.config.toy.strength
            require(s > 0, 'toy.strength', s, '> 0')

    try:
        c = synthetic.get_config('smoke,methods=bct+toy+toy_weak')
        assert c.toy.strength == 1.0
        c.variants = config_dict.ConfigDict({'toy_weak': 'toy toy.strength=0.25'})
        validate.check_config(c)
        assert methods.build('toy_weak', c).config.toy.strength == 0.25
        c.toy.strength = -1.0
        with pytest.raises(ConfigError, match=r'config.toy.strength=-1.0: > 0'):
            validate.check_config(c)
    finally:
        del methods.REGISTRY['toy']
    with pytest.raises(ValueError, match="two methods named 'bct'"):

        @methods.register
        class Other(methods.Method):
            name = 'bct'
