"""Per-class statistics of the old model's embeddings around its class prototypes, computed once
before training (`bcl_jax.prototypes.class_statistics`) and read by the methods that bound the
new embeddings by the old classes' spread (LCE, AdvBCT, UniBCT), with the helpers they share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bcl_jax.models.heads import l2_normalize

METRICS = ('distance', 'angle')
OUTLIER_RULES = ('iqr', 'none')
COS_LIMIT = 1.0 - 1e-7  # arccos has an infinite slope at ±1: keep its gradient finite


def masked_mean(values, mask):
    """Mean of `values` where `mask` is True; 0 when nothing is selected. Unselected values may
    be infinite (a `where`, not a product)."""
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1)


def check_choice(name: str, value: str, allowed: tuple, where: str):
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
    check_choice('metric', metric, METRICS, 'class_stats.sample_radii')
    check_batch('class_stats.sample_radii', old_emb, labels, prototypes)
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
    check_choice('outlier_rule', outlier_rule, OUTLIER_RULES, 'class_stats.class_radii')
    if radii.ndim != 1 or labels.shape != radii.shape:
        raise ValueError(
            f'class_stats.class_radii: radii {radii.shape} and labels {labels.shape} must be (N,)'
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


def class_valid(reference):
    """Classes whose old statistics the references use: seen by the old model, >= 2 radii kept."""
    return reference.class_stats['kept'] >= 2
