"""Compatibility methods by name (`config.methods`), and named variants of them.

A method is an object the training loop asks for loss terms, state and work between steps
(`base.Method`). Each module of this package is a plug-in: importing it registers its methods
(`base.register`), so adding a method is adding its file (and its tests). A variant is a method
run with other settings, declared in `config.variants` as `name: 'base field=value ...'` (e.g.
`odpp_warm: 'odpp perturb.odpp.warm_start=True'`), so that one run trains and compares several
settings of one method, paired by seed.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil

from bcl_jax.methods.base import REGISTRY, HookContext, Method, StepInputs, register

for _plugin in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{_plugin.name}')
NAMES = tuple(REGISTRY)

__all__ = [
    'HookContext',
    'Method',
    'NAMES',
    'REGISTRY',
    'StepInputs',
    'build',
    'config_defaults',
    'register',
    'resolve',
]


def config_defaults() -> dict:
    """{section: ConfigDict-able dict} of every registered method's own settings; a section may
    be declared by one method (and the classes that inherit it) only."""
    out, owner = {}, {}
    for cls in REGISTRY.values():
        declared_by = cls.config_defaults.__qualname__
        for section, fields in cls.config_defaults().items():
            if owner.setdefault(section, declared_by) != declared_by:
                raise ValueError(
                    f'config section {section!r} declared by {owner[section]} and {declared_by}'
                )
            out.setdefault(section, fields)
    return out


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def resolve(config, name: str, changes: dict | None = None):
    """(base method name, the stage's config) for `name`, a method or a variant of one, with
    `changes` ({dotted field: value}, e.g. an upgrade's `new.model.width`) set on a copy."""
    variants = config.get('variants') or {}
    if name not in REGISTRY and name not in variants:
        raise ValueError(
            f'config.methods: unknown method {name!r}; use one of {NAMES} or a name declared '
            f'in config.variants ({tuple(variants) or "none declared"})'
        )
    base, settings = name, {}
    if name not in REGISTRY:
        base, *words = str(variants[name]).split()
        if base not in REGISTRY:
            raise ValueError(f'config.variants.{name}={variants[name]!r}: {base!r} is not a method')
        for word in words:
            field, sep, text = word.partition('=')
            if not sep:
                raise ValueError(f'config.variants.{name}: {word!r} is not field=value')
            settings[field] = _value(text)
    settings.update(changes or {})
    if not settings:
        return base, config
    stage_config = config.copy_and_resolve_references()
    for field, value in settings.items():
        parent, _, leaf = field.rpartition('.')
        try:
            group = stage_config
            for part in filter(None, parent.split('.')):
                group = group[part]
            if leaf not in group:
                raise KeyError(field)
            group[leaf] = value
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f'config.variants.{name}: cannot set {field}={value} ({e})') from e
    return base, stage_config


def build(name: str, config, changes: dict | None = None) -> Method:
    """The method (or variant) `name`, configured from `config` (with `changes`, see `resolve`)."""
    base, stage_config = resolve(config, name, changes)
    method = REGISTRY[base](stage_config)
    method.name = name
    return method
