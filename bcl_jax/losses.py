"""Classification and compatibility losses (method.md §3), as pure functions of arrays.

All embeddings are L2-normalised by the model. Every loss returns the mean over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bcl_jax.models.heads import l2_normalize

HEADS = ('softmax', 'cosface', 'arcface')


def margin_logits(logits, labels, *, kind: str, scale: float, margin: float):
    """Logits after the head's margin: plain for softmax; s·(cos − m) or s·cos(θ + m) on the target."""
    if kind == 'softmax':
        return logits
    target = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    if kind == 'cosface':
        return scale * jnp.where(target, logits - margin, logits)
    if kind == 'arcface':
        cos = jnp.clip(logits, -1.0 + 1e-7, 1.0 - 1e-7)
        with_margin = jnp.cos(jnp.arccos(cos) + margin)
        # Past θ = π − m, cos(θ + m) stops decreasing; fall back to the CosFace-like penalty there.
        with_margin = jnp.where(
            cos > jnp.cos(jnp.pi - margin), with_margin, cos - margin * jnp.sin(margin)
        )
        return scale * jnp.where(target, with_margin, cos)
    raise ValueError(f'unknown head {kind!r}; use one of {HEADS}')


def class_mask(logits, num_classes: int | None):
    """True for real classes: columns from `num_classes` on are padding (see bcl_jax.sharding)."""
    if num_classes is None or num_classes == logits.shape[-1]:
        return None
    return jnp.arange(logits.shape[-1]) < num_classes


def cross_entropy(logits, labels, *, num_classes: int | None = None):
    """Per-sample softmax cross-entropy, written for logits sharded by class.

    The target logit is picked by a one-hot mask and a sum, elementwise on each device's classes
    and then one reduction, not by a gather; the log-sum-exp is a max and a sum over classes.
    Nothing (B, C)-sized is gathered when the class axis is sharded. Columns from `num_classes`
    on (padding) are left out.
    """
    z = logits.astype(jnp.float32)
    valid = class_mask(z, num_classes)
    if valid is not None:
        z = jnp.where(valid, z, -jnp.inf)
    target = jax.nn.one_hot(labels, z.shape[-1], dtype=bool)
    return jax.nn.logsumexp(z, axis=-1) - jnp.sum(jnp.where(target, z, 0.0), axis=-1)


def classification_loss(
    logits,
    labels,
    *,
    kind: str,
    scale: float = 30.0,
    margin: float = 0.3,
    num_classes: int | None = None,
):
    """L_cls: softmax cross-entropy over a classifier's logits (cosines for cosface/arcface).

    `num_classes`: the real classes when the class axis carries padding (bcl_jax.sharding).
    """
    z = margin_logits(logits, labels, kind=kind, scale=scale, margin=margin)
    return cross_entropy(z, labels, num_classes=num_classes).mean()


def compatibility_loss(
    emb,
    labels,
    prototypes,
    *,
    temperature: float = 0.07,
    positive_prototypes=None,
    num_classes: int | None = None,
):
    """L_comp: cross-entropy of the new embedding against the old prototypes as a classifier.

    `prototypes` (C, D) are the negatives (and positives unless given apart);
    `positive_prototypes` (C, D), when given, replace the ground-truth class's prototype: with the
    perturbed bank this is NDPP/ODPP, without it plain prototype BCT. Rows from `num_classes` on
    are padding. With class-sharded banks the logits stay sharded by class: the positive
    prototype is a row lookup (a masked local gather and a (B, D) sum over devices), placed by a
    one-hot mask.
    """
    logits = emb @ prototypes.T
    if positive_prototypes is not None:
        positive = jnp.sum(emb * positive_prototypes[labels], axis=-1)
        target = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
        logits = jnp.where(target, positive[:, None], logits)
    return cross_entropy(logits / temperature, labels, num_classes=num_classes).mean()


def influence_loss(
    old_logits,
    labels,
    old_label,
    *,
    kind: str,
    scale: float = 30.0,
    margin: float = 0.3,
    num_classes: int | None = None,
):
    """Classic BCT (Shen et al. 2020): the frozen old classifier applied to new embeddings.

    `old_logits` (B, C_old) come from the old classifier on the new embeddings; `old_label` maps new
    labels to old ones (-1: a class the old model never saw, left out of the mean).
    `num_classes`: the old model's real classes when its class axis carries padding.
    """
    mapped = old_label[labels]
    valid = mapped >= 0
    target = jnp.maximum(mapped, 0)
    z = margin_logits(old_logits, target, kind=kind, scale=scale, margin=margin)
    per_sample = cross_entropy(z, target, num_classes=num_classes)
    return jnp.sum(jnp.where(valid, per_sample, 0.0)) / jnp.maximum(valid.sum(), 1)


def l2_loss(emb, old_emb):
    """L2 regression baseline: ||f − normalize(φ_o(x))||², averaged over the batch."""
    return jnp.mean(jnp.sum((emb - l2_normalize(old_emb)) ** 2, axis=-1))
