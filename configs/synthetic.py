"""The built-in benchmark: one old model, then independent, BCT, NDPP and ODPP new models.

    python -m bcl_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
    python -m bcl_jax.main --config=configs/synthetic.py --workdir=runs/synthetic3 --config.seeds='(0,1,2)'
    python -m bcl_jax.main --config=configs/synthetic.py:smoke --workdir=runs/smoke   # seconds
    python -m bcl_jax.main --config=configs/synthetic.py:methods=bct+ndpp --workdir=runs/two

Data (bcl_jax/data/synthetic.py): 1,000 training classes in 100 families of 10 look-alike
siblings, 10 images each, 16×16 px; retrieval of 200 unseen sibling classes (600 queries, 1,400
gallery images). The old model, a 4-wide CIFAR ResNet-8, sees 30% of the classes; the new models,
16 wide, see all of them. Expected on a 2-core CPU: about 6 minutes; old/old mAP near 25%, BCT
new/old above it, independent new/old near 1% (see README.md for the measured table).
"""

from configs import common


def get_config(arg=None):
    smoke, methods = common.options(arg)
    c = common.base_config()
    c.old.model = common.model(width=4, depth=8, embedding_dim=64)
    c.old.train = common.train(epochs=30.0, lr_drop_epochs=(20, 27))
    c.new.model = common.model(width=16, depth=8, embedding_dim=64)
    c.new.train = common.train(epochs=20.0, lr_drop_epochs=(14, 18))
    c.methods = ('independent', 'bct', 'ndpp', 'odpp') if methods is None else methods
    if smoke:
        shrink_to_smoke(c)
    return c


def shrink_to_smoke(c):
    """The same pipeline in seconds: a handful of classes, tiny models, two epochs."""
    c.smoke = True
    s = c.data.synthetic
    s.train_families, s.siblings_per_family, s.test_siblings_per_family = 4, 4, 2
    s.train_images_per_class, s.test_images_per_class, s.queries_per_class = 8, 6, 2
    for stage in (c.old, c.new):
        stage.model.width, stage.model.depth, stage.model.embedding_dim = 4, 8, 16
        stage.train.epochs, stage.train.batch_size = 2, 16
    c.old.train.epochs = 2.5  # 4 old classes x 8 images: 5 steps, the last one off the 2-step grid
    c.perturb.start_epochs = 0.5
    c.perturb.odpp.passes = 10
    c.eval.batch_size = 16
    c.ckpt.every_steps, c.log_every_steps = 2, 2
