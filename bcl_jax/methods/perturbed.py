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

import os

import jax
import jax.numpy as jnp
import numpy as np

from bcl_jax import calibrate, odpp, perturbation, prototypes, sharding
from bcl_jax.methods.bct import BCT
from bcl_jax.models.heads import l2_normalize


class Perturbed(BCT):
    """The refresh schedule and banks shared by NDPP and ODPP; `perturb` computes p̃:
    `perturb(old, new, banks, key, num_classes, search) -> (p̃, banks to keep, stats to log)`."""

    config_sections = ('compat', 'perturb')

    def __init__(self, config):
        super().__init__(config)
        self.calibration = {}  # what `calibrate` settles in `init_state`

    def init_state(self, stage, reference):
        # Until the first refresh p̃ = p, and a class's new prototype starts at its old one.
        bank = sharding.to_host(reference.prototypes)[: stage.num_classes]
        # The settings a given rho asks for (deterministic: a resumed stage recomputes them).
        self.calibration = self.calibrate(bank, jax.random.key(stage.seed))
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
        from bcl_jax import plots  # matplotlib only where a figure is made

        bank = lambda x: sharding.to_host(x)[: ctx.stage.num_classes]
        banks = state['method']['banks']
        plots.perturbation_figure(
            bank(ctx.reference.prototypes),
            bank(banks['positive']),
            bank(l2_normalize(banks['new'])),
            os.path.join(ctx.directory, 'perturbation.png'),
            title=f'{ctx.stage.name}: {self.name}',
        )


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


class ODPP(Perturbed):
    name = 'odpp'

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
