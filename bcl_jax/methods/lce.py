"""LCE: boundary-aware alignment of the new model to the old class centres (Meng et al., ICCV 2021).

Two loss terms, both read per-class statistics of the old model's embeddings that are computed
once before training, the way the old prototypes are:

- `alignment_loss`: the new classifier's weight vector for class c is pulled onto the old class
  centre direction p_c;
- `boundary_loss`: a new embedding must lie within the angular radius θ_c of its class's old
  embeddings around p_c.

The statistics (bcl_jax.class_stats; also read by AdvBCT's elastic boundary) come in two
passes over the old training data with the frozen old model, as AdvBCT's `extract_feat.py`
computes them (`gen_class_meta`, `gen_class_theta`):

1. sums and counts per class of the L2-normalised old embeddings, `prototypes.class_sums`
   batch by batch (add the batches), then `class_centres` -> unit directions p_c and the norm
   m_c of the mean, the centre being c_c = m_c·p_c;
2. per image, `sample_radii` (its distance to c_c, or its angle to p_c), batch by batch; then one
   call of `class_radii` over all images' radii (one float per image: 6 MB for GLDv2's 1.58M)
   drops each class's outliers by the 1.5·IQR rule and keeps the largest remaining radius.
   With `outlier_rule='none'`, `class_radii` of each batch combine by `jnp.maximum` (radii) and
   `+` (counts), so the statistic streams.

Sources: AdvBCT's port of LCE (GitHub Ashespt/AdvBCT, `trainer/trainer.py`
`LandmarkComTrainer._back_comp_train_epoch`, branch `COMP_LOSS.TYPE == 'lce'`; statistics
`extract_feat.py`), the default here, and LCE's official code (GitHub IrvingMeng/LCE, `main.py`
`train` and `save_lcefeat`), an option of each function. LCE's transformation module (K > 0
residual blocks between the spaces) is left out: AdvBCT's benchmark uses K = 0 ("Follow the
protocol of LCE, K=0").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bcl_jax.class_stats import (
    COS_LIMIT,
    check_batch,
    check_choice,
    class_valid,
    masked_mean,
)
from bcl_jax.errors import require
from bcl_jax.methods.base import Method, register
from bcl_jax.models.heads import l2_normalize

ALIGN_OVER = ('batch', 'classes')
BOUNDARY_SPACES = ('angle', 'cosine')

# ----------------------------------------------------------------------------------------------
# Loss terms (inside the train step)
# ----------------------------------------------------------------------------------------------


def alignment_loss(
    kernel, labels, prototypes, class_valid, *, over: str = 'batch', num_classes: int | None = None
):
    """L_align: the new classifier's class vectors onto the old centre directions.

    `kernel` (D, C): the new classifier's weights, column c for class c (possibly sharded by
    class, with padding columns after the real `num_classes`); `prototypes` (C, D): the old
    centre directions p_c (`class_centres`); `class_valid` (C,) bool: classes with old
    statistics (reference: `kept >= 2`; new classes and padding False). ŵ_c = w_c / ||w_c||.

    'batch' (AdvBCT's port, default): mean over the batch's samples i of valid classes of
    1 − ŵ_{y_i}·p_{y_i}, so a class counts as often as it appears in the batch; the label's
    column is picked by a one-hot contraction. 'classes' (LCE's official `main.py`:
    `mean(mse_loss(normalize(W), centres))`): mean over the valid classes c of
    ||ŵ_c − p_c||² / D, i.e. (2/D)(1 − ŵ_c·p_c), every class every step.
    Weights in the references: 1 (AdvBCT) and λ_a = 100 (LCE's official default).
    """
    check_choice('over', over, ALIGN_OVER, 'lce.alignment_loss')
    if kernel.shape[::-1] != prototypes.shape:
        raise ValueError(
            f'lce.alignment_loss: kernel {kernel.shape} must be the (D, C) transpose of the '
            f'prototypes {prototypes.shape}'
        )
    if over == 'batch':
        one_hot = jax.nn.one_hot(labels, kernel.shape[1], dtype=kernel.dtype)
        w = l2_normalize(jnp.einsum('bc,dc->bd', one_hot, kernel))
        return masked_mean(1.0 - jnp.sum(w * prototypes[labels], axis=-1), class_valid[labels])
    squared = jnp.mean((l2_normalize(kernel, axis=0).T - prototypes) ** 2, axis=-1)
    if num_classes is not None:
        class_valid = class_valid & (jnp.arange(kernel.shape[1]) < num_classes)
    return masked_mean(squared, class_valid)


def boundary_loss(emb, labels, prototypes, max_angle, class_valid, *, space: str = 'angle'):
    """L_boundary: a new embedding must stay within its class's old angular radius.

    With θ_c = `max_angle[c]` (`class_radii` of 'angle' radii) and f_i the new embedding:
    'angle' (AdvBCT's port, default): mean over samples of valid classes of
    max(arccos(f_i·p_{y_i}) − θ_{y_i}, 0); 'cosine' (LCE's official `main.py`):
    max(cos θ_{y_i} − f_i·p_{y_i}, 0), the same boundary measured in cosine. The official code
    averages over the whole batch (every class has a centre there); here both average over the
    samples of `class_valid` classes. Weights in the references: 1 (AdvBCT) and λ_b = 1 (LCE).
    """
    check_choice('space', space, BOUNDARY_SPACES, 'lce.boundary_loss')
    check_batch('lce.boundary_loss', emb, labels, prototypes)
    cos = jnp.sum(emb * prototypes[labels], axis=-1)
    theta = max_angle[labels]
    if space == 'angle':
        gap = jnp.arccos(jnp.clip(cos, -COS_LIMIT, COS_LIMIT)) - theta
    else:
        gap = jnp.cos(theta) - cos
    return masked_mean(jnp.maximum(gap, 0.0), class_valid[labels])


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


@register
class LCE(Method):
    """`lce`: L_cls + λ·(a·L_align + b·L_boundary), λ = compat.weight, a and b from `config.lce`
    (1 and 1, AdvBCT's port of LCE)."""

    name = 'lce'
    needs_reference = True
    needs_class_stats = True
    config_sections = ('compat', 'lce')

    @staticmethod
    def config_defaults():
        # Each term also carries λ = compat.weight.
        return {
            'lce': dict(
                align_weight=1.0,  # AdvBCT's port of LCE (LCE's official code: 100)
                boundary_weight=1.0,
                align_over='batch',  # batch (AdvBCT) | classes (LCE's official code)
                boundary_space='angle',  # angle (AdvBCT) | cosine (LCE's official code)
            )
        }

    def check(self):
        c = self.config.lce
        for field, allowed in (('align_over', ALIGN_OVER), ('boundary_space', BOUNDARY_SPACES)):
            require(c[field] in allowed, f'lce.{field}', c[field], f'one of {allowed}')
        for field in ('align_weight', 'boundary_weight'):
            require(c[field] >= 0, f'lce.{field}', c[field], '>= 0')

    @property
    def weights(self):
        c, lam = self.config.lce, self.config.compat.weight
        return {'align': lam * c.align_weight, 'boundary': lam * c.boundary_weight}

    def terms(self, inputs, reference, state):
        c = self.config.lce
        valid = class_valid(reference)
        align = alignment_loss(
            inputs.params['classifier']['kernel'],
            inputs.labels,
            reference.prototypes,
            valid,
            over=c.align_over,
            num_classes=inputs.num_classes,
        )
        boundary = boundary_loss(
            inputs.emb,
            inputs.labels,
            reference.prototypes,
            reference.class_stats['max_angle'],
            valid,
            space=c.boundary_space,
        )
        return {'align': align, 'boundary': boundary}, state
