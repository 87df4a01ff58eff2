"""UniBCT: structural prototype refinement and a prototype compatibility loss (Zhang et al., IJCAI 2022).

UniBCT replaces each old class prototype by the mean of the class's old embeddings after
propagating them over a graph whose edges come from the NEW model's embeddings of the same
images, so that noisy old embeddings are smoothed by the new model's view of the class; the new
model is then trained against these prototypes.

- `refine_prototypes`: the refinement, on classes laid out as padded groups of images;
- `compatibility_loss`: the new embedding classified by the (refined) old prototypes.

A property worth knowing before running the refinement: in MixBCT's form (the affinity softmax
taken over each column, `normalize_over='columns'`) every column of the propagation matrix
(1 − λ)(I − λA)⁻¹ sums to 1, so the MEAN of the refined embeddings equals the mean of the
unrefined ones: the refined prototype is exactly the class mean of the old embeddings, whatever
the new model. The refinement then only changes what MixBCT does not use (the individual
refined embeddings), and with unit prototypes UniBCT in this form is prototype classification
against the plain old class means. `normalize_over='rows'` (row-stochastic A, the usual
label-propagation form) weights each old embedding by its centrality in the new model's graph;
it is not taken from any code read for bcl_jax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bcl_jax import losses
from bcl_jax.class_stats import check_batch, masked_mean
from bcl_jax.errors import require
from bcl_jax.methods.base import Method, register
from bcl_jax.models.heads import l2_normalize

__all__ = ['compatibility_loss', 'propagation_matrix', 'refine_prototypes']

_SELF = -1e9  # MixBCT fills the affinity diagonal with -1e9 (finite: a one-image class works)


def propagation_matrix(
    new_emb, mask, *, lam: float = 0.9, temperature: float = 0.05, normalize_over: str = 'columns'
):
    """(1 − λ)(I − λA)⁻¹ for one padded group of a class's images, (n, n).

    A = softmax(F Fᵀ / τ) over the rows of each column ('columns', MixBCT's
    `torch.softmax(edges, dim=0)`) or over the columns of each row ('rows'), F the new model's
    embeddings (n, D), the diagonal set to −1e9 before the softmax and padding rows and columns
    (`mask` False) left out. The padding block of the result is (1 − λ)·I, so padding rows
    never mix with real ones.
    """
    if normalize_over not in ('columns', 'rows'):
        raise ValueError(
            f"unibct.propagation_matrix: normalize_over={normalize_over!r}; use 'columns' or 'rows'"
        )
    n = new_emb.shape[0]
    pair = mask[:, None] & mask[None, :]
    logits = jnp.where(jnp.eye(n, dtype=bool), _SELF, new_emb @ new_emb.T / temperature)
    logits = jnp.where(pair, logits, -jnp.inf)
    affinity = jax.nn.softmax(logits, axis=0 if normalize_over == 'columns' else 1)
    affinity = jnp.where(pair, affinity, 0.0)  # an all-padding column's softmax is NaN
    eye = jnp.eye(n, dtype=new_emb.dtype)
    return (1.0 - lam) * jnp.linalg.solve(eye - lam * affinity, eye)


def refine_prototypes(
    old_emb,
    new_emb,
    mask,
    *,
    lam: float = 0.9,
    temperature: float = 0.05,
    normalize_over: str = 'columns',
):
    """UniBCT's refined prototypes of G classes, (G, D) unit rows.

    `old_emb`, `new_emb` (G, n, D): the old and the new model's L2-normalised embeddings of the
    same images, class g's images in row g, padded to n with `mask` (G, n) False; for each class

        Ṽ = (1 − λ)(I − λA)⁻¹ V,   prototype = normalize(mean over the class's images of Ṽ)

    with V the old embeddings and A from the new ones (`propagation_matrix`). A class with no
    image gets a zero row. Cost: one n × n solve per class; at GLDv2 scale group the classes by
    size. Defaults λ = 0.9, τ = 0.05 are MixBCT's.

    Source: GitHub yuleung/MixBCT `BCT_Methods/UniBCT/refine_prototype.py`
    `PrototypeGeneration` (its Eq. (9), (10)), run with the current new model at epochs 10 and
    20 (`BCT_Methods/UniBCT/train.py`). Choices: the inputs are unit embeddings (MixBCT feeds
    raw, unnormalised features to both the graph and the mean), and the prototype is
    normalised (MixBCT keeps the raw mean, whose norm then scales that class's logits in its
    unscaled prototype classifier). With the default 'columns' the result equals the
    normalised class mean of `old_emb` (see the module docstring).
    """
    if old_emb.shape != new_emb.shape or old_emb.ndim != 3 or mask.shape != old_emb.shape[:2]:
        raise ValueError(
            f'unibct.refine_prototypes: old_emb {old_emb.shape}, new_emb {new_emb.shape} and mask '
            f'{mask.shape} must be (G, n, D), (G, n, D) and (G, n)'
        )
    propagate = jax.vmap(
        lambda f, m: propagation_matrix(
            f, m, lam=lam, temperature=temperature, normalize_over=normalize_over
        )
    )(new_emb, mask)
    refined = jnp.einsum('gij,gjd->gid', propagate, jnp.where(mask[..., None], old_emb, 0.0))
    total = jnp.sum(jnp.where(mask[..., None], refined, 0.0), axis=1)
    return l2_normalize(total / jnp.maximum(mask.sum(axis=1), 1)[:, None])


def _first_old_class(old_label):
    return jnp.argmax(old_label >= 0)


def compatibility_loss(
    emb,
    labels,
    prototypes,
    *,
    old_label=None,
    kind: str = 'arcface',
    scale: float = 30.0,
    margin: float = 0.3,
    num_classes: int | None = None,
):
    """L_uni: cross-entropy of the new embedding against the old prototypes as a classifier.

    Logits s·cos(θ_ic + m·[c = y_i]) (ArcFace, default), s·(cos θ_ic − m·[c = y_i]) (CosFace)
    or cos θ_ic ('softmax': no scale, no margin) with cos θ_ic = f_i·p_c, `prototypes` (C, D)
    unit rows indexed by the new label (refined or not; bcl_jax's old prototype bank).

    `old_label` (C,), when given (AdvBCT's `uni_bct`, default there): the softmax runs over the
    old model's classes only (columns with old_label ≥ 0) and only samples of those classes
    count, the batch mean taken over them. Without it (MixBCT's UniBCT) every class and sample
    counts. Columns from `num_classes` on are padding and left out.

    Sources: Ashespt/AdvBCT `trainer/trainer.py`, branch `COMP_LOSS.TYPE == 'uni_bct'`:
    ArcFace with LOSS.SCALE = 30, LOSS.MARGIN = 0.3 on normalised old centres, samples with
    label < OLD_MODEL.NUM_CLASSES, unrefined prototypes, weight 1, from the first step.
    yuleung/MixBCT `BCT_Methods/UniBCT` (`backbones/iresnet_bct.py` `BCT_FC`, `train.py`):
    plain cross-entropy of normalize(f)·P over all classes (kind='softmax'), weight 0 before
    epoch 10, then 1 with the prototypes refined at epochs 10 and 20. bcl_jax's ArcFace falls
    back to cos θ − m·sin m past θ = π − m, which AdvBCT's `margin_softmax.arcface` does not.
    """
    check_batch('unibct.compatibility_loss', emb, labels, prototypes)
    cos = jnp.clip(emb @ prototypes.T, -1.0, 1.0)
    if old_label is None:
        z = losses.margin_logits(cos, labels, kind=kind, scale=scale, margin=margin)
        return losses.cross_entropy(z, labels, num_classes=num_classes).mean()
    counted = old_label[labels] >= 0
    # A new-class sample's target column is masked out; aim it at an old class to keep its
    # (unused) loss finite.
    target = jnp.where(counted, labels, _first_old_class(old_label))
    z = losses.margin_logits(cos, target, kind=kind, scale=scale, margin=margin)
    z = jnp.where(old_label >= 0, z, -jnp.inf)
    return masked_mean(losses.cross_entropy(z, target, num_classes=num_classes), counted)


@register
class UniBCT(Method):
    """`unibct`: L_cls + λ·L_uni on the old prototypes, λ = compat.weight; `config.unibct`
    chooses AdvBCT's form (default: ArcFace s = 30, m = 0.3, old classes only) or MixBCT's
    (`kind='softmax'`, `old_classes_only=False`). The refinement is left out: in MixBCT's
    column-normalised form it returns the plain class means, the prototypes as they are."""

    name = 'unibct'
    needs_reference = True
    config_sections = ('compat', 'unibct')

    @staticmethod
    def config_defaults():
        # AdvBCT's form; each term also carries λ = compat.weight.
        return {'unibct': dict(kind='arcface', scale=30.0, margin=0.3, old_classes_only=True)}

    def check(self):
        c = self.config.unibct
        require(c.kind in losses.HEADS, 'unibct.kind', c.kind, f'one of {losses.HEADS}')
        require(c.scale > 0, 'unibct.scale', c.scale, '> 0')

    @property
    def weights(self):
        return {'uni': self.config.compat.weight}

    def terms(self, inputs, reference, state):
        c = self.config.unibct
        old_label = None
        if c.old_classes_only:  # padded like the bank's class axis (new classes: -1)
            rows = reference.prototypes.shape[0]
            old_label = jnp.pad(
                reference.old_label, (0, rows - reference.old_label.shape[0]), constant_values=-1
            )
        term = compatibility_loss(
            inputs.emb,
            inputs.labels,
            reference.prototypes,
            old_label=old_label,
            kind=c.kind,
            scale=c.scale,
            margin=c.margin,
            num_classes=inputs.num_classes,
        )
        return {'uni': term}, state
