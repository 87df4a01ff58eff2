"""Tiny stages and references for the tests, built through the library's own set-up.

Everything here goes through `stage.Stage`, `stage.Reference` and `step.build`, the code the
training loop uses, so the tests exercise the real set-up rather than a copy of it.
"""

import jax
import ml_collections
import numpy as np

from bcl_jax import methods, sharding, step
from bcl_jax.stage import Reference, Stage, Trained
from configs import common

SIZE = 16


def model_cfg(embedding_dim=16, head='cosface', width=4):
    return common.model(
        arch='cifar_resnet', width=width, depth=8, embedding_dim=embedding_dim, head=head
    )


def train_cfg(**overrides):
    cfg = common.train(epochs=1.0, batch_size=16, learning_rate=0.1, lr_drop_epochs=())
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


class RandomSource:
    """`n` random uint8 images in `num_classes` classes (every class present), deterministic."""

    def __init__(self, n=32, num_classes=6, size=SIZE, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = (np.arange(n) % num_classes).astype(np.int32)
        self.images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        self.num_classes = num_classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {'image': self.images[int(i)], 'label': self.labels[int(i)]}


def mesh_of(n):
    """A 1-D mesh of the first `n` devices (the tests fake 8)."""
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1)), devices=jax.devices()[:n])


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(num_classes=6, old_classes=3, dim=16, head='cosface', seed=7):
    """A (randomly initialised) old model with random unit prototypes: what main.run builds."""
    cfg = model_cfg(embedding_dim=dim, head=head)
    graphdef, params, stats = step.init_model(cfg, old_classes, seed=seed)
    old = Trained(graphdef, params, stats, cfg, old_classes, step=0)
    rng = np.random.default_rng(3)
    old_label = np.full(num_classes, -1, np.int32)
    old_label[:: max(1, num_classes // old_classes)][:old_classes] = np.arange(old_classes)
    return Reference(old, unit_rows(rng, num_classes, dim), old_label)


def config(**perturb):
    """The run config a stage reads its method's settings from (defaults, perturb overridden)."""
    c = common.base_config()
    for k, v in perturb.items():
        c.perturb[k] = v
    return c


def stage(method='independent', *, source=None, model=None, train=None, cfg=None, seed=1):
    """A new-model stage of `method` on `source` (default: 32 random images of 6 classes)."""
    source = RandomSource() if source is None else source
    cfg = config() if cfg is None else cfg
    return Stage(
        name=f'new_{method}',
        model_cfg=model or model_cfg(),
        train_cfg=train or train_cfg(),
        source=source,
        num_classes=source.num_classes,
        seed=seed,
        method=methods.build(method, cfg),
        fingerprint={'test': method},
    )


def batch(n=16, num_classes=6, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        image=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        label=rng.integers(0, num_classes, n).astype(np.int32),
    )


def host(tree):
    """A host (NumPy) copy of a pytree: device_put of it never aliases a donated buffer."""
    return jax.tree.map(lambda x: np.array(x), tree)
