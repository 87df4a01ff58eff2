"""Compatibility methods by name (`config.methods`), and named variants of them.

A method is an object the training loop asks for loss terms, state and work between steps
(`base.Method`). A variant is a method run with other settings, declared in `config.variants`
as `name: 'base field=value ...'` (e.g. `odpp_warm: 'odpp perturb.odpp.warm_start=True'`), so
that one run trains and compares several settings of one method, paired by seed.
"""

from __future__ import annotations

import ast

from bcl_jax.methods.advbct import AdvBCT
from bcl_jax.methods.base import HookContext, Method, StepInputs
from bcl_jax.methods.bct import BCT, L2, BCTInfluence
from bcl_jax.methods.hot_refresh import HotRefresh
from bcl_jax.methods.lce import LCE
from bcl_jax.methods.perturbed import NDPP, ODPP
from bcl_jax.methods.unibct import UniBCT

REGISTRY = {
    m.name: m for m in (Method, BCT, BCTInfluence, L2, LCE, UniBCT, HotRefresh, AdvBCT, NDPP, ODPP)
}
NAMES = tuple(REGISTRY)

__all__ = ['HookContext', 'Method', 'NAMES', 'REGISTRY', 'StepInputs', 'build', 'resolve']


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def resolve(config, name: str):
    """(base method name, the stage's config) for `name`: a method, or a variant of one."""
    variants = config.get('variants') or {}
    if name in REGISTRY:
        return name, config
    if name not in variants:
        raise ValueError(
            f'config.methods: unknown method {name!r}; use one of {NAMES} or a name declared '
            f'in config.variants ({tuple(variants) or "none declared"})'
        )
    base, *settings = str(variants[name]).split()
    if base not in REGISTRY:
        raise ValueError(f'config.variants.{name}={variants[name]!r}: {base!r} is not a method')
    stage_config = config.copy_and_resolve_references()
    for setting in settings:
        field, sep, text = setting.partition('=')
        if not sep:
            raise ValueError(f'config.variants.{name}: {setting!r} is not field=value')
        parent, _, leaf = field.rpartition('.')
        try:
            group = stage_config
            for part in filter(None, parent.split('.')):
                group = group[part]
            if leaf not in group:
                raise KeyError(field)
            group[leaf] = _value(text)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f'config.variants.{name}: cannot set {field}={text} ({e})') from e
    return base, stage_config


def build(name: str, config) -> Method:
    """The method (or variant) `name`, configured from `config`."""
    base, stage_config = resolve(config, name)
    method = REGISTRY[base](stage_config)
    method.name = name
    return method
