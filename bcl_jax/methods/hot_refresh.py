"""Hot-refresh model upgrades: RACT's loss and the backfilling order (Zhang et al., ICLR 2022).

In a hot-refresh upgrade the new model serves queries at once while the gallery is re-embedded
("backfilled") bit by bit, so queries meet a mix of old and new gallery embeddings. RACT
(regression-alleviating compatible training) asks each new embedding to be closer to its own
image's old embedding than to the old AND the new embeddings of other classes, so that
backfilling a gallery item cannot push a wrong new neighbour above a right old one.

- `ract_loss`: the contrastive loss (OpenCompatible `contra_ract`); needs the old model's
  embeddings of the same batch.
- `gallery_uncertainty` and `backfill_order`: the order in which the method re-embeds the
  gallery, most uncertain old embedding first; `backfill_mask` marks the first n of an order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bcl_jax import losses, sharding
from bcl_jax.errors import require
from bcl_jax.methods.base import Method, old_embeddings, register
from bcl_jax.models.heads import l2_normalize

__all__ = ['backfill_mask', 'backfill_order', 'gallery_uncertainty', 'ract_loss']

_MASKED = 1e9  # the reference subtracts 1e9 from same-class logits rather than using -inf


def ract_loss(
    emb,
    old_emb,
    labels,
    *,
    temperature: float = 0.01,
    topk_negatives: int = 10,
    stop_gradient_negatives: bool = True,
):
    """L_RACT, the new-to-old contrastive loss with new-to-old and new-to-new negatives.

    For sample i with new embedding f_i, the old model's embedding o_i of the same image, τ the
    temperature and N_i the batch samples of other classes:

        L = −(1/B) Σ_i log( exp(f_i·o_i/τ) /
                (exp(f_i·o_i/τ) + Σ_{j∈K_o(i)} exp(f_i·o_j/τ) + Σ_{j∈K_n(i)} exp(f_i·f_j/τ)) )

    K_o(i), K_n(i): the `topk_negatives` largest of {f_i·o_j} and of {f_i·f_j} over j ∈ N_i
    (all of N_i when `topk_negatives <= 0`; k is capped at B). Same-class pairs, i itself
    included, are not negatives: their logits are lowered by 1e9 before the top-k, as in the
    reference, so a row with fewer than k negatives takes masked entries worth exp(−1e11) = 0.

    Source: GitHub TencentARC/OpenCompatible `model/loss.py` `calculate_loss`,
    `loss_type == 'contra_ract'` (the same code is AdvBCT's `hot_refresh` in Ashespt/AdvBCT
    `models/loss.py`), defaults τ = 0.01, k = 10 (`--comp_loss_temp`, `--comp_loss_topk`;
    AdvBCT `configs/defaults.py` COMP_LOSS.TEMPERATURE, TOPK_NEG). The reference gathers the
    batch from all GPUs with `all_gather`, which carries no gradient: a sample's loss moves
    only its own f_i, not the other samples' f_j it is compared with, and DDP's mean over GPUs
    makes it a mean over the global batch. `stop_gradient_negatives=True` (default) reproduces
    that on the global batch; False also differentiates through f_j. Old embeddings never get a
    gradient. `old_emb` is L2-normalised here (the reference normalises both).
    """
    if emb.shape != old_emb.shape or labels.shape != emb.shape[:1]:
        raise ValueError(
            f'hot_refresh.ract_loss: emb {emb.shape}, old_emb {old_emb.shape} and labels '
            f'{labels.shape} must be (B, D), (B, D) and (B,)'
        )
    old = lax.stop_gradient(l2_normalize(old_emb))
    others = lax.stop_gradient(emb) if stop_gradient_negatives else emb
    same = labels[:, None] == labels[None, :]
    positive = jnp.sum(emb * old, axis=-1, keepdims=True)
    new_to_old = jnp.where(same, emb @ old.T - _MASKED, emb @ old.T)
    new_to_new = jnp.where(same, emb @ others.T - _MASKED, emb @ others.T)
    if topk_negatives > 0:
        k = min(topk_negatives, emb.shape[0])
        new_to_old, new_to_new = lax.top_k(new_to_old, k)[0], lax.top_k(new_to_new, k)[0]
    logits = jnp.concatenate([positive, new_to_old, new_to_new], axis=1) / temperature
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])


def gallery_uncertainty(old_logits, *, scale: float = 1.0, num_classes: int | None = None):
    """Uncertainty of each old gallery embedding: the entropy of the old classifier's softmax.

    u_g = −Σ_c π_gc log π_gc, π_g = softmax(s · z_g) over the old model's real classes, where
    z_g (`old_logits`, (N, C_old)) is the old classifier applied to the old gallery embedding
    and s its softmax scale (pass the head's scale for a cosface/arcface head, whose logits are
    cosines; 1 for a plain softmax head). No margin: it is a test-time prediction. Columns from
    `num_classes` on (padding) are left out.

    Source: the hot-refresh paper's uncertainty-based backfilling (Zhang et al., ICLR 2022,
    "backfill the gallery items with the most uncertain old features first"). Neither
    OpenCompatible nor AdvBCT's `evaluate/eval_hot_refresh.py` (random batches) holds that
    code, so the entropy of the old classifier is the reading taken here; any other score
    (e.g. 1 − max π) can be passed to `backfill_order` instead.
    """
    z = scale * old_logits.astype(jnp.float32)
    valid = losses.class_mask(z, num_classes)
    if valid is not None:
        z = jnp.where(valid, z, -jnp.inf)
    log_p = jax.nn.log_softmax(z, axis=-1)
    return -jnp.sum(jnp.where(jnp.isfinite(log_p), jnp.exp(log_p) * log_p, 0.0), axis=-1)


def backfill_order(uncertainty):
    """Gallery rows in backfilling order, (N,) int32: the most uncertain first, ties by row."""
    return jnp.argsort(-uncertainty, stable=True).astype(jnp.int32)


def backfill_mask(order, num_backfilled):
    """(N,) bool: True for the first `num_backfilled` rows of `order`, the rows re-embedded by
    the new model once that many are backfilled (`num_backfilled` may be traced)."""
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return rank < num_backfilled


@register
class HotRefresh(Method):
    """`hot_refresh`: L_cls + λ·L_RACT, λ = compat.weight, τ and k from `config.hot_refresh`
    (0.01 and 10, OpenCompatible's defaults). Its backfilling order is `gallery_uncertainty`."""

    name = 'hot_refresh'
    needs_reference = True
    config_sections = ('compat', 'hot_refresh')

    @staticmethod
    def config_defaults():
        return {'hot_refresh': dict(temperature=0.01, topk_negatives=10)}

    def check(self):
        c = self.config.hot_refresh
        require(c.temperature > 0, 'hot_refresh.temperature', c.temperature, '> 0')
        require(c.topk_negatives >= 1, 'hot_refresh.topk_negatives', c.topk_negatives, '>= 1')

    @property
    def weights(self):
        return {'ract': self.config.compat.weight}

    def terms(self, inputs, reference, state):
        c = self.config.hot_refresh
        term = ract_loss(
            inputs.emb,
            old_embeddings(reference, inputs.images),
            inputs.labels,
            temperature=c.temperature,
            topk_negatives=c.topk_negatives,
        )
        return {'ract': term}, state

    def uncertainty(self, old_model, old_gallery, block: int = 4096) -> np.ndarray:
        """The gallery rows most uncertain under the old classifier first (`gallery_uncertainty`,
        the old classifier's entropy), in blocks of rows: (N, C_old) logits are never held."""
        cfg, c = old_model.model_cfg, old_model.num_classes
        weights = sharding.unpad((old_model.params, old_model.batch_stats), c)  # on the host
        classifier = old_model.model(*weights).classifier
        scale = cfg.scale if cfg.head != 'softmax' else 1.0
        score = jax.jit(lambda x: gallery_uncertainty(classifier(x), scale=scale))
        rows = range(0, len(old_gallery), block)
        u = np.concatenate([np.asarray(score(old_gallery[i : i + block])) for i in rows])
        return np.asarray(backfill_order(u))

    backfill_order = uncertainty
