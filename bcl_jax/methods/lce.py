"""LCE: boundary-aware alignment of the new model to the old class centres (Meng et al., ICCV 2021).

Two loss terms, both read per-class statistics of the old model's embeddings that are computed
once before training, the way the old prototypes are:

- `alignment_loss`: the new classifier's weight vector for class c is pulled onto the old class
  centre direction p_c;
- `boundary_loss`: a new embedding must lie within the angular radius θ_c of its class's old
  embeddings around p_c.

The statistics (also used by AdvBCT's elastic boundary, bcl_jax.methods.advbct) come in two
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

from bcl_jax.methods.base import Method
from bcl_jax.models.heads import l2_normalize

__all__ = [
    'LCE',
    'alignment_loss',
    'boundary_loss',
    'check_batch',
    'class_centres',
    'class_radii',
    'masked_mean',
    'sample_radii',
]

METRICS = ('distance', 'angle')
OUTLIER_RULES = ('iqr', 'none')
_COS_LIMIT = 1.0 - 1e-7  # arccos has an infinite slope at ±1: keep its gradient finite


def masked_mean(values, mask):
    """Mean of `values` where `mask` is True; 0 when nothing is selected. Unselected values may
    be infinite (a `where`, not a product)."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1)


def _check_choice(name: str, value: str, allowed: tuple, where: str):
    if value not in allowed:
        raise ValueError(f'{where}: {name}={value!r}; use one of {allowed}')


def check_batch(where: str, emb, labels, bank):
    """Stops with a message naming `where` unless emb (B, D), labels (B,) and bank (C, D) agree."""
    if (
        emb.ndim != 2
        or labels.shape != emb.shape[:1]
        or bank.ndim != 2
        or bank.shape[1] != emb.shape[1]
    ):
        raise ValueError(
            f'{where}: embeddings {emb.shape}, labels {labels.shape} and class bank {bank.shape} '
            'must be (B, D), (B,) and (C, D)'
        )


# ----------------------------------------------------------------------------------------------
# Per-class statistics of the old embeddings (computed once, before training)
# ----------------------------------------------------------------------------------------------


def class_centres(sums, counts):
    """Class centres from per-class sums of unit old embeddings (`prototypes.class_sums`).

    The centre c_c is the mean of class c's L2-normalised old embeddings, NOT normalised (AdvBCT
    `extract_feat.py`: `center = mean(...)`, the line normalising it is commented out). Returns
    (p, m): the unit directions p_c = c_c / ||c_c|| (C, D), which are bcl_jax's old prototypes
    when computed over the same images, and the norms m_c = ||c_c|| (C,) ∈ [0, 1]. A class
    without images (a new class, or a padding row) gets p_c = 0 and m_c = 0.
    """
    means = sums / jnp.maximum(counts, 1)[:, None]
    return l2_normalize(means), jnp.linalg.norm(means, axis=-1)


def sample_radii(old_emb, labels, prototypes, centre_norms, *, metric: str = 'distance'):
    """Each old embedding's radius around its class centre, (B,).

    'distance': ||f_i − m_y·p_y||, the Euclidean distance to the unnormalised centre (AdvBCT
    `gen_class_meta`, which AdvBCT's elastic boundary reads). 'angle': arccos(f_i·p_y), the
    angle to the centre direction (AdvBCT `gen_class_theta`, which its LCE reads), computed as
    2·atan2(||f − p||, ||f + p||), equal for unit vectors and exact near 0, where float32
    arccos(1 − ε) is off by up to 3e-4 rad.
    `old_emb`: the old model's L2-normalised embeddings of a batch of its training data.
    """
    _check_choice('metric', metric, METRICS, 'lce.sample_radii')
    check_batch('lce.sample_radii', old_emb, labels, prototypes)
    p = prototypes[labels]
    if metric == 'distance':
        return jnp.linalg.norm(old_emb - centre_norms[labels][:, None] * p, axis=-1)
    return 2.0 * jnp.arctan2(
        jnp.linalg.norm(old_emb - p, axis=-1), jnp.linalg.norm(old_emb + p, axis=-1)
    )


