"""Revisited Oxford 5k and Paris 6k (Radenović et al., CVPR 2018) in their published file layout.

Layout, as the revisitop download scripts leave it::

    root/
      gnd_roxford5k.pkl      (or gnd_rparis6k.pkl) ground truth, from the revisitop page
      jpg/<name>.jpg         every database and query image, named as in the pickle

The pickle is a dict with ``imlist`` (database image names, no extension), ``qimlist`` (query
image names) and ``gnd``: one dict per query with ``bbx`` ([x1, y1, x2, y2] in pixels) and the
index lists ``easy``, ``hard`` and ``junk`` into ``imlist``. Only load pickles you trust: unpickling
runs code.

`RevisitedSource` is a grain random-access source over the queries or the database. Every image
is treated as `images.load_image` treats one (RGB, shorter side resized to ``image_size``,
centre-cropped square); with ``crop_queries=True`` (the standard protocol) a query is first cropped
to its bounding box, with ``crop_queries=False`` (as the BCL papers evaluate) it is taken whole.

`evaluate` ranks the database for every query by dot product and scores the Easy, Medium and Hard
protocols (method.md §7) with `bcl_jax.metrics.compute_map`, revisitop's mAP and mP@k; results
record which query treatment was used.
"""

from __future__ import annotations

import os
import pickle
import posixpath
from collections.abc import Sequence

import numpy as np
from absl import logging
from etils import epath

from bcl_jax import metrics
from bcl_jax.data import images
from bcl_jax.data.dataset import RetrievalTest, preview, require_dir
from bcl_jax.data.images import load_image

__all__ = [
    "DATASETS",
    "PROTOCOLS",
    "RevisitedSource",
    "evaluate",
    "load_gnd",
    "protocol_gnd",
    "rank_database",
    "retrieval_test",
]

DATASETS = ("roxford5k", "rparis6k")
PROTOCOLS = ("easy", "medium", "hard")
SPLITS = ("query", "database")
DOWNLOAD_PAGE = "http://cmp.felk.cvut.cz/revisitop/"

# The eleven Oxford landmarks that name the Oxford images; "oxc1_" prefixes every name in the
# distractor-free Oxford 5k lists. Paris images are all named "paris_<landmark>_<number>".
OXFORD_PREFIXES = (
    "all_souls",
    "ashmolean",
    "balliol",
    "bodleian",
    "christ_church",
    "cornmarket",
    "hertford",
    "keble",
    "magdalen",
    "pitt_rivers",
    "radcliffe_camera",
    "oxc1_",
)
PARIS_PREFIXES = ("paris_",)
_PREFIXES = {"roxford5k": OXFORD_PREFIXES, "rparis6k": PARIS_PREFIXES}
_QUERY_KEYS = ("easy", "hard", "junk")


def _check_dataset(dataset: str):
    if dataset not in DATASETS:
        raise ValueError(f"Unknown revisited dataset {dataset!r}; use one of {DATASETS}.")


def gnd_path(root: str | os.PathLike, dataset: str) -> str:
    """Where the ground-truth pickle of `dataset` lives under `root`."""
    _check_dataset(dataset)
    return posixpath.join(os.fspath(root), f"gnd_{dataset}.pkl")


def _guess_dataset(query_names: Sequence[str]) -> str:
    """The dataset whose naming all `query_names` follow, or a phrase saying none does."""
    for name, prefixes in _PREFIXES.items():
        if query_names and all(str(q).startswith(prefixes) for q in query_names):
            return name
    return "neither Revisited Oxford nor Paris"


def load_gnd(root: str | os.PathLike, dataset: str) -> dict:
    """Loads and checks `<root>/gnd_<dataset>.pkl`; returns its dict.

    Raises:
      FileNotFoundError: the pickle is missing (the message says where to get it).
      ValueError: the file is not a readable ground-truth dict, lacks keys, has inconsistent or
        out-of-range lists, or belongs to the other dataset (judged by the query names).
    """
    path = gnd_path(root, dataset)
    if not epath.Path(path).is_file():
        raise FileNotFoundError(
            f"Ground truth {path!r} not found. Download gnd_{dataset}.pkl and the images (into "
            f"{posixpath.join(os.fspath(root), 'jpg')!r}) from the revisitop page {DOWNLOAD_PAGE} "
            f"(its download scripts fetch both), or fix the data root."
        )
    try:
        with epath.Path(path).open("rb") as f:
            cfg = pickle.load(f)
    except Exception as e:  # A truncated or foreign file raises any of several errors.
        raise ValueError(f"Cannot unpickle {path!r} ({type(e).__name__}: {e}).") from e
    if not isinstance(cfg, dict):
        # ValueError, not TypeError: the file's content is wrong, not the caller's argument.
        raise ValueError(  # noqa: TRY004
            f"{path!r} holds a {type(cfg).__name__}, not revisitop's gnd dict."
        )
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise ValueError(
            f"{path!r} lacks the key(s) {missing} (has {sorted(map(str, cfg))}); expected "
            f"revisitop's gnd_{dataset}.pkl with 'imlist', 'qimlist' and 'gnd'."
        )
    queries, database, gnd = list(cfg["qimlist"]), list(cfg["imlist"]), list(cfg["gnd"])
    if not queries or not database:
        raise ValueError(
            f"{path!r} has {len(queries)} queries and {len(database)} database images."
        )
    if len(gnd) != len(queries):
        raise ValueError(f"{path!r} has {len(gnd)} 'gnd' entries for {len(queries)} queries.")
    guess = _guess_dataset(queries)
    if guess != dataset:
        raise ValueError(
            f"{path!r} was opened as {dataset}, but its query names ({queries[0]!r}, ...) say it "
            f"is {guess}. Use the matching dataset name or put the right pickle there."
        )
    for q, entry in enumerate(gnd):
        lacking = [k for k in _QUERY_KEYS if k not in entry]
        if lacking:
            raise ValueError(f"{path!r}: gnd[{q}] ({queries[q]}) lacks {lacking}.")
        for key in _QUERY_KEYS:
            idx = np.asarray(entry[key], dtype=np.int64).reshape(-1)
            if idx.size and (idx.min() < 0 or idx.max() >= len(database)):
                raise ValueError(
                    f"{path!r}: gnd[{q}]['{key}'] has indices outside the {len(database)} "
                    "database images."
                )
    return cfg


