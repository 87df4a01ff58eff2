"""BCT and its simple relatives: loss terms computed from the batch and the frozen reference.

- `bct`: the prototype compatibility loss L_comp (method.md §3): the old prototypes as a frozen
  classifier of the new embeddings, temperature τ.
- `bct_influence`: classic BCT (Shen et al. 2020): the frozen old classifier applied to the new
  embeddings, for samples of old classes.
- `l2`: regression of the new embedding onto the old model's embedding of the same image.

Each adds its term to L_cls with weight λ = `config.compat.weight`.
"""

from __future__ import annotations

from bcl_jax import losses
from bcl_jax.methods.base import Method, old_embeddings, register


@register
class BCT(Method):
    name = 'bct'
    needs_reference = True
    config_sections = ('compat',)

    @property
    def weights(self):
        return {'comp': self.config.compat.weight}

    def positives(self, state):
        """The prototypes that replace the target class's (None: the old ones)."""
        return None

    def negatives(self, reference, state):
        return reference.prototypes

    def terms(self, inputs, reference, state):
        comp = losses.compatibility_loss(
            inputs.emb,
            inputs.labels,
            self.negatives(reference, state),
            temperature=self.config.compat.temperature,
            positive_prototypes=self.positives(state),
            num_classes=inputs.num_classes,
        )
        return {'comp': comp}, state


@register
class BCTInfluence(Method):
    name = 'bct_influence'
    needs_reference = True
    needs_old_network = True
    config_sections = ('compat',)

    @property
    def weights(self):
        return {'influence': self.config.compat.weight}

    def terms(self, inputs, reference, state):
        old = reference.old
        term = losses.influence_loss(
            reference.old_model().classifier(inputs.emb),
            inputs.labels,
            reference.old_label,
            kind=old.model_cfg.head,
            scale=old.model_cfg.scale,
            margin=old.model_cfg.margin,
            num_classes=old.num_classes,
        )
        return {'influence': term}, state


@register
class L2(Method):
    name = 'l2'
    needs_reference = True
    needs_old_network = True
    config_sections = ('compat',)

    @property
    def weights(self):
        return {'l2': self.config.compat.weight}

    def terms(self, inputs, reference, state):
        return {'l2': losses.l2_loss(inputs.emb, old_embeddings(reference, inputs.images))}, state