def class_radii(radii, labels, valid=None, *, num_classes: int, outlier_rule: str = 'iqr'):
    """Per class, the largest radius after outlier removal, and how many radii were kept.

    Returns (r_max (C,), kept (C,) int32); r_max = 0 for a class without radii.

    'iqr' (AdvBCT `gen_class_meta` / `gen_class_theta`): a class's n radii sorted ascending,
    q1 = r[⌊n/4⌋], q3 = r[⌊3n/4⌋] (0-based), and radii outside [q1 − 1.5(q3 − q1),
    q3 + 1.5(q3 − q1)] dropped; classes with n < 4 keep all. Needs all of a class's radii at
    once: call it once over the whole data set's per-image radii. 'none': the plain maximum
    (LCE's official `save_lcefeat`, which keeps the minimum cosine); per-batch results combine
    by `jnp.maximum` and `+`. The reference skips a class with `kept <= 1` in both LCE's and
    AdvBCT's losses: pass `class_valid = kept >= 2` to them.

    `valid` (B,) bool leaves rows out (padding, or images of classes the old model never saw).
    The sort is over all N radii with the class as the primary key, so any N fits in one call.
    """
    _check_choice('outlier_rule', outlier_rule, OUTLIER_RULES, 'lce.class_radii')
    if radii.ndim != 1 or labels.shape != radii.shape:
        raise ValueError(
            f'lce.class_radii: radii {radii.shape} and labels {labels.shape} must be (N,)'
        )
    if valid is None:
        valid = jnp.ones(radii.shape, bool)
    segment = jnp.where(valid, labels, num_classes)  # left-out rows go to a dropped extra class
    counts = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_classes + 1)
    keep = valid
    if outlier_rule == 'iqr':
        ordered = radii[jnp.lexsort((radii, segment))]
        starts = jnp.cumsum(counts) - counts
        last = radii.shape[0] - 1
        q1 = ordered[jnp.clip(starts + counts // 4, 0, last)]
        q3 = ordered[jnp.clip(starts + (3 * counts) // 4, 0, last)]
        low, high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
        inside = (radii >= low[segment]) & (radii <= high[segment])
        keep = valid & ((counts[segment] < 4) | inside)
    largest = jax.ops.segment_max(jnp.where(keep, radii, -jnp.inf), segment, num_classes + 1)
    kept = jax.ops.segment_sum(keep.astype(jnp.int32), segment, num_classes + 1)[:num_classes]
    return jnp.where(kept > 0, largest[:num_classes], 0.0), kept


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
    _check_choice('over', over, ('batch', 'classes'), 'lce.alignment_loss')
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
    _check_choice('space', space, ('angle', 'cosine'), 'lce.boundary_loss')
    check_batch('lce.boundary_loss', emb, labels, prototypes)
    cos = jnp.sum(emb * prototypes[labels], axis=-1)
    theta = max_angle[labels]
    if space == 'angle':
        gap = jnp.arccos(jnp.clip(cos, -_COS_LIMIT, _COS_LIMIT)) - theta
    else:
        gap = jnp.cos(theta) - cos
    return masked_mean(jnp.maximum(gap, 0.0), class_valid[labels])


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


def class_valid(reference):
    """Classes whose old statistics the references use: seen by the old model, >= 2 radii kept."""
    return reference.class_stats['kept'] >= 2


class LCE(Method):
    """`lce`: L_cls + λ·(a·L_align + b·L_boundary), λ = compat.weight, a and b from `config.lce`
    (1 and 1, AdvBCT's port of LCE)."""

    name = 'lce'
    needs_reference = True
    needs_class_stats = True
    config_sections = ('compat', 'lce')

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