def _indices(*lists) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in lists])


def protocol_gnd(gnd: dict | Sequence[dict], protocol: str) -> list[dict]:
    """Per-query ``{'ok', 'junk'}`` index arrays of one protocol (method.md §7).

    easy: ok = easy, junk = junk ∪ hard; medium: ok = easy ∪ hard, junk = junk;
    hard: ok = hard, junk = junk ∪ easy. `gnd` is the pickle's dict or its 'gnd' list.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; use one of {PROTOCOLS}.")
    entries = gnd["gnd"] if isinstance(gnd, dict) else gnd
    out = []
    for g in entries:
        if protocol == "easy":
            ok, junk = _indices(g["easy"]), _indices(g["junk"], g["hard"])
        elif protocol == "medium":
            ok, junk = _indices(g["easy"], g["hard"]), _indices(g["junk"])
        else:
            ok, junk = _indices(g["hard"]), _indices(g["junk"], g["easy"])
        out.append({"ok": ok, "junk": junk})
    return out


class RevisitedSource:
    """Random-access source (grain protocol) over the queries or database of a revisited set.

    ``ds[i]`` is ``{'image': uint8 (image_size, image_size, 3), 'label': int32 i}``: the label is
    the image's position in the source (relevance comes from the ground truth, not from labels).

    The files are scanned at construction (`images.scan`): missing or unreadable ones stop with
    their paths, or with `skip_corrupt` are dropped; `kept` then maps the source's images to
    their positions in the pickle's lists (`evaluate` scores a skipped query not at all and a
    skipped database image as never retrieved).

    Attributes:
      root, dataset, split, image_size: as given.
      crop_queries: whether queries are cropped to their bounding box (database images never are).
      gnd: the checked pickle dict (see `load_gnd`).
      names: image names of the source, in pickle order. paths: their jpg paths. ids: names.
      kept: (len,) int64, each image's index in the pickle's list ('qimlist' or 'imlist').
      labels: np.arange(len(names)) as int32. num_classes: len(names). skipped: paths dropped.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        dataset: str,
        split: str = "query",
        *,
        image_size: int,
        crop_queries: bool = True,
        skip_corrupt: bool = False,
        scan: str = "header",
        preprocess: images.Preprocess | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
        self.preprocess = images.Preprocess.of(image_size, preprocess)
        self.root = os.fspath(root)
        self.dataset = dataset
        self.split = split
        self.image_size = int(image_size)
        self.crop_queries = bool(crop_queries)
        self.gnd = load_gnd(self.root, dataset)
        names = [str(n) for n in (self.gnd["qimlist"] if split == "query" else self.gnd["imlist"])]
        paths = [posixpath.join(self.root, "jpg", n + ".jpg") for n in names]
        what = (
            f"{dataset} {split} images (download them from {DOWNLOAD_PAGE} into "
            f"{posixpath.join(self.root, 'jpg')!r})"
        )
        self.kept, self.skipped = images.scan(
            paths, what=what, skip_corrupt=skip_corrupt, mode=scan
        )
        self.names = [names[i] for i in self.kept]
        self.ids = self.names
        self.paths = [paths[i] for i in self.kept]
        self.labels = np.arange(len(self.names), dtype=np.int32)
        self.num_classes = len(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        path = self.paths[index]
        box = None
        if self.split == "query" and self.crop_queries:
            box = self.gnd["gnd"][self.kept[index]]["bbx"]
        image = load_image(path, self.image_size, box, **self.preprocess.eval_args())
        return {"image": image, "label": self.labels[index]}

    def __repr__(self) -> str:
        return (
            f"RevisitedSource(root={self.root!r}, dataset={self.dataset!r}, split={self.split!r}, "
            f"images={len(self)}, image_size={self.image_size}, crop_queries={self.crop_queries})"
        )


def rank_database(query_emb, database_emb) -> np.ndarray:
    """(database_size, num_queries) int: column q lists database indices by descending dot
    product with query q; ties keep the lower index first (stable sort)."""
    scores = np.asarray(database_emb, dtype=np.float32) @ np.asarray(query_emb, np.float32).T
    return np.argsort(-scores, axis=0, kind="stable")


def evaluate(
    query_emb,
    database_emb,
    gnd: dict,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    kappas: Sequence[int] = (1, 5, 10),
    crop_queries: bool,
    query_kept=None,
    database_kept=None,
) -> dict:
    """revisitop mAP and mP@k of each protocol, as fractions in [0, 1].

    Args:
      query_emb: (num_queries, D) embeddings of `gnd['qimlist']`, in order.
      database_emb: (database_size, D) embeddings of `gnd['imlist']`, in order.
      gnd: the dict from `load_gnd` (or `RevisitedSource.gnd`).
      crop_queries: how the queries were embedded; recorded as 'query_crop' in the result.
      query_kept, database_kept: when images were skipped as unreadable, the pickle positions
        of the embedded ones (`RevisitedSource.kept`): a skipped query is not scored, a skipped
        database image stays relevant but is never retrieved.

    Returns:
      ``{'query_crop': bool, '<protocol>': {'mAP': float, 'mP@<k>': float, ...}, ...}``.
    """
    query_emb, database_emb = np.asarray(query_emb), np.asarray(database_emb)
    entries = list(gnd["gnd"])
    query_kept = np.arange(len(entries)) if query_kept is None else np.asarray(query_kept)
    database_kept = (
        np.arange(len(gnd["imlist"])) if database_kept is None else np.asarray(database_kept)
    )
    for what, emb, count in (
        ("query", query_emb, len(query_kept)),
        ("database", database_emb, len(database_kept)),
    ):
        if emb.ndim != 2 or emb.shape[0] != count:
            names = gnd["qimlist"] if what == "query" else gnd["imlist"]
            raise ValueError(
                f"{what} embeddings have shape {emb.shape}, but the ground truth lists "
                f"{len(names)} {what} images ({count} kept): expected ({count}, D), in pickle "
                "order."
            )
    if query_emb.shape[1] != database_emb.shape[1]:
        raise ValueError(
            f"Query and database embedding sizes differ: {query_emb.shape[1]} vs "
            f"{database_emb.shape[1]}."
        )
    ranks = database_kept[rank_database(query_emb, database_emb)]  # pickle positions
    scored = [entries[q] for q in query_kept]
    results: dict = {"query_crop": bool(crop_queries)}
    for protocol in protocols:
        mean_ap, _, mean_pr, _ = metrics.compute_map(ranks, protocol_gnd(scored, protocol), kappas)
        row = {"mAP": float(mean_ap)}
        row.update({f"mP@{k}": float(p) for k, p in zip(kappas, np.atleast_1d(mean_pr))})
        results[protocol] = row
    return results


def retrieval_test(cfg, dataset: str) -> RetrievalTest:
    """The `dataset` test (roxford5k or rparis6k) of data.revisited: its root holds <dataset>/,
    scored with data.revisited.protocols, queries cropped to their box or not (crop_queries)."""
    r = cfg.revisited
    if not r.root:
        raise ValueError(
            f"data.gldv2.tests has {dataset!r}, which needs data.revisited.root: the folder "
            f"holding {dataset}/gnd_{dataset}.pkl and {dataset}/jpg/."
        )
    require_dir(r.root, "data.revisited.root")
    root = posixpath.join(r.root, dataset)
    options = {
        "image_size": cfg.image_size,
        "crop_queries": r.crop_queries,
        "preprocess": images.preprocess_from_config(cfg),
    }
    options.update(images.read_options(cfg))
    query, database = (RevisitedSource(root, dataset, split, **options) for split in SPLITS)
    if query.skipped or database.skipped:
        logging.warning(
            "%s: %d queries skipped (not scored), %d database images skipped (never retrieved): %s",
            dataset,
            len(query.skipped),
            len(database.skipped),
            preview(query.skipped + database.skipped),
        )

    def score(query_emb, gallery_emb, eval_cfg):
        out = evaluate(
            query_emb,
            gallery_emb,
            query.gnd,
            protocols=tuple(r.protocols),
            crop_queries=r.crop_queries,
            query_kept=query.kept,
            database_kept=database.kept,
        )
        out.pop("query_crop")
        return {f"{p}/{k}": v for p, row in out.items() for k, v in row.items()}

    queries = "cropped to their box" if r.crop_queries else "whole (no box crop)"
    return RetrievalTest(
        dataset,
        query,
        database,
        score,
        protocol=f"revisitop mAP and mP@k, {'/'.join(r.protocols)}; queries {queries}",
        columns=tuple(f"{p}/mAP" for p in r.protocols),
    )
