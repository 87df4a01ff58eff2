"""What one dataset module builds: its training source, its old split and its retrieval tests.

Every dataset module (synthetic, folder, gldv2, inshop, tfds_sources) has
``build(cfg, workdir) -> DatasetParts``; `bcl_jax.data.build` picks the module by
``data.name`` and adds what every dataset shares (the old split's view, the fingerprint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from etils import epath

from bcl_jax import metrics
from bcl_jax.data import splits

_NUM_SHOWN = 5  # How many paths or names an error or warning lists before "...".


def preview(items) -> str:
    """The first few of `items` for an error message, then "..." if there are more."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:_NUM_SHOWN])
    return shown + (", ..." if len(items) > _NUM_SHOWN else "")


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
    identity: dict = dataclasses.field(default_factory=dict)  # what the data is, beyond ids
    # (num_classes,) a group per training class that a validation split holds out within
    # (the synthetic benchmark's families); None: classes are drawn from all of them.
    class_groups: np.ndarray | None = None

    def sources(self) -> list:
        """Every source: the training set, then each test's query and gallery."""
        tests = [s for t in self.tests for s in (t.query, t.gallery) if s is not None]
        return [self.train, *tests]


def require_dir(path: str, field: str) -> None:
    """FileNotFoundError naming the config `field` unless `path` is a directory."""
    if not epath.Path(path).is_dir():
        what = "is a file, not a folder" if epath.Path(path).exists() else "does not exist"
        raise FileNotFoundError(f"{field}={path!r} {what}; fix {field} in the config.")


def require_file(path: str, field: str, what: str) -> None:
    """FileNotFoundError naming the config `field` (which locates `path`) unless `path` is a
    file; `what` says what the file is."""
    if not epath.Path(path).is_file():
        raise FileNotFoundError(
            f"{what} {path!r} not found; check {field} in the config (the file must be there)."
        )


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
