"""Defaults shared by every experiment config; each config file overrides what it needs.

Groups: data, old (model, train, checkpoint), new (model, train), compat (loss weights and
temperature), each method's own (bcl_jax/methods), eval, ckpt, mesh. Units are in the names (`*_steps`, `*_epochs`).
"""

import dataclasses

from ml_collections import config_dict

from bcl_jax import methods
from bcl_jax.data.synthetic import SyntheticSpec


def options(arg: str | None) -> tuple[bool, tuple[str, ...] | None]:
    """A benchmark config's argument, comma-separated: `smoke` (the same pipeline shrunk to
    seconds) and `methods=a+b` (the new models to train, by method or variant name;
    `methods=none`: the old model alone). Returns (smoke, methods or None for the config's own).

        --config=configs/gldv2.py:methods=odpp    --config=configs/gldv2.py:methods=bct+ndpp,smoke
    """
    smoke, methods = False, None
    for word in filter(None, (arg or '').split(',')):
        key, given, value = word.partition('=')
        if word == 'smoke':
            smoke = True
        elif key == 'methods' and given and value:
            methods = () if value == 'none' else tuple(value.split('+'))
        else:
            raise ValueError(
                f"unknown config argument {arg!r} (at {word!r}); use 'smoke', 'methods=a+b' "
                "('methods=none': the old model alone), or both separated by a comma"
            )
    return smoke, methods


def model(arch='cifar_resnet', width=16, depth=20, embedding_dim=128, head='cosface'):
    return config_dict.ConfigDict(
        dict(
            arch=arch,
            width=width,
            depth=depth,
            embedding_dim=embedding_dim,
            head=head,  # softmax | cosface | arcface
            scale=30.0,
            margin=0.3,
            pool='avg',  # avg | gem (generalized mean, learnable p; no weight decay on p)
            dtype='float32',  # the backbone's compute dtype, e.g. bfloat16 (weights stay float32)
            # ImageNet weights for the backbone (resnet18/50): a torchvision .pth state dict or
            # a timm .safetensors file (bcl_jax.models.convert); head and classifier start fresh.
            pretrained='',
        )
    )


def train(epochs=30.0, batch_size=128, learning_rate=0.1, lr_drop_epochs=(15.0, 25.0)):
    return config_dict.ConfigDict(
        dict(
            epochs=epochs,
            steps=0,  # > 0 overrides epochs
            batch_size=batch_size,
            learning_rate=learning_rate,
            momentum=0.9,
            weight_decay=5e-4,
            schedule='step',  # step (drops at lr_drop_epochs) | cosine (to 0 over the stage)
            warmup_steps=0,  # linear warm-up from 0, before either schedule
            lr_drop_epochs=lr_drop_epochs,
            lr_drop_factor=0.1,
        )
    )


