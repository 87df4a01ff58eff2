"""AdvBCT: adversarial alignment of the new embedding distribution with an elastic boundary
(Pan et al., "Boundary-Aware Backward-Compatible Representation via Adversarial Learning in Image
Retrieval", CVPR 2023).

Two terms beside the new model's classification loss:

- the adversarial loss: a small discriminator tells old embeddings (label 1) from new ones
  (label 0); the new embeddings reach it through a gradient reversal layer, so one descent step
  on the loss trains the discriminator to separate the two and the new model to make them
  inseparable (`gradient_reversal`, `init_discriminator`, `discriminator_logits`,
  `adversarial_loss`, schedules `reversal_scale` and `adversarial_weight`);
- the elastic boundary: a new embedding must lie within its class's old radius around the old
  class centre, the radius moved towards a threshold T by a learned per-class gate
  (`elastic_radius`, `init_boundary_weights`, `elastic_boundary_loss`). Radii and centres are
  the statistics of bcl_jax.methods.lce, with 'distance' radii.

How the reference trains it (GitHub Ashespt/AdvBCT, `models/base_model.py` `CreateBaseModel`,
`models/modules.py`, `trainer/trainer.py` with TRAIN.TYPE 'adv_compatible', `train.py`): the
discriminator and the per-class boundary weights are parameters of the new model, updated by the
model's own optimizer (SGD, lr 0.1, momentum 0.9, weight decay 5e-4 on them too, lr ×0.1 at
epochs 5, 10, 20) from the one total loss

    L = L_cls + L_boundary + w_e · L_adv,   w_e = (E − e + 1) / E  (epoch e counted from 0),

with the reversal scale α = 2 / (1 + exp(−10 p)) − 1, p the fraction of training done. There is
no separate discriminator optimizer or schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bcl_jax.class_stats import check_batch, class_valid, masked_mean
from bcl_jax.errors import require
from bcl_jax.methods.base import Method, old_embeddings, register
from bcl_jax.stage import steps_of

__all__ = [
    'adversarial_loss',
    'adversarial_weight',
    'discriminator_logits',
    'elastic_boundary_loss',
    'elastic_radius',
    'gradient_reversal',
    'init_boundary_weights',
    'init_discriminator',
    'reversal_scale',
]

NEW, OLD = 0, 1  # the discriminator's labels (reference: model_label_new = 0, model_label_old = 1)


# ----------------------------------------------------------------------------------------------
# Gradient reversal and schedules
# ----------------------------------------------------------------------------------------------


@jax.custom_vjp
def gradient_reversal(x, scale):
    """Identity forward; backward multiplies the incoming gradient by −`scale` (Ganin &
    Lempitsky's reversal layer; AdvBCT `models/modules.py` `ReverseLayerF`). `scale` gets no
    gradient."""
    return x


def _reversal_fwd(x, scale):
    return x, scale


def _reversal_bwd(scale, g):
    return -scale * g, jnp.zeros_like(scale)


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


def reversal_scale(progress):
    """α = 2 / (1 + exp(−10 p)) − 1 for the fraction p ∈ [0, 1] of training done (AdvBCT
    `trainer.py`: p = (batch + epoch · batches) / (epochs · batches)); 0 at the start, → 1."""
    return 2.0 / (1.0 + jnp.exp(-10.0 * progress)) - 1.0


def adversarial_weight(epoch, num_epochs: int):
    """w_e = (E − e + 1) / E for epoch e counted from 0 (AdvBCT `trainer.py`:
    `model_loss * (n_epoch - epoch + 1) / n_epoch`): (E + 1)/E at first, 2/E in the last epoch."""
    return (num_epochs - epoch + 1) / num_epochs


# ----------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------


def _linear_init(key, fan_in: int, fan_out: int):
    """PyTorch's default nn.Linear init: weight and bias ~ U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / jnp.sqrt(fan_in)
    k_w, k_b = jax.random.split(key)
    return {
        'kernel': jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
        'bias': jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound),
    }


def init_discriminator(key, dim: int, *, hidden: int = 100):
    """Parameters of the discriminator Linear(dim, hidden) → BatchNorm → ReLU → Linear(hidden, 2)
    (AdvBCT `CreateBaseModel`: d_fc1, d_bn1, d_relu1, d_fc2; hidden 100), PyTorch's init."""
    k1, k2 = jax.random.split(key)
    return {
        'fc1': _linear_init(k1, dim, hidden),
        'bn': {
            'scale': jnp.ones((hidden,), jnp.float32),
            'bias': jnp.zeros((hidden,), jnp.float32),
        },
        'fc2': _linear_init(k2, hidden, 2),
    }


