"""The built-in benchmark: old model, then independent and BCT new models, on synthetic images.

    python -m bcl_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
    python -m bcl_jax.main --config=configs/synthetic.py:smoke --workdir=runs/smoke   # seconds

The old model (a small CIFAR ResNet) sees 30% of 400 fine-grained training classes; new models
(a wider ResNet) see all of them. Evaluation: 500 queries against 1,500 gallery images of 100
unseen classes. See README.md for the measured table and wall time.
"""
from configs import common


def get_config(arg=None):
    c = common.base_config()
    c.old.model = common.model(width=8, depth=8, embedding_dim=64)
    c.old.train = common.train(epochs=30, lr_drop_epochs=(20, 27))
    c.new.model = common.model(width=16, depth=14, embedding_dim=64)
    c.new.train = common.train(epochs=20, lr_drop_epochs=(12, 17))
    c.methods = ('independent', 'bct')
    if arg == 'smoke':
        s = c.data.synthetic
        s.train_families, s.siblings_per_family, s.test_siblings_per_family = 4, 4, 2
        s.train_images_per_class, s.test_images_per_class, s.queries_per_class = 8, 6, 2
        c.data.image_size = 16
        for stage in (c.old, c.new):
            stage.model.width, stage.model.depth, stage.model.embedding_dim = 4, 8, 16
            stage.train.epochs, stage.train.batch_size = 2, 16
        c.eval.batch_size = 16
        c.ckpt.every_steps, c.log_every_steps = 2, 2
    elif arg is not None:
        raise ValueError(f"unknown config argument {arg!r}; use 'smoke' or nothing")
    return c
