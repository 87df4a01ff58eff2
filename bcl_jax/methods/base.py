"""The interface between the training loop and a compatibility method, and the method registry.

A method is one file of this package: a `Method` subclass decorated with `@register`, which
declares the config sections it adds (`config_defaults`, merged into every config by
configs/common.py), checks its settings before any work (`check`, called by bcl_jax.validate)
and names the sections that enter its stages' fingerprints (`config_sections`).

The loop (bcl_jax.train) knows no method by name. It asks the stage's `Method` in four places:

1. `init_state(stage, reference)`, on the host, once: the method's part of the train state, checkpointed and
   restored with it (`{}` for most methods; NDPP/ODPP's prototype banks). Arrays indexed by
   class go under a 'banks' key: they follow the class sharding (bcl_jax.sharding).
2. `terms(inputs, reference, state)`, inside the jitted step: the method's loss terms, each
   added to L_cls with its weight in `weights`, and the method's updated state.
3. `before_step(state, step, ctx)`, on the host, before every step: work between steps, such as
   the NDPP/ODPP refresh of the perturbed prototypes. Returns the state and a record to log.
4. `finish(state, ctx)`, on the host, after the last step (e.g. a figure).

A method that keeps parameters of its own and trains them with the model puts them under
`state['params']`: the step then differentiates the total loss with respect to them too and
updates them with `optimizer(...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from bcl_jax import stage as stage_lib

REGISTRY: dict[str, type[Method]] = {}  # name -> method class, in the order they registered


def register(cls: type[Method]) -> type[Method]:
    """Makes a `Method` subclass usable by its `name` in `config.methods` (a class decorator)."""
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f'two methods named {cls.name!r}: {REGISTRY[cls.name]} and {cls}')
    REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What the step has computed when it asks a method for its terms (all traced arrays)."""

    images: Any  # (B, H, W, 3) the augmented batch
    labels: Any  # (B,) new-model labels
    emb: Any  # (B, D) L2-normalised new embeddings (with gradient)
    logits: Any  # (B, C) the new classifier's logits (cosines for CosFace/ArcFace)
    params: Any  # the new model's parameters (e.g. its classifier kernel)
    num_classes: int  # the real classes; the class axes may carry padding after them
    step: Any  # the step being taken, counted from 0 (a traced int)


@dataclasses.dataclass
class HookContext:
    """What the host-side hooks may use: the stage, its reference, where it runs and logs."""

    stage: stage_lib.Stage
    reference: stage_lib.Reference | None
    graphdef: Any  # the model's graph (its weights are in the train state)
    mesh: Any
    shard_classes: bool
    directory: str
    steps_per_epoch: float

    def model(self, state) -> stage_lib.Trained:
        """The model being trained, with the state's current weights."""
        s = self.stage
        return stage_lib.Trained(
            self.graphdef, state['params'], state['batch_stats'], s.model_cfg, s.num_classes, 0
        )


@register
class Method:
    """Independent training: L_cls alone. Every other method derives from this one."""

    name = 'independent'
    needs_reference = False
    needs_old_network = False  # runs the old model on every batch (old.embeddings cannot)
    needs_class_stats = False  # per-class statistics of the old embeddings (LCE, AdvBCT)
    # The config sections (dotted paths) that this method reads: they enter the stage's
    # fingerprint, so a changed setting is never mixed with a model trained under the old one.
    config_sections: tuple[str, ...] = ()

    def __init__(self, config):
        self.config = config  # the stage's resolved config (variants applied)

    @staticmethod
    def config_defaults() -> dict:
        """{section: {field: default}}: the config sections this method adds to every config
        (made afresh at each call: a config owns its placeholders)."""
        return {}

    def check(self):
        """Stops with an `errors.ConfigError` naming the field when a setting of this method's
        config cannot work; bcl_jax.validate calls it before any work."""

    def notes(self) -> dict:
        """What the method settled before training that results.json records (e.g. a
        calibrated parameter, bcl_jax.calibrate); valid after `init_state`."""
        return {}

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each loss term this method adds to L_cls."""
        return {}

    def init_state(self, stage: stage_lib.Stage, reference) -> dict:
        return {}

    def terms(self, inputs: StepInputs, reference, state: dict) -> tuple[dict, dict]:
        return {}, state

    def before_step(self, state: dict, step: int, ctx: HookContext) -> tuple[dict, dict | None]:
        return state, None

    def finish(self, state: dict, ctx: HookContext):
        pass

    # `(old model, old gallery embeddings) -> row order` in which to re-embed the gallery, for
    # methods that supply one (bcl_jax.evaluate.backfill_curves); None: random order only.
    backfill_order = None

    def optimizer(self, model_tx):
        """The optax optimizer of `state['params']`: by default the model's own (`model_tx`)."""
        return model_tx


def old_embeddings(reference, images):
    """The frozen old model's embeddings of the batch (no gradient flows into it)."""
    return jax.lax.stop_gradient(reference.old_model()(images, train=False)[0])
