"""NDPP and ODPP as training methods (method.md §3-§6): L_comp with perturbed positive prototypes.

The perturbation itself is a pure function of prototype banks (bcl_jax.perturbation). Here is
what training adds around it:

- the method's state: the perturbed positives p̃ that L_comp reads, the running new-model
  prototypes q, and ODPP's state (Δ and its Adam moments), all (C, D) and sharded by class
  with the classifier;
- q as an EMA of per-class batch means, updated inside the step (`perturb.new_prototypes='ema'`),
  or an exact pass over the training set at each refresh ('exact');
- the refresh: from `perturb.start_epochs` on, every `perturb.refresh_every_epochs`, p̃ is
  recomputed from p and the current q (before the first refresh p̃ = p); each refresh is logged;
- at the end, the perturbation figure (`perturbation.png` in the stage's folder).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections.config_dict import placeholder

from bcl_jax import calibrate, odpp, perturbation, plots, prototypes, sharding
from bcl_jax.errors import ConfigError, require
from bcl_jax.methods.base import register
from bcl_jax.methods.bct import BCT
from bcl_jax.models.heads import l2_normalize


class Perturbed(BCT):
    """The refresh schedule and banks shared by NDPP and ODPP; `perturb` computes p̃:
    `perturb(old, new, banks, key, num_classes, search) -> (p̃, banks to keep, stats to log)`."""

    config_sections = ('compat', 'perturb')

    @staticmethod
    def config_defaults():
        # method.md §4-§6. NDPP: K, α, β each applied once, weights clamped at 0, j = c left out
        # of the new-space neighbours; the reference code's own arithmetic
        # (perturbation.ndpp_authors_mode) is alpha=0.16, beta=0.004, clamp_weights=False,
        # exclude_self=False. rho (method.md §11): a strength in nearest-neighbour distances;
        # when set, α is found by bisection on the old bank before training (bcl_jax.calibrate);
        # rho_beta likewise sets β (the new-space term on its own, at q = p). new_push: a second
        # push of p̃ away from its top-K new prototypes, scaled by α (the reference's).
        ndpp = dict(k=100, alpha=0.16, beta=0.004, clamp_weights=True, exclude_self=True)
        ndpp.update(new_push=False, rho=placeholder(float), rho_beta=placeholder(float))
        # ODPP: odpp.OdppOptions (method.md §5): J on p + Δ unnormalised, Δ solved afresh at
        # each refresh; normalize_in_objective and warm_start are the alternatives. method.md
        # §11: margin_old from a strength rho in nearest-neighbour distances (needs
        # pairs='neighbours' and normalize_in_objective=True), and with margin_new_quantile,
        # margin_new re-set at every refresh at the same quantile of the top-K new-prototype
        # similarities p_c·q_j (j ≠ c).
        odpp_fields = dataclasses.asdict(odpp.OdppOptions())
        odpp_fields.update(rho=placeholder(float), margin_new_quantile=False)
        perturb = dict(
            start_epochs=2.0,  # p̃ = p before this (perturb_start)
            refresh_every_epochs=1.0,  # recompute p̃ this often (refresh_every)
            new_prototypes='ema',  # ema: per-class EMA in the train state | exact: a data pass
            ema_decay=0.9,  # per appearance of a class in a batch
            exact_batch_size=256,
            perturb_negatives=False,  # True: L_comp uses p̃ for every class, not only the positive
            # unit: negatives are the unit prototypes; mean: unnormalised class means m_c·p_c
            # (m_c = norm of the mean unit old embedding)
            prototype_norm='unit',
            ndpp=ndpp,
            odpp=odpp_fields,
        )
        return {'perturb': perturb}

    def check(self):
        c = self.config.perturb
        require(
            c.new_prototypes in ('ema', 'exact'),
            'perturb.new_prototypes',
            c.new_prototypes,
            "'ema' or 'exact'",
        )
        require(0 <= c.ema_decay < 1, 'perturb.ema_decay', c.ema_decay, 'in [0, 1)')
        require(
            c.prototype_norm in ('unit', 'mean'),
            'perturb.prototype_norm',
            c.prototype_norm,
            "'unit' or 'mean'",
        )
        require(c.start_epochs >= 0, 'perturb.start_epochs', c.start_epochs, '>= 0')
        require(
            c.refresh_every_epochs > 0,
            'perturb.refresh_every_epochs',
            c.refresh_every_epochs,
            '> 0',
        )
        require(c.exact_batch_size > 0, 'perturb.exact_batch_size', c.exact_batch_size, '> 0')
        require(c.ndpp.k >= 1, 'perturb.ndpp.k', c.ndpp.k, '>= 1')
        for field in ('ndpp.rho', 'ndpp.rho_beta', 'odpp.rho'):
            method, name = field.split('.')
            rho = c[method][name]
            require(
                rho is None or 0 < rho <= calibrate.RHO_MAX,
                f'perturb.{field}',
                rho,
                f'unset, or in (0, {calibrate.RHO_MAX}] nearest-neighbour distances',
            )

    def __init__(self, config):
        super().__init__(config)
        self.calibration = {}  # what `calibrate` settles in `init_state`
        self.overshoot_warned = False

    def init_state(self, stage, reference):
        # Until the first refresh p̃ = p, and a class's new prototype starts at its old one.
        bank = sharding.to_host(reference.prototypes)[: stage.num_classes]
        # The settings a given rho asks for (deterministic: a resumed stage recomputes them).
        self.calibration = self.calibrate(bank, jax.random.key(stage.seed))
        self.overshoot_warned = False
        return {'banks': dict(positive=bank.copy(), new=bank.copy(), **self.own_banks(bank))}

    def calibrate(self, bank, key) -> dict:
        """The parameter that perturbs `bank` by the configured rho (method.md §11), with the
        realised rho; {} when no rho is set."""
        return {}

    def notes(self) -> dict:
        return {'calibration': self.calibration} if self.calibration else {}

    def own_banks(self, bank) -> dict:
        """The method's own (C, ...) state kept between refreshes."""
        return {}

    def positives(self, state):
        return state['banks']['positive']

    @property
    def needs_class_stats(self):
        return self.config.perturb.prototype_norm == 'mean'

    def negatives(self, reference, state):
        cfg = self.config.perturb
        bank = state['banks']['positive'] if cfg.perturb_negatives else reference.prototypes
        if cfg.prototype_norm == 'mean':  # unnormalised class means m_c·p_c (method.md §11)
            bank = bank * reference.class_stats['mean_norms'][:, None]
        return bank

    def terms(self, inputs, reference, state):
        terms, state = super().terms(inputs, reference, state)
        cfg = self.config.perturb
        if cfg.new_prototypes == 'ema':
            banks = state['banks']
            new = prototypes.ema_class_means(
                banks['new'], jax.lax.stop_gradient(inputs.emb), inputs.labels, decay=cfg.ema_decay
            )
            state = dict(state, banks=dict(banks, new=new))
        return terms, state

    def _due(self, step: int, steps_per_epoch: float) -> bool:
        cfg = self.config.perturb
        start = int(round(cfg.start_epochs * steps_per_epoch))
        every = max(1, int(round(cfg.refresh_every_epochs * steps_per_epoch)))
        return step >= start and (step - start) % every == 0

    def before_step(self, state, step, ctx):
        if not self._due(step, ctx.steps_per_epoch):
            return state, None
        banks = state['method']['banks']
        c = ctx.stage.num_classes
        layout, rows = banks['positive'].sharding, banks['positive'].shape[0]
        place = lambda x: jax.device_put(sharding.pad_rows(x, rows), layout)
        search = dict(mesh=ctx.mesh, axis=sharding.AXIS) if ctx.shard_classes else {}
        if self.config.perturb.new_prototypes == 'exact':
            new = place(
                prototypes.compute(
                    ctx.model(state),
                    ctx.stage.source,
                    num_classes=c,
                    mesh=ctx.mesh,
                    batch_size=self.config.perturb.exact_batch_size,
                    shard_classes=ctx.shard_classes,
                )
            )
            query = new
        else:
            new, query = banks['new'], l2_normalize(banks['new'])
        old = ctx.reference.prototypes
        key = jax.random.fold_in(jax.random.key(ctx.stage.seed), step)
        positive, own, stats = self.perturb(old, query, banks, key, c, search)
        scale = calibrate.nn_distance(old, num_classes=c, **search)  # ρ's unit
        positive = place(positive)
        stats = dict(
            perturbation.perturbation_stats(old, positive, num_classes=c, **search),
            **calibrate.readings(old, positive, scale, num_classes=c, **search),
            **stats,
        )
        warning = calibrate.overshoot(stats)
        if warning and not self.overshoot_warned:  # once per stage: every refresh is logged
            logging.warning('[%s] step %d: %s', ctx.stage.name, step, warning)
            self.overshoot_warned = True
        # Each array back where its predecessor lived (sharded by class, or replicated).
        own = jax.tree.map(
            lambda x, was: jax.device_put(x, was.sharding), own, {k: banks[k] for k in own}
        )
        banks = dict(banks, positive=positive, new=jax.device_put(new, layout), **own)
        return dict(state, method=dict(state['method'], banks=banks)), dict(
            event='refresh', **stats
        )

    def finish(self, state, ctx):
        if jax.process_index() != 0:
            return
        bank = lambda x: sharding.to_host(x)[: ctx.stage.num_classes]
        banks = state['method']['banks']
        plots.perturbation_figure(
            bank(ctx.reference.prototypes),
            bank(banks['positive']),
            bank(l2_normalize(banks['new'])),
            os.path.join(ctx.directory, 'perturbation.png'),
            title=f'{ctx.stage.name}: {self.name}',
        )