def discriminator_logits(params, x, *, eps: float = 1e-5):
    """The discriminator's logits (B, 2) for embeddings `x` (B, D), 0: new, 1: old.

    The hidden BatchNorm normalises with the statistics of this batch (biased variance, eps
    1e-5), as PyTorch's training mode: each call is normalised on its own batch, so the old and
    the new embeddings get separate statistics as in the reference's two calls. With the batch
    sharded, the statistics are over the global batch (the reference's SyncBatchNorm). No
    running averages are kept: the discriminator is never used outside training.
    """
    h = x @ params['fc1']['kernel'] + params['fc1']['bias']
    mean = jnp.mean(h, axis=0)
    var = jnp.mean(jnp.square(h - mean), axis=0)
    h = (h - mean) * jax.lax.rsqrt(var + eps) * params['bn']['scale'] + params['bn']['bias']
    return jax.nn.relu(h) @ params['fc2']['kernel'] + params['fc2']['bias']


def adversarial_loss(params, new_emb, old_emb, *, reversal: float = 1.0):
    """L_adv = NLL(D(R_α(f)), new) + NLL(D(sg(o)), old), each the batch mean.

    D the discriminator (`discriminator_logits`, log-softmax inside the loss), f the new
    embeddings, o the old model's embeddings of the same batch (no gradient), R_α the gradient
    reversal with α = `reversal` (`reversal_scale`). Its gradient trains the discriminator
    (descent) and pushes the new model to fool it (ascent, scaled by α).

    Source: AdvBCT `trainer.py` (`model_loss = NLLLoss(model_score_new, 0) +
    NLLLoss(model_score_old, 1)`) and `base_model.py` (`ReverseLayerF.apply(feature, alpha)`).
    The reference feeds the new model's embedding BEFORE L2 normalisation and the old model's
    raw output; MixBCT's re-implementation (yuleung/MixBCT `BCT_Methods/AdvBCT/backbone/
    iresnet_advBCT.py`) feeds both L2-normalised, which is what bcl_jax's models give.
    """
    if new_emb.shape != old_emb.shape:
        raise ValueError(
            f'advbct.adversarial_loss: new {new_emb.shape} and old {old_emb.shape} embeddings '
            'must have the same (B, D)'
        )
    new = discriminator_logits(params, gradient_reversal(new_emb, jnp.asarray(reversal)))
    old = discriminator_logits(params, jax.lax.stop_gradient(old_emb))
    nll_new = -jnp.mean(jax.nn.log_softmax(new, axis=-1)[:, NEW])
    nll_old = -jnp.mean(jax.nn.log_softmax(old, axis=-1)[:, OLD])
    return nll_new + nll_old


# ----------------------------------------------------------------------------------------------
# Elastic boundary
# ----------------------------------------------------------------------------------------------


def init_boundary_weights(key, num_classes: int):
    """The per-class gate parameters w (C,) ~ U(−1, 1) (AdvBCT `modules.py` `ElasticBoundary`)."""
    return jax.random.uniform(key, (num_classes,), jnp.float32, -1.0, 1.0)


def elastic_radius(max_radius, weights, *, threshold: float = 1.0):
    """r̃_c = r_c + (T − r_c)·σ(w_c): the old radius moved towards T by the learned gate.

    The reference writes it as r + |r − T|σ(w) when r < T and r − |r − T|σ(w) otherwise
    (AdvBCT `trainer.py` branch 'bct_limit' with ELASTIC_BOUNDARY), the same expression.
    T = TRAIN.THRESHOLD: 1.0 in `configs/new_AdvBct.yml` (0.5 in `configs/defaults.py`).
    """
    return max_radius + (threshold - max_radius) * jax.nn.sigmoid(weights)


