"""A training stage as data: what it makes (`Trained`), what it trains against (`Reference`),
and what it is (`Stage`): the types the training loop, the methods and the plan share.

- `Trained`: a model's graph and weights, enough to embed images or score classes.
- `Reference`: the frozen old model, its prototypes of the new training set's classes, the map
  from new labels to old ones, and any per-class statistics a method asked for. A JAX pytree
  (the old model's graph is static), so the jitted step takes it as one argument and
  `bcl_jax.sharding` lays out its fields.
- `Stage`: one model to train: its name (its folder in the work directory), model and schedule,
  training set, seed, method, and its fingerprint: every setting that determines its result.

The stages of a run are built by bcl_jax.plan; their fingerprints by bcl_jax.fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcl_jax import sharding


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


def steps_of(train_cfg, num_examples: int) -> tuple[int, float]:
    """(steps, steps_per_epoch) of a stage on `num_examples` images: `train.steps`, or
    `train.epochs` at its batch size (0 when too few images)."""
    per_epoch = num_examples / train_cfg.batch_size
    return train_cfg.steps or int(round(train_cfg.epochs * per_epoch)), per_epoch


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