@register
class NDPP(Perturbed):
    name = 'ndpp'

    def calibrate(self, bank, key):
        cfg = self.config.perturb.ndpp
        push = dict(k=cfg.k, clamp_weights=cfg.clamp_weights)
        out = {}
        if cfg.rho is not None:
            out.update(calibrate.ndpp_alpha(bank, cfg.rho, **push))
        if cfg.rho_beta is not None:
            out.update(calibrate.ndpp_alpha(bank, cfg.rho_beta, term='beta', **push))
        return out

    def perturb(self, old, new, banks, key, num_classes, search):
        options = self.config.perturb.ndpp.to_dict()
        del options['rho'], options['rho_beta']
        options.update({k: v for k, v in self.calibration.items() if k in ('alpha', 'beta')})
        return perturbation.ndpp(old, new, num_classes=num_classes, **search, **options), {}, {}


@register
class ODPP(Perturbed):
    name = 'odpp'

    def check(self):
        super().check()
        c = self.config.perturb.odpp
        require(c.k >= 1, 'perturb.odpp.k', c.k, '>= 1')
        require(c.passes >= 0, 'perturb.odpp.passes', c.passes, '>= 0')
        try:
            self.options()  # its own checks: pairs, margins in [-1, 1], pairs_per_step, ...
        except ValueError as e:  # its message starts with the field: 'margin_old=2 is outside'
            field = str(e).split()[0].split('=')[0]
            raise ConfigError(f'perturb.odpp.{field}', c.get(field), str(e)) from None
        require(
            not c.margin_new_quantile or c.rho is not None,
            'perturb.odpp.margin_new_quantile',
            c.margin_new_quantile,
            'False unless perturb.odpp.rho is set (its quantile is the calibrated one)',
        )
        if c.rho is not None:
            for field, wanted in (('pairs', 'neighbours'), ('normalize_in_objective', True)):
                require(
                    c[field] == wanted,
                    f'perturb.odpp.{field}',
                    c[field],
                    f'{wanted!r} when perturb.odpp.rho is set (method.md §11)',
                )

    def options(self, **calibrated) -> odpp.OdppOptions:
        """The configured options, with calibrated margins where given."""
        options = self.config.perturb.odpp.to_dict()
        del options['rho'], options['margin_new_quantile']
        return odpp.OdppOptions(**{**options, **calibrated})

    def calibrate(self, bank, key):
        rho = self.config.perturb.odpp.rho
        return {} if rho is None else calibrate.odpp_margin(bank, rho, self.options(), key)

    def margins(self, old, new, num_classes, search) -> dict:
        """margin_old as calibrated and, with margin_new_quantile, margin_new at the calibrated
        quantile of this refresh's top-K similarities p_c·q_j, j ≠ c (method.md §11)."""
        if not self.calibration:
            return {}
        margins = {'margin_old': self.calibration['margin_old']}
        if self.config.perturb.odpp.margin_new_quantile:
            k = self.config.perturb.odpp.k
            sims = calibrate.neighbour_similarities(old, new, k, num_classes=num_classes, **search)
            margins['margin_new'] = float(jnp.quantile(sims, self.calibration['quantile']))
        return margins

    def own_banks(self, bank):
        return {'odpp': jax.tree.map(np.asarray, odpp.odpp_initial_state(*bank.shape))}

    def perturb(self, old, new, banks, key, num_classes, search):
        margins = self.margins(old, new, num_classes, search)
        options = self.options(**margins)
        state, log = odpp.odpp(
            old, new, banks['odpp'], key, options=options, num_classes=num_classes, **search
        )
        stats = {k: float(v) for k, v in log.items() if k != 'loss'}
        stats.update({k: v for k, v in margins.items() if k == 'margin_new'})
        stats.update(odpp_loss_first=float(log['loss'][0]), odpp_loss_last=float(log['loss'][-1]))
        return l2_normalize(old + state['delta']), {'odpp': state}, stats