def elastic_boundary_loss(
    emb,
    labels,
    prototypes,
    centre_norms,
    max_radius,
    class_valid,
    weights=None,
    *,
    threshold: float = 1.0,
):
    """L_boundary = Σ_i h_i / #{i : h_i > 0},  h_i = max(||f_i − m_y p_y|| − r̃_y, 0),

    over the samples i of valid classes (`class_valid`: old statistics with `kept >= 2`), f_i the
    new embedding, m_y p_y the unnormalised old class centre (`class_stats.class_centres`), r̃_y the
    elastic radius from the 'distance' `max_radius` (`class_stats.class_radii`, 1.5·IQR rule) and the
    trained gate `weights` (C,), or the fixed r_y when `weights` is None.

    The mean is over the samples OUTSIDE their boundary, not over the batch (reference:
    `if tmp > 0.: limit_loss += tmp; cnt += 1` then `limit_loss /= cnt`); 0 when none is.
    The gradient reaches `weights` through r̃ and grows r̃ towards T wherever a sample is
    outside; only weight decay pulls the gate back. Source: AdvBCT `trainer.py`, COMP_LOSS.TYPE
    'bct_limit' with ELASTIC_BOUNDARY (the AdvBCT config), weight 1 (MixBCT's face
    re-implementation: ×4). AdvBCT's non-elastic branch uses the SMALLEST kept radius instead of
    r_y (`['radius'][0]`); pass that as `max_radius` to reproduce it.
    """
    check_batch('advbct.elastic_boundary_loss', emb, labels, prototypes)
    centre = centre_norms[labels][:, None] * prototypes[labels]
    diff = emb - centre
    # sqrt at 0 has an infinite slope: a unit f can only sit on a centre of norm 1.
    distance = jnp.sqrt(jnp.maximum(jnp.sum(diff * diff, axis=-1), 1e-12))
    radius = max_radius[labels]
    if weights is not None:
        radius = elastic_radius(radius, weights[labels], threshold=threshold)
    hinge = jnp.maximum(distance - radius, 0.0)
    return masked_mean(hinge, class_valid[labels] & (hinge > 0))


@register
class AdvBCT(Method):
    """`advbct`: L_cls + λ·(b·L_boundary + a·w_e·L_adv), λ = compat.weight, a and b from
    `config.advbct` (1 and 1, AdvBCT's config), w_e and the reversal scale α on the reference's
    schedules. The discriminator and the per-class boundary gates are trained with the model by
    its own optimizer (weight decay and momentum included), as in the reference."""

    name = 'advbct'
    needs_reference = True
    needs_class_stats = True
    config_sections = ('compat', 'advbct')

    @staticmethod
    def config_defaults():
        # Each term also carries λ = compat.weight.
        return {
            'advbct': dict(hidden=100, threshold=1.0, boundary_weight=1.0, adversarial_weight=1.0)
        }

    def check(self):
        c = self.config.advbct
        require(c.hidden >= 1, 'advbct.hidden', c.hidden, '>= 1')
        for field in ('boundary_weight', 'adversarial_weight'):
            require(c[field] >= 0, f'advbct.{field}', c[field], '>= 0')

    @property
    def weights(self):
        c, lam = self.config.advbct, self.config.compat.weight
        return {'boundary': lam * c.boundary_weight, 'adv': lam * c.adversarial_weight}

    def init_state(self, stage, reference):
        self.total_steps, self.steps_per_epoch = steps_of(stage.train_cfg, len(stage.source))
        self.epochs = max(1, int(round(self.total_steps / self.steps_per_epoch)))
        disc_key, gate_key = jax.random.split(jax.random.fold_in(jax.random.key(stage.seed), 1))
        dim = stage.model_cfg.embedding_dim
        params = dict(
            disc=init_discriminator(disc_key, dim, hidden=self.config.advbct.hidden),
            # Indexed by class: sharded with the classifier (bcl_jax.sharding's 'banks').
            banks=dict(gates=init_boundary_weights(gate_key, stage.num_classes)),
        )
        return {'params': params}

    def terms(self, inputs, reference, state):

        c, stats = self.config.advbct, reference.class_stats
        boundary = elastic_boundary_loss(
            inputs.emb,
            inputs.labels,
            reference.prototypes,
            stats['centre_norms'],
            stats['max_distance'],
            class_valid(reference),
            state['params']['banks']['gates'],
            threshold=c.threshold,
        )
        progress = inputs.step / self.total_steps
        epoch = jnp.floor(inputs.step / self.steps_per_epoch)
        adv = adversarial_loss(
            state['params']['disc'],
            inputs.emb,
            old_embeddings(reference, inputs.images),
            reversal=reversal_scale(progress),
        )
        return {'boundary': boundary, 'adv': adversarial_weight(epoch, self.epochs) * adv}, state
