"""A training stage as data: what it makes (`Trained`), what it trains against (`Reference`),
and what it is (`Stage`), with the fingerprint that says when a finished stage may be reused.

- `Trained`: a model's graph and weights, enough to embed images or score classes.
- `Reference`: the frozen old model, its prototypes of the new training set's classes, the map
  from new labels to old ones, and any per-class statistics a method asked for. A JAX pytree
  (the old model's graph is static), so the jitted step takes it as one argument and
  `bcl_jax.sharding` lays out its fields.
- `Stage`: one model to train: its name (its folder in the work directory), model and schedule,
  training set, seed, method, and its fingerprint: every setting that determines its result.

A stage's fingerprint is stored with its checkpoints. A rerun whose fingerprint differs stops
and lists the differing fields (`check_fingerprint`) instead of reusing or resuming a model
trained under other settings; `config.on_change='retrain'` moves the old stage aside and trains
it anew. Fields that cannot change a trained model are left out, all of them in `EXEMPT`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import sharding

# Config fields that cannot change a trained model: how often to log or save, how many devices
# or threads do the work (8 devices compute what 1 does, to float rounding), evaluation settings
# (evaluation is rerun every time), which stages to run, and where the data lies (what the data
# is goes into the fingerprint through `Data.fingerprint`).
EXEMPT = (
    'log_every_steps',
    'ckpt',
    'mesh',
    'eval',
    'seeds',
    'methods',
    'variants',
    'on_change',
    'data.num_threads',
    'data.workers',
    'data.scan_images',
    'data.skip_corrupt',
    'data.fingerprint',  # how the data is identified; what it is enters through data_identity
    'data.prepared',
    'data.folder.train_dir',
    'data.folder.query_dir',
    'data.folder.gallery_dir',
    'data.gldv2.root',
    'data.gldv2.split_file',
    'data.gldv2.tests',
    'data.revisited',
    'data.inshop.root',
    'data.tfds.data_dir',
)


@dataclasses.dataclass(eq=False)
class Trained:
    """A model's graph and weights, enough to embed images or score classes."""

    graphdef: Any
    params: Any
    batch_stats: Any
    model_cfg: Any
    num_classes: int
    step: int
    seconds: float = 0.0
    total_steps: int | None = None
    notes: dict = dataclasses.field(default_factory=dict)  # the method's `notes()`, for results
    _embed_fns: dict = dataclasses.field(default_factory=dict, repr=False)

    def model(self, params=None, batch_stats=None):
        """The NNX model with these weights (or the given ones, e.g. traced inside a step)."""
        return nnx.merge(
            self.graphdef,
            self.params if params is None else params,
            self.batch_stats if batch_stats is None else batch_stats,
        )

    def with_weights(self, params, batch_stats) -> Trained:
        """This model with other weights (e.g. traced ones inside a step)."""
        return dataclasses.replace(self, params=params, batch_stats=batch_stats, _embed_fns={})

    def embed_fn(self, mesh):
        """A jitted `(params, batch_stats, images) -> embeddings`, images sharded over `mesh`;
        the weights are used where they are (replicated, or a classifier sharded by class)."""
        if mesh not in self._embed_fns:
            rows = NamedSharding(mesh, P('data'))
            self._embed_fns[mesh] = jax.jit(
                lambda params, stats, images: self.model(params, stats).embed(images),
                in_shardings=(None, None, rows),
                out_shardings=rows,
            )
        return self._embed_fns[mesh]

    def identity(self) -> str:
        """A digest of the weights: names this exact model in prototype banks and results, the
        same whatever mesh (and class padding, bcl_jax.sharding) it was trained on."""
        h = hashlib.sha256()
        weights = sharding.unpad((self.params, self.batch_stats), self.num_classes)
        for path, leaf in sorted(
            jax.tree_util.tree_leaves_with_path(weights),
            key=lambda kv: jax.tree_util.keystr(kv[0]),
        ):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(leaf.tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """The architecture, as stored in checkpoints and checked when one is loaded."""
        return describe(self.model_cfg)


MODEL_FIELDS = ('arch', 'width', 'depth', 'embedding_dim', 'head', 'pool')


def describe(model_cfg) -> dict:
    """The model fields that make the weights' shapes: stored in checkpoints, checked on load."""
    return {k: model_cfg.get(k, 'avg') if k == 'pool' else model_cfg[k] for k in MODEL_FIELDS}


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
    """What a new model trains against (method.md §2-§3).

    `old`: the frozen old model; `prototypes` (C, D): its normalised class means over the new
    training set; `old_label` (C,): new label -> old label, -1 for a class the old model never
    saw; `class_stats`: per-class arrays (C, ...) that a method computed before training.
    """

    old: Trained
    prototypes: Any
    old_label: Any
    class_stats: dict = dataclasses.field(default_factory=dict)

    def old_model(self):
        """The frozen old model as an NNX module (inside a step: with the traced weights)."""
        return self.old.model()

    # The old weights, the prototypes, the label map and the statistics are the leaves. The old
    # model's graph and config are static: the `Trained` they came from rides along unchanged
    # (compared by identity), so layouts and jitted steps built from one reference fit its copies.
    def tree_flatten_with_keys(self):
        key = jax.tree_util.GetAttrKey
        children = (
            (key('old_params'), self.old.params),
            (key('old_batch_stats'), self.old.batch_stats),
            (key('prototypes'), self.prototypes),
            (key('old_label'), self.old_label),
            (key('class_stats'), self.class_stats),
        )
        return children, self._static

    @property
    def _static(self) -> Trained:
        return self.__dict__.get('_spec', self.old)

    @classmethod
    def tree_unflatten(cls, static, children):
        params, batch_stats, prototypes, old_label, class_stats = children
        old = static.with_weights(params, batch_stats)
        ref = cls(old, prototypes, old_label, class_stats)
        object.__setattr__(ref, '_spec', static)
        return ref


@dataclasses.dataclass(frozen=True)
class Stage:
    """One model to train. `name` is its folder under the work directory."""

    name: str
    model_cfg: Any
    train_cfg: Any
    source: Any  # the training set (a grain random-access source with labels, num_classes)
    num_classes: int
    seed: int
    method: Any  # a bcl_jax.methods.Method
    fingerprint: dict


# ---------------------------------------------------------------------------------- fingerprints


def _flatten(tree, prefix='') -> dict:
    """{dotted.path: leaf} of nested dicts; tuples and lists are leaves (as lists)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f'{prefix}{k}.'))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _exempt(path: str) -> bool:
    return any(path == e or path.startswith(e + '.') for e in EXEMPT)


def config_fingerprint(config, sections) -> dict:
    """{dotted field: value} of the config's `sections` (dotted paths), exempt fields left out."""
    config = json.loads(config.to_json())
    out = {}
    for section in sections:
        value = config
        for part in section.split('.'):
            value = value[part]
        out.update(_flatten(value, section + '.') if isinstance(value, dict) else {section: value})
    return {k: v for k, v in out.items() if not _exempt(k)}


def _names_a_digest(key: str) -> bool:
    """A field recorded next to a digest to say which setting made it (an upgrade's fraction
    beside its classes' digest): absent from a stage saved before it was recorded, the digest
    alone decides."""
    return key.startswith('upgrades.') and key.endswith('.fraction')


def differences(saved: dict, wanted: dict) -> list[str]:
    """'field: saved -> wanted' for every field that differs (missing on one side included),
    except a field added to bcl_jax after the stage was saved that is off now (None or False):
    new settings are added switched off, so it was made as that setting makes it (and a field
    that names a digest's setting, `_names_a_digest`)."""
    keys = sorted(set(saved) | set(wanted))
    missing = '(not set)'
    added_off = lambda k: (
        k not in saved and (any(wanted[k] is off for off in (None, False)) or _names_a_digest(k))
    )
    return [
        f'{k}: {saved.get(k, missing)!r} -> {wanted.get(k, missing)!r}'
        for k in keys
        if saved.get(k, missing) != wanted.get(k, missing) and not added_off(k)
    ]


class ChangedConfigError(ValueError):
    """A work directory holds a stage trained under other settings."""


def check_fingerprint(saved: dict | None, wanted: dict, *, where: str, what: str):
    """Stops when `saved` (from a checkpoint or a bank's sidecar) differs from `wanted`."""
    if saved is None:
        raise ChangedConfigError(
            f'{where} holds {what} with no record of the settings it was made with (written by '
            'an older bcl_jax). Use a new --workdir, or --config.on_change=retrain to move it '
            'aside and train it anew.'
        )
    diffs = differences(saved, wanted)
    if diffs:
        shown = '\n  '.join(diffs[:20]) + ('\n  ...' if len(diffs) > 20 else '')
        raise ChangedConfigError(
            f'{where} holds {what} made with other settings (saved -> now):\n  {shown}\n'
            'Its results would not be those of this config. Use a new --workdir for the new '
            'settings, or rerun with --config.on_change=retrain to move the old stage aside '
            '(kept as <stage>.replaced-<n>) and train it anew.'
        )


def array_digest(*arrays) -> str:
    """A digest of arrays' bytes, shapes and dtypes (a data identity without images)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f'{a.dtype}{a.shape}'.encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- stages of a run


def data_identity(data) -> str:
    """What the training data is (`Data.fingerprint` where the dataset gives one)."""
    given = getattr(data, 'fingerprint', None)
    if given:
        return given
    return array_digest(data.train.labels, data.old_label, np.asarray([len(data.train)]))


def old_stage(config, data) -> Stage:
    """The old model's stage: trained alone (no compatibility term) on the old split."""
    from bcl_jax import methods  # methods import this module

    sections = ('seed', 'data', 'old.model', 'old.train')
    fingerprint = dict(config_fingerprint(config, sections), data_identity=data_identity(data))
    return Stage(
        name='old',
        model_cfg=config.old.model,
        train_cfg=config.old.train,
        source=data.old_train,
        num_classes=data.old_train.num_classes,
        seed=config.seed,
        method=methods.build('independent', config),
        fingerprint=fingerprint,
    )


def new_stage(config, name: str, data, reference: Reference | None) -> Stage:
    """The new model of method (or variant) `name`, trained on all classes against `reference`.

    Every new model of a run starts from the same initialisation and reads the data in the same
    order (seed + 1), so methods are compared paired by seed.
    """
    from bcl_jax import methods

    method = methods.build(name, config)
    c = method.config  # with the variant's settings
    sections = ('seed', 'data', 'new.model', 'new.train') + method.config_sections
    fingerprint = dict(
        config_fingerprint(c, sections),
        method=type(method).name,
        data_identity=data_identity(data),
    )
    if method.needs_reference and reference is not None:
        bank = sharding.to_host(reference.prototypes)[: data.num_classes]
        fingerprint.update(old_model=reference.old.identity(), prototypes=array_digest(bank))
    return Stage(
        name=f'new_{name}',
        model_cfg=c.new.model,
        train_cfg=c.new.train,
        source=data.train,
        num_classes=data.num_classes,
        seed=c.seed + 1,
        method=method,
        fingerprint=fingerprint,
    )


def make_reference(config, old: Trained, data, *, mesh, workdir: str) -> Reference:
    """The old model with its prototypes of the new training set's classes (and, when a method
    of the run asks for them, per-class statistics of its embeddings), stored in the work
    directory and reused while the old model and the data are the same."""
    from bcl_jax import methods, prototypes

    kw = dict(workdir=workdir, mesh=mesh, batch_size=config.eval.batch_size)
    kw['data_identity'] = data_identity(data)
    kw['retrain'] = config.on_change == 'retrain'  # damaged stored banks are recomputed
    bank = prototypes.old_bank(old, data.train, num_classes=data.num_classes, **kw)
    stats = {}
    if any(methods.build(m, config).needs_class_stats for m in config.methods):
        stats = prototypes.old_class_statistics(old, data.train, bank, data.old_label, **kw)
    return Reference(old, bank, data.old_label, stats)
