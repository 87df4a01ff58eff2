"""Datasets: the built-in synthetic benchmark, image folders, old/new splits, input pipeline.

`build(data_cfg)` gives every stage what it reads: the new training set (all classes), the old
model's share of it, and the query and gallery sets of the retrieval evaluation.
"""

from __future__ import annotations

import dataclasses

from bcl_jax.data import splits


@dataclasses.dataclass
class Data:
    train: object  # the new model's training set: all classes
    old_train: object  # the old model's share, labels re-numbered over old classes
    old_label: object  # (num_classes,) new label -> old label, -1 if not an old class
    query: object
    gallery: object
    num_classes: int
    description: str


def build(cfg) -> Data:
    if cfg.name == 'synthetic':
        from bcl_jax.data.synthetic import SyntheticBenchmark, SyntheticSpec

        bench = SyntheticBenchmark(
            SyntheticSpec(image_size=cfg.image_size, **cfg.synthetic.to_dict())
        )
        train, query, gallery = bench.split('train'), bench.split('query'), bench.split('gallery')
        description = f'synthetic (seed {cfg.synthetic.seed})'
    elif cfg.name == 'folder':
        from bcl_jax.data.folder import ImageFolder, eval_folders

        f = cfg.folder
        for key in ('train_dir', 'query_dir', 'gallery_dir'):
            if not f[key]:
                raise ValueError(
                    f'data.name=folder needs data.folder.{key}: a folder laid out '
                    'as <dir>/<class_name>/<image>'
                )
        train = ImageFolder(f.train_dir, image_size=cfg.image_size, skip_corrupt=f.skip_corrupt)
        query, gallery = eval_folders(
            f.query_dir, f.gallery_dir, image_size=cfg.image_size, skip_corrupt=f.skip_corrupt
        )
        description = f'folder {f.train_dir}'
    else:
        raise ValueError(f"unknown data.name {cfg.name!r}; use 'synthetic' or 'folder'")
    split = splits.old_split(
        train.labels,
        train.num_classes,
        fraction=cfg.old_fraction,
        mode=cfg.old_split,
        seed=cfg.split_seed,
    )
    old_train = splits.Relabeled(train, split.indices, split.old_label)
    return Data(
        train=train,
        old_train=old_train,
        old_label=split.old_label,
        query=query,
        gallery=gallery,
        num_classes=train.num_classes,
        description=description,
    )