def base_config():
    c = config_dict.ConfigDict()
    c.seed = 0
    c.seeds = ()  # e.g. (0, 1, 2): one run per seed under DIR/seed_<s>, then mean ± std
    c.data = config_dict.ConfigDict(
        dict(
            name='synthetic',  # synthetic | folder | gldv2 | inshop | sop | cub | cars
            image_size=16,
            old_split='classes',  # classes: old model sees 30% of classes; images: 30% of each class
            old_fraction=0.3,
            split_seed=0,
            # The validation split (method.md §11), for choosing hyperparameters: this fraction
            # of the training classes (of each family, on the built-in benchmark) is held out;
            # both models train on the rest and retrieval runs within the held-out classes only.
            validation_fraction=0.0,
            validation_seed=0,
            # Training augmentation: pad_crop (reflect-pad by crop_padding, crop back; today's
            # default), random_crop (from a shorter side of train_resize_size, default 8/7 of
            # image_size), random_resized_crop (rrc_scale, rrc_ratio; from 2 x image_size);
            # then a horizontal flip when `flip`.
            augment='pad_crop',
            crop_padding=2,
            flip=True,
            rrc_scale=(0.08, 1.0),
            rrc_ratio=(3 / 4, 4 / 3),
            train_resize_size=0,  # 0: automatic (see augment)
            # Evaluation: center_crop (shorter side to eval_resize_size, 0 = image_size, then a
            # centre square) or resize (the whole image to a square, as AdvBCT evaluates).
            eval_preprocess='center_crop',
            eval_resize_size=0,
            num_threads=2,
            workers=0,  # grain processes decoding images (0: num_threads threads in-process)
            # Image files are checked before any training: 'header' (fast: the header, and that a
            # JPEG or PNG is not truncated), 'decode' (every pixel) or 'off'; skip_corrupt drops
            # the files the scan finds instead of stopping (listed in results.json under
            # data.skipped).
            scan_images='header',
            skip_corrupt=False,
            # What identifies the training data in the stages' fingerprints (a finished stage is
            # reused only on the same data): 'content' adds the sha256 of every training image's
            # bytes (data.name=folder; each file read once, cached in <workdir>/data_digests.json
            # by path, size and mtime), so images replaced under the same names retrain; 'names'
            # uses ids, labels and split only (no reading; blind to images changed in place).
            fingerprint='content',
            # The built-in benchmark's spec: bcl_jax/data/synthetic.py explains every field.
            synthetic=config_dict.ConfigDict(
                {k: v for k, v in dataclasses.asdict(SyntheticSpec()).items() if k != 'image_size'}
            ),
            folder=config_dict.ConfigDict(dict(train_dir='', query_dir='', gallery_dir='')),
            # A folder written by `python -m bcl_jax.data.prepare` (ArrayRecord shards and a
            # manifest whose old split must match old_split/old_fraction/split_seed); '' reads
            # the raw files of the dataset's group below.
            prepared='',
            gldv2=config_dict.ConfigDict(
                dict(
                    root='',  # train_clean.csv, train/, index.csv, index/, test/, the solution
                    csv='train_clean.csv',  # or train.csv
                    split_file='',  # the old split's file; '' = <workdir>/old_split.json
                    tests=('roxford5k', 'rparis6k', 'gldv2'),  # the first scores compatibility
                )
            ),
            revisited=config_dict.ConfigDict(
                dict(
                    root='',  # holds roxford5k/ and rparis6k/, each gnd_<name>.pkl and jpg/
                    protocols=('medium', 'hard'),
                    crop_queries=True,  # the standard protocol; False: whole query images
                )
            ),
            inshop=config_dict.ConfigDict(dict(root='')),  # list_eval_partition.txt and img/
            tfds=config_dict.ConfigDict(dict(data_dir='')),  # sop, cub, cars: prepared by tfds
        )
    )
    c.old = config_dict.ConfigDict(
        dict(
            model=model(),
            train=train(),
            checkpoint='',  # a trained old model's checkpoint directory; '' trains one
            allow_unfinished=False,  # True: accept a checkpoint short of its last step
            # a folder of the old model's embedding files (bcl_jax.old_embeddings): no network
            embeddings='',
        )
    )
    c.new = config_dict.ConfigDict(dict(model=model(), train=train()))
    c.methods = ('independent', 'bct')
    # Named variants of a method, usable in `methods`: name -> 'base field=value ...', e.g.
    # odpp_warm='odpp perturb.odpp.warm_start=True' (bcl_jax.methods).
    c.variants = config_dict.ConfigDict()
    # A stage in the work directory trained under other settings: 'error' stops and lists them;
    # 'retrain' moves it aside (<stage>.replaced-<n>) and trains it anew.
    c.on_change = 'error'
    # Set by the configs' `:smoke`: a check that the pipeline runs, whose numbers mean nothing
    # (results.json and results.md say so).
    c.smoke = False
    c.compat = config_dict.ConfigDict(
        dict(
            weight=1.0,  # λ of the method's compatibility term
            temperature=0.07,  # τ of L_comp
        )
    )
    # Each method's own settings (perturb, lce, unibct, hot_refresh, advbct), declared in its
    # file under bcl_jax/methods (`config_defaults`, with what each field means).
    for section, fields in methods.config_defaults().items():
        c[section] = config_dict.ConfigDict(fields)
    c.eval = config_dict.ConfigDict(
        dict(
            batch_size=256,
            ks=(1, 5, 10),
            query_block=256,
            matrix=True,  # the compatibility matrix of every pair of models (method.md §10)
            backfill=True,  # backfill curves of the compatible new models, on the first test
            backfill_fractions=tuple(i / 10 for i in range(11)),
            backfill_seed=0,  # the random order of re-embedding the gallery
        )
    )
    # Sequential upgrades after the old model, in order (bcl_jax.upgrades): name ->
    # dict(fraction=..., method='bct', model=dict(...), train=dict(...)).
    c.upgrades = config_dict.ConfigDict()
    # async_save: checkpoints are written in the background while training goes on (the last
    # one completes before the stage returns).
    c.ckpt = config_dict.ConfigDict(dict(every_steps=500, max_to_keep=2, async_save=True))
    c.log_every_steps = 50
    c.mesh = config_dict.ConfigDict(
        dict(
            data=-1,  # devices on the one mesh axis, 'data'; -1: all devices
            # True: the classifier, its momentum and the prototype banks are split by class over
            # the devices (for C too large to replicate: GLDv2's 81k, millions); else replicated.
            shard_classes=False,
        )
    )
    return c
