"""Datasets: the built-in synthetic benchmark, image folders, GLDv2, In-shop, SOP/CUB/Cars,
the Revisited Oxford/Paris tests, old/new splits and the input pipeline.

`build(data_cfg)` gives every stage what it reads: the new training set (all classes), the old
model's share of it, and the retrieval tests, each with the protocol that scores it exactly as
the published tables do (METHOD.md §7). Readers of the real datasets are imported only when a
config names them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from bcl_jax.data import splits

NAMES = ('synthetic', 'folder', 'gldv2', 'inshop', 'sop', 'cub', 'cars')
GLDV2_TESTS = ('roxford5k', 'rparis6k', 'gldv2')


@dataclasses.dataclass
class RetrievalTest:
    """One retrieval test: `score(query_emb, gallery_emb, eval_cfg) -> {metric: float}`.

    `gallery` None: the query set is its own gallery, each query excluded from its own ranking.
    `columns`: the metrics results.md shows (all of them if empty); the first is the headline.
    `protocol`: how the test is scored, recorded in results.json.
    """

    name: str
    query: object
    gallery: object | None
    score: Callable[..., dict]
    protocol: str
    columns: tuple[str, ...] = ()


@dataclasses.dataclass
class Data:
    train: object  # the new model's training set: all classes
    old_train: object  # the old model's share, labels re-numbered over old classes
    old_label: object  # (num_classes,) new label -> old label, -1 if not an old class
    tests: list[RetrievalTest]
    num_classes: int
    description: str


def label_test(name: str, query, gallery=None, *, ks=None, protocol: str = '') -> RetrievalTest:
    """A test where relevance is an equal label: mAP and Recall@K (`ks`, else eval.ks) over the
    full ranking; without a gallery, the query set searches itself, each query excluded."""
    query_labels = np.asarray(query.labels)
    gallery_labels = query_labels if gallery is None else np.asarray(gallery.labels)

    def score(query_emb, gallery_emb, eval_cfg):
        from bcl_jax import metrics

        return metrics.retrieval_metrics(
            query_emb,
            query_labels,
            gallery_emb,
            gallery_labels,
            ks=tuple(ks or eval_cfg.ks),
            query_block=eval_cfg.query_block,
            exclude_self=gallery is None,
        )

    protocol = protocol or 'label mAP and Recall@K'
    if gallery is None:
        protocol += ', each query excluded from its own gallery'
    return RetrievalTest(name, query, gallery, score, protocol)


def _revisited_tests(cfg) -> list[RetrievalTest]:
    from bcl_jax.data import revisited

    r = cfg.revisited
    tests = []
    for dataset in (t for t in cfg.gldv2.tests if t in revisited.DATASETS):
        root = os.path.join(r.root, dataset)
        query, database = (
            revisited.RevisitedSource(
                root, dataset, split, image_size=cfg.image_size, crop_queries=r.crop_queries
            )
            for split in ('query', 'database')
        )

        def score(query_emb, gallery_emb, eval_cfg, gnd=query.gnd):
            out = revisited.evaluate(
                query_emb,
                gallery_emb,
                gnd,
                protocols=tuple(r.protocols),
                crop_queries=r.crop_queries,
            )
            out.pop('query_crop')
            return {f'{p}/{k}': v for p, row in out.items() for k, v in row.items()}

        tests.append(
            RetrievalTest(
                dataset,
                query,
                database,
                score,
                protocol=f'revisitop mAP and mP@k, {"/".join(r.protocols)}; queries '
                + ('cropped to their box' if r.crop_queries else 'whole (no box crop)'),
                columns=tuple(f'{p}/mAP' for p in r.protocols),
            )
        )
    return tests


def _gldv2_test(cfg) -> RetrievalTest:
    from bcl_jax.data import gldv2

    g = cfg.gldv2
    solution_dir = cfg.prepared or g.root  # prepare copies the solution file
    solution = gldv2.read_retrieval_solution(os.path.join(solution_dir, gldv2.SOLUTION_FILE))
    if cfg.prepared:
        from bcl_jax.data import prepared

        query, index = (
            prepared.PreparedSource(cfg.prepared, split, image_size=cfg.image_size)
            for split in ('test', 'index')
        )
    else:
        query = gldv2.TestImages(
            g.root, 'test', gldv2.retrieval_queries(solution), image_size=cfg.image_size
        )
        index = gldv2.TestImages(
            g.root,
            'index',
            gldv2.read_id_csv(os.path.join(g.root, gldv2.INDEX_FILE)),
            image_size=cfg.image_size,
        )

    def score(query_emb, gallery_emb, eval_cfg):
        out = gldv2.evaluate_retrieval(query.ids, query_emb, index.ids, gallery_emb, solution)
        return {
            'mAP@100/private': out['private'],
            'mAP@100/public': out['public'],
            'num_private': out['num_private'],
            'num_public': out['num_public'],
        }

    return RetrievalTest(
        'gldv2',
        query,
        index,
        score,
        protocol='GLDv2 retrieval test: mAP@100, Private and Public queries apart',
        columns=('mAP@100/private', 'mAP@100/public'),
    )


def _synthetic(cfg, workdir):
    from bcl_jax.data.synthetic import SyntheticBenchmark, SyntheticSpec

    bench = SyntheticBenchmark(SyntheticSpec(image_size=cfg.image_size, **cfg.synthetic.to_dict()))
    test = label_test('synthetic', bench.split('query'), bench.split('gallery'))
    return bench.split('train'), None, [test], f'synthetic (seed {cfg.synthetic.seed})'


def _folder(cfg, workdir):
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
    return train, None, [label_test('folder', query, gallery)], f'folder {f.train_dir}'


def _prepared(cfg):
    """The prepared train source and its recorded old split (checked against the config)."""
    from bcl_jax.data import prepared

    manifest = prepared.read_manifest(cfg.prepared)
    if manifest['dataset'] != cfg.name:
        raise ValueError(
            f'data.prepared={cfg.prepared!r} holds {manifest["dataset"]!r}, but data.name is '
            f'{cfg.name!r}.'
        )
    split = prepared.prepared_old_split(
        cfg.prepared,
        fraction=cfg.old_fraction,
        mode=cfg.old_split,
        seed=cfg.split_seed,
        manifest=manifest,
    )
    source = lambda name: prepared.PreparedSource(
        cfg.prepared, name, image_size=cfg.image_size, manifest=manifest
    )
    return source, split


def _gldv2(cfg, workdir):
    from bcl_jax.data import gldv2

    g = cfg.gldv2
    unknown = set(g.tests) - set(GLDV2_TESTS)
    if unknown:
        raise ValueError(f'data.gldv2.tests has {sorted(unknown)}; use some of {GLDV2_TESTS}.')
    if cfg.prepared:
        source, split = _prepared(cfg)
        train = source('train')
    else:
        if not g.root:
            raise ValueError('data.name=gldv2 needs data.gldv2.root (or data.prepared).')
        csv_path = os.path.join(g.root, g.csv)
        train = gldv2.GLDv2Train(csv_path, g.root, image_size=cfg.image_size)
        split = _recorded_gldv2_split(cfg, train, workdir)
    tests = _revisited_tests(cfg)
    if 'gldv2' in g.tests:
        tests.append(_gldv2_test(cfg))
    order = {name: i for i, name in enumerate(g.tests)}
    tests.sort(key=lambda t: order[t.name])
    return train, split, tests, f'GLDv2 {os.path.basename(g.csv)} ({g.root or cfg.prepared})'


def _recorded_gldv2_split(cfg, train, workdir):
    """The old split from data.gldv2.split_file, or drawn and saved there (default: the workdir)."""
    import jax

    from bcl_jax.data import gldv2

    path = cfg.gldv2.split_file or (workdir and os.path.join(workdir, 'old_split.json'))
    asked = dict(fraction=cfg.old_fraction, mode=cfg.old_split, seed=cfg.split_seed)
    if path and os.path.exists(path):
        split, meta = gldv2.read_split_file(path, image_ids=train.image_ids)
        if any(meta[k] != v for k, v in asked.items()):
            raise ValueError(
                f'{path} holds the split fraction={meta["fraction"]} mode={meta["mode"]} '
                f'seed={meta["seed"]}, but the config asks for {asked}; point '
                'data.gldv2.split_file elsewhere or match the config to the file.'
            )
        return split
    split = splits.old_split(train.labels, train.num_classes, **asked)
    if path and jax.process_index() == 0:
        gldv2.write_split(path, split, image_ids=train.image_ids, **asked)
    return split


def _inshop(cfg, workdir):
    from bcl_jax.data import inshop

    if cfg.prepared:
        source, split = _prepared(cfg)
        train, query, gallery = source('train'), source('query'), source('gallery')
    else:
        if not cfg.inshop.root:
            raise ValueError('data.name=inshop needs data.inshop.root (or data.prepared).')
        partition = inshop.read_partition(cfg.inshop.root)
        train, query, gallery = (
            inshop.InShopSource(cfg.inshop.root, s, image_size=cfg.image_size, partition=partition)
            for s in inshop.SPLITS
        )
        split = None
    test = label_test('inshop', query, gallery, ks=inshop.KS, protocol='In-shop Recall@K and mAP')
    return train, split, [test], f'In-shop {cfg.inshop.root or cfg.prepared}'


def _tfds(cfg, workdir):
    from bcl_jax.data import tfds_sources

    spec = tfds_sources.DATASETS[cfg.name]
    train, test = (
        tfds_sources.TfdsSource(
            cfg.name, split, data_dir=cfg.tfds.data_dir, image_size=cfg.image_size
        )
        for split in ('train', 'test')
    )
    return train, None, [label_test(cfg.name, test, ks=spec.ks)], f'{cfg.name} (tfds)'


_READERS = dict(
    synthetic=_synthetic,
    folder=_folder,
    gldv2=_gldv2,
    inshop=_inshop,
    sop=_tfds,
    cub=_tfds,
    cars=_tfds,
)


def build(cfg, workdir: str | None = None) -> Data:
    """The training set, the old model's share and the retrieval tests of `data_cfg`.

    `workdir`: where a freshly drawn GLDv2 old split is saved when data.gldv2.split_file is ''.
    """
    if cfg.name not in _READERS:
        raise ValueError(f'unknown data.name {cfg.name!r}; use one of {NAMES}')
    train, split, tests, description = _READERS[cfg.name](cfg, workdir)
    if split is None:
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
        tests=tests,
        num_classes=train.num_classes,
        description=description,
    )
