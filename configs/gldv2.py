"""GLDv2-clean: a ResNet-18 old model on 30% of the landmarks, then ResNet-50 new models
(independent, BCT, NDPP, ODPP), tested on ROxford5k, RParis6k (Medium, Hard) and the GLDv2
retrieval test (method.md §6-§8).

    python -m bcl_jax.data.prepare --dataset=gldv2 --src=$GLDV2 --dst=$PREPARED   # optional, once
    python -m bcl_jax.main --config=configs/gldv2.py --workdir=$RUN \
        --config.data.gldv2.root=$GLDV2 --config.data.revisited.root=$REVISITOP \
        --config.old.model.pretrained=$WEIGHTS/resnet18-f37072fd.pth \
        --config.new.model.pretrained=$WEIGHTS/resnet50-0676ba61.pth \
        [--config.data.prepared=$PREPARED]

$GLDV2 holds train_clean.csv, train/a/b/c/<id>.jpg, index.csv, index/, test/ and
retrieval_solution_v2.1.csv; $REVISITOP holds roxford5k/ and rparis6k/ (gnd_<name>.pkl, jpg/).
The old split (24,393 of 81,313 classes, seed `data.split_seed`) is saved to $RUN/old_split.json,
or read from the prepared folder, whose manifest must match it; AdvBCT's published split lists
are read with `bcl_jax.data.gldv2.split_from_advbct` into a split file for
`data.gldv2.split_file`.

The recipe, each choice and its source (docs/gldv2.md, "GLDv2 on a TPU slice or GPU cluster"):
- backbones from ImageNet weights (every code base of the field: AdvBCT, OpenCompatible,
  PrunNet): torchvision's resnet18-f37072fd.pth and resnet50-0676ba61.pth, or timm's
  resnet18/resnet50 .safetensors, downloaded once (bcl_jax reads no network); without
  `model.pretrained` the backbones start from random weights;
- SGD 0.1, momentum 0.9, weight decay 5e-4, 30 epochs, ×0.1 at epochs 5, 10, 20, batch 256,
  256-d embeddings (PrunNet `configs/gldv2`, method.md §6);
- training images: shorter side 256, random 224 crop, flip (PrunNet's transforms,
  `data.augment='random_crop'`); evaluation: shorter side 256, centre 224 crop (PrunNet;
  AdvBCT resizes the whole image to 224: `--config.data.eval_preprocess=resize`);
- average pooling and a step schedule, as the references; GeM (`model.pool=gem`), a cosine
  schedule with warm-up (`train.schedule=cosine`, `train.warmup_steps`), random-resized crops
  (`data.augment=random_resized_crop`) and bf16 compute (`model.dtype=bfloat16`) are options.

Meant for a Cloud TPU v4-32 / v5e-32 or 8+ GPUs (`launch/`): 30 epochs of 1.58M images at 224 px
is about 47M images per model. Expect an old/old ROxford Medium mAP in the 60s and BCT new/old
above it; the published tables (Zhou et al. 2025) are the reference. For the same architecture
old and new, add --config.new.model.arch=resnet18.

The argument (configs/common.py `options`) picks the new models and the size: one method,
several, or the old model alone, whose run the others reuse through `old.checkpoint`:

    python -m bcl_jax.main --config=configs/gldv2.py:methods=none --workdir=$OLD ...
    python -m bcl_jax.main --config=configs/gldv2.py:methods=odpp --workdir=$RUN \
        --config.old.checkpoint=$OLD/old/ckpt ...
    python -m bcl_jax.main --config=configs/gldv2.py:methods=bct+ndpp,smoke --workdir=$RUN ...

Each method's own settings are in its config section (bcl_jax.methods: `lce`, `unibct`,
`hot_refresh`, `advbct`, `perturb`), each term weighted by `compat.weight`. `smoke` keeps the
stages and the tests but shrinks models, images and epochs so that the tests run it end to end
in seconds on small files in these formats.
"""

from configs import common


def get_config(arg=None):
    smoke, methods = common.options(arg)
    c = common.base_config()
    c.data.name = 'gldv2'
    c.data.image_size = 224
    c.data.augment, c.data.train_resize_size = 'random_crop', 256  # PrunNet's transforms
    c.data.eval_resize_size = 256
    c.data.num_threads = 16
    c.old.model = common.model(arch='resnet18', width=64, embedding_dim=256, head='cosface')
    c.new.model = common.model(arch='resnet50', width=64, embedding_dim=256, head='cosface')
    for stage in (c.old, c.new):
        stage.train = common.train(
            epochs=30.0, batch_size=256, learning_rate=0.1, lr_drop_epochs=(5.0, 10.0, 20.0)
        )
    c.eval.batch_size = 512
    c.eval.ks = (1, 10, 100)
    c.ckpt.every_steps = 2000
    c.log_every_steps = 100
    c.methods = ('independent', 'bct', 'ndpp', 'odpp') if methods is None else methods
    if smoke:
        shrink_to_smoke(c)
    return c


def shrink_to_smoke(c):
    """Tiny models on 16 px images for a few steps: every stage and test, in seconds."""
    c.smoke = True
    c.data.image_size, c.data.num_threads = 16, 2
    c.data.train_resize_size = c.data.eval_resize_size = 18
    for stage in (c.old, c.new):
        stage.model = common.model(width=4, depth=8, embedding_dim=16)
        stage.train = common.train(epochs=2.0, batch_size=8, lr_drop_epochs=(1.5,))
    c.perturb.start_epochs, c.perturb.odpp.passes = 0.5, 5
    c.perturb.ndpp.k = c.perturb.odpp.k = 3
    c.eval.batch_size = 8
    c.ckpt.every_steps, c.log_every_steps = 4, 2
