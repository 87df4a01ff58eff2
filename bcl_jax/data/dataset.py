"""What one dataset module builds: its training source, its old split and its retrieval tests.

Every dataset module (synthetic, folder, gldv2, inshop, tfds_sources) has
``build(cfg, workdir) -> DatasetParts``; `bcl_jax.data.build` picks the module by
``data.name`` and adds what every dataset shares (the old split's view, the fingerprint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from bcl_jax import metrics
from bcl_jax.data import splits


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
class DatasetParts:
    """What a dataset module builds from the config.

    train: the new model's training set (all classes), a grain random-access source.
    tests: the retrieval tests, in the order results show them.
    description: one line naming the data, for logs and results.
    old_split: the old model's share when the dataset records one (a GLDv2 split file, a
      prepared dataset's manifest); None: `data.build` draws it from the config.
    """

    train: object
    tests: list[RetrievalTest]
    description: str
    old_split: splits.OldSplit | None = None


def label_test(name: str, query, gallery=None, *, ks=None, protocol: str = '') -> RetrievalTest:
    """A test where relevance is an equal label: mAP and Recall@K (`ks`, else eval.ks) over the
    full ranking; without a gallery, the query set searches itself, each query excluded."""
    query_labels = np.asarray(query.labels)
    gallery_labels = query_labels if gallery is None else np.asarray(gallery.labels)

    def score(query_emb, gallery_emb, eval_cfg):
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
