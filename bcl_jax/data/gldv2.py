"""Google Landmarks v2 in its released file layout (method.md §7-§8).

Files read::

    train_clean.csv           landmark_id,images       one row per landmark, ids space-separated
    train.csv                 id,url,landmark_id       one row per image
    retrieval_solution_v2.1.csv  id,images,Usage       test query -> relevant index ids
    <root>/<folder>/<a>/<b>/<c>/<id>.jpg               folder = train, index or test; a, b, c are
                                                       the id's first three characters

`read_train_csv` detects the CSV format from its header. Labels are dense 0..C-1 over the sorted
landmark ids. `GLDv2Train` is a grain random-access source. The old model's share of the data
(`splits.old_split`) is saved as a checksummed split file (`split_file`: `write_split`,
`read_split`; `old_split_for` draws one, `split_from_advbct` converts AdvBCT's published lists).
`evaluate_retrieval` computes the challenge's mAP@100 with Public and Private queries reported
apart. Paths may be local or on any etils.epath filesystem (gs://...). `build` wires
data.name=gldv2: the training set, its recorded old split and the tests of data.gldv2.tests.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Collection, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

from bcl_jax import knn, metrics
from bcl_jax.data import images, prepared, revisited, split_file
from bcl_jax.data.dataset import DatasetParts, RetrievalTest, preview, require_dir, require_file
from bcl_jax.data.images import CorruptImageError, ImageList, check_image_size  # noqa: F401
from bcl_jax.data.split_file import read_split, read_split_file, write_split
from bcl_jax.data.splits import OldSplit, old_split

__all__ = [
    "TESTS",
    "USAGES",
    "GLDv2Train",
    "TestImages",
    "build",
    "evaluate_retrieval",
    "image_path",
    "old_split_for",
    "read_id_csv",
    "read_retrieval_solution",
    "read_split",
    "read_split_file",
    "read_train_csv",
    "retrieval_queries",
    "split_from_advbct",
    "write_split",
]

CLEAN_HEADER = ("landmark_id", "images")
FULL_HEADER = ("id", "url", "landmark_id")
SOLUTION_HEADER = ("id", "images", "Usage")
USAGES = ("Public", "Private", "Ignored")
SOLUTION_FILE = "retrieval_solution_v2.1.csv"
INDEX_FILE = "index.csv"
TESTS = ("roxford5k", "rparis6k", "gldv2")  # data.gldv2.tests: Revisited Oxford/Paris, GLDv2's own


def _rows(path: str):
    """Yields (1-based line number, row): first the stripped header (also for an empty file, as
    an empty tuple), then every non-blank row. Parse errors name the file and line."""
    text = epath.Path(path).read_bytes().decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        first = True
        while True:
            try:
                row = next(reader)
            except StopIteration:
                if first:
                    yield 1, ()
                return
            except csv.Error as e:
                raise ValueError(f"{path}: line {reader.line_num}: bad CSV ({e}).") from e
            if first:
                first = False
                yield reader.line_num, tuple(h.strip() for h in row)
            elif row and not (len(row) == 1 and not row[0].strip()):
                yield reader.line_num, row


def _check_image_id(path: str, line: int, image_id: str):
    if len(image_id) < 3 or any(c in image_id for c in "/\\. ") or not image_id.isprintable():
        raise ValueError(
            f"{path}: line {line}: invalid image id {image_id!r} (need at least 3 characters, "
            "no '/', '\\', '.' or spaces)."
        )


def _parse_landmark(path: str, line: int, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{path}: line {line}: landmark id {text!r} is not an integer.") from None


def read_train_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Reads `train_clean.csv` (landmark_id,images) or `train.csv` (id,url,landmark_id).

    Returns:
      image_ids: in file order (train_clean: row by row, each row's ids in order).
      labels: int32 (num_images,), dense 0..C-1 over the sorted landmark ids.
      landmark_ids: int64 (C,), sorted; `landmark_ids[label]` is the original landmark id.

    Raises:
      ValueError naming the file and 1-based line for: an unknown header, a wrong column count, a
      non-integer landmark id, an empty image list, a duplicate image id (or a landmark listed on
      two rows of train_clean.csv), an invalid image id; or when the file has no images.
    """
    path = os.fspath(path)
    rows = _rows(path)
    _, header = next(rows)
    image_ids: list[str] = []
    raw: list[int] = []
    seen: dict[str, int] = {}  # image id -> line where first seen

    def add(line, image_id, landmark):
        _check_image_id(path, line, image_id)
        if image_id in seen:
            raise ValueError(
                f"{path}: line {line}: duplicate image id {image_id!r} (first on line "
                f"{seen[image_id]})."
            )
        seen[image_id] = line
        image_ids.append(image_id)
        raw.append(landmark)

    if header == CLEAN_HEADER:
        landmark_line: dict[int, int] = {}
        for line, row in rows:
            if len(row) != 2:
                raise ValueError(
                    f"{path}: line {line}: expected 2 columns (landmark_id,images), got {len(row)}."
                )
            landmark = _parse_landmark(path, line, row[0])
            if landmark in landmark_line:
                raise ValueError(
                    f"{path}: line {line}: landmark id {landmark} repeated (first on line "
                    f"{landmark_line[landmark]})."
                )
            landmark_line[landmark] = line
            ids = row[1].split()
            if not ids:
                raise ValueError(f"{path}: line {line}: empty image list for landmark {landmark}.")
            for image_id in ids:
                add(line, image_id, landmark)
    elif header == FULL_HEADER:
        for line, row in rows:
            if len(row) != 3:
                raise ValueError(
                    f"{path}: line {line}: expected 3 columns (id,url,landmark_id), got {len(row)}."
                )
            add(line, row[0].strip(), _parse_landmark(path, line, row[2]))
    else:
        raise ValueError(
            f"{path}: line 1: unknown header {','.join(header)!r}; expected "
            f"{','.join(CLEAN_HEADER)!r} (train_clean.csv) or {','.join(FULL_HEADER)!r} "
            "(train.csv)."
        )
    if not image_ids:
        raise ValueError(f"{path}: no images listed.")
    landmark_ids, labels = np.unique(np.asarray(raw, dtype=np.int64), return_inverse=True)
    return image_ids, labels.astype(np.int32).reshape(-1), landmark_ids


def read_id_csv(path: str | os.PathLike) -> list[str]:
    """Reads a CSV whose first column is `id` (GLDv2's index.csv and test.csv): ids in file order.

    Raises FileNotFoundError, or ValueError naming the file and 1-based line for another header,
    an invalid or duplicate id, or a file without ids.
    """
    path = os.fspath(path)
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"GLDv2 id list {path!r} not found.")
    rows = _rows(path)
    _, header = next(rows)
    if not header or header[0] != "id":
        raise ValueError(f"{path}: line 1: expected a header starting with 'id', got {header!r}.")
    ids, seen = [], {}
    for line, row in rows:
        image_id = row[0].strip()
        _check_image_id(path, line, image_id)
        if image_id in seen:
            raise ValueError(
                f"{path}: line {line}: duplicate id {image_id!r} (first on line {seen[image_id]})."
            )
        seen[image_id] = line
        ids.append(image_id)
    if not ids:
        raise ValueError(f"{path}: no ids listed.")
    return ids


def image_path(root: str | os.PathLike, image_id: str, folder: str = "train") -> str:
    """`<root>/<folder>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg`; folder is train, index or test."""
    if len(image_id) < 3:
        raise ValueError(f"Image id {image_id!r} is shorter than 3 characters.")
    # posixpath: joins gs://... roots too, and is fast for GLDv2's 1.6M ids.
    return posixpath.join(
        os.fspath(root), folder, image_id[0], image_id[1], image_id[2], image_id + ".jpg"
    )


class GLDv2Train(ImageList):
    """Random-access source (grain protocol) over the GLDv2 training images.

    `ds[i]` -> {"image": uint8 (image_size, image_size, 3), "label": int32 scalar}; images are
    decoded with `images.load_image` (shorter side resized, centre-cropped), and an undecodable
    file raises `CorruptImageError` when read.

    Attributes: csv_path, root, folder, image_size, image_ids (= ids), labels (int32),
    landmark_ids (label -> landmark id), num_classes, paths, skipped.

    The files are scanned at construction (`images.scan`; `scan='off'` skips it, e.g. for a huge
    bucket): missing or unreadable files stop with their paths, or with `skip_corrupt` are
    dropped (a landmark left without images stops). `check_files=False` is `scan='off'`.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        root: str | os.PathLike,
        *,
        image_size: int,
        folder: str = "train",
        check_files: bool = True,
        skip_corrupt: bool = False,
        scan: str = "header",
        preprocess: images.Preprocess | None = None,
    ):
        self.preprocess = images.Preprocess.of(image_size, preprocess)
        self.csv_path, self.root, self.folder = os.fspath(csv_path), os.fspath(root), folder
        self.image_size = int(image_size)
        image_ids, labels, self.landmark_ids = read_train_csv(self.csv_path)
        self.num_classes = len(self.landmark_ids)
        paths = [image_path(self.root, i, folder) for i in image_ids]
        what = f"GLDv2 {folder} images of {self.csv_path} (<root>/{folder}/<a>/<b>/<c>/<id>.jpg)"
        keep, self.skipped = images.scan(
            paths, what=what, skip_corrupt=skip_corrupt, mode=scan if check_files else "off"
        )
        self.image_ids = [image_ids[i] for i in keep]
        self.ids = self.image_ids
        self.paths = [paths[i] for i in keep]
        self.labels = labels[keep]
        if self.skipped:
            images.check_classes_kept(self.labels, self.landmark_ids.tolist(), f"GLDv2 {what}")

    def __repr__(self) -> str:
        return (
            f"GLDv2Train(csv={self.csv_path!r}, root={self.root!r}, images={len(self)}, "
            f"classes={self.num_classes}, image_size={self.image_size})"
        )


class TestImages(ImageList):
    """Random-access source over the retrieval test's `index/` or `test/` images, in `ids` order.

    `ds[i]['label']` is i (relevance comes from the solution file). Attributes: root, folder,
    ids, paths, labels, num_classes, image_size, skipped (ids dropped by the scan with
    `skip_corrupt`: `skipped_ids`). Missing or unreadable files stop at construction with their
    paths (see `images.scan`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        folder: str,
        ids: Sequence[str],
        *,
        image_size: int,
        skip_corrupt: bool = False,
        scan: str = "header",
        preprocess: images.Preprocess | None = None,
    ):
        self.root, self.folder = os.fspath(root), folder
        self.preprocess = images.Preprocess.of(image_size, preprocess)
        self.image_size = check_image_size(image_size)
        ids = list(ids)
        paths = [image_path(self.root, i, folder) for i in ids]
        what = f"GLDv2 {folder} images (<root>/{folder}/<a>/<b>/<c>/<id>.jpg)"
        keep, self.skipped = images.scan(paths, what=what, skip_corrupt=skip_corrupt, mode=scan)
        kept = set(keep.tolist())
        self.skipped_ids = [i for k, i in enumerate(ids) if k not in kept]
        self.ids = [ids[k] for k in keep]
        self.paths = [paths[k] for k in keep]
        self.labels = np.arange(len(self.ids), dtype=np.int32)
        self.num_classes = len(self.ids)

    def __repr__(self) -> str:
        return f"TestImages(root={self.root!r}, folder={self.folder!r}, images={len(self)})"


# ---------------------------------------------------------------------------------------------
# Old splits of a training CSV.


def old_split_for(
    csv_path: str | os.PathLike,
    *,
    fraction: float,
    mode: str,
    seed: int,
    out: str | os.PathLike | None = None,
) -> OldSplit:
    """Draws the old split of a training CSV with `splits.old_split`; writes it to `out` if given.

    `splits.old_split` takes floor(fraction × C) classes: 0.3 × 81,313 gives 24,393, as
    method.md §8 quotes.
    """
    image_ids, labels, landmark_ids = read_train_csv(csv_path)
    split = old_split(labels, len(landmark_ids), fraction=fraction, mode=mode, seed=seed)
    if out is not None:
        write_split(out, split, image_ids=image_ids, seed=seed, mode=mode, fraction=fraction)
    return split


def split_from_advbct(
    txt_path: str | os.PathLike,
    csv_path: str | os.PathLike,
    *,
    out: str | os.PathLike,
    mode: str = "classes",
    fraction: float = 0.3,
    seed: int = 666,
) -> OldSplit:
    """AdvBCT's published GLDv2 old split (`split_file.from_advbct`: its
    gldv2_train_old_30percent_class.txt, mode 'classes', or ..._data.txt, mode 'images') over
    the training CSV, written to `out` as a checksummed split file.

    `fraction` and `seed` are recorded as AdvBCT drew them (30%, numpy seed 666): train with
    data.gldv2.split_file=`out`, data.old_split=`mode`, data.old_fraction=`fraction` and
    data.split_seed=`seed`.
    """
    image_ids, labels, _ = read_train_csv(csv_path)
    split = split_file.from_advbct(txt_path, image_ids, labels, mode=mode)
    source = f"AdvBCT split list {posixpath.basename(os.fspath(txt_path))}"
    write_split(
        out, split, image_ids=image_ids, seed=seed, mode=mode, fraction=fraction, source=source
    )
    return split


# ---------------------------------------------------------------------------------------------
# Retrieval test.


def read_retrieval_solution(path: str | os.PathLike) -> dict[str, tuple[list[str], str]]:
    """Reads `retrieval_solution_v2.1.csv` -> {query_id: (index_ids, usage)}.

    usage is Public, Private or Ignored; 'None' (or an empty cell) gives an empty list.
    ValueError (file and 1-based line) on a wrong header, column count, usage or duplicate query.
    """
    path = os.fspath(path)
    rows = _rows(path)
    _, header = next(rows)
    if header != SOLUTION_HEADER:
        raise ValueError(
            f"{path}: line 1: unknown header {','.join(header)!r}; expected "
            f"{','.join(SOLUTION_HEADER)!r}."
        )
    solution: dict[str, tuple[list[str], str]] = {}
    for line, row in rows:
        if len(row) != 3:
            raise ValueError(
                f"{path}: line {line}: expected 3 columns (id,images,Usage), got {len(row)}."
            )
        query, images, usage = row[0].strip(), row[1].split(), row[2].strip()
        if not query:
            raise ValueError(f"{path}: line {line}: empty query id.")
        if usage not in USAGES:
            raise ValueError(f"{path}: line {line}: Usage {usage!r} is not one of {USAGES}.")
        if query in solution:
            raise ValueError(f"{path}: line {line}: duplicate query id {query!r}.")
        if images == ["None"]:
            images = []
        solution[query] = (images, usage)
    return solution


def retrieval_queries(solution: Mapping[str, tuple[Sequence[str], str]]) -> list[str]:
    """The query ids that the test scores: Public or Private usage with a non-empty ground truth,
    in solution order (1,129 in retrieval_solution_v2.1.csv)."""
    return [q for q, (imgs, usage) in solution.items() if usage != "Ignored" and imgs]


def _id_index(ids: Sequence[str], what: str) -> dict[str, int]:
    index = {s: i for i, s in enumerate(ids)}
    if len(index) != len(ids):
        seen, dup = set(), []
        for s in ids:
            if s in seen:
                dup.append(s)
            seen.add(s)
        raise ValueError(f"{what} has duplicate ids: {preview(dup)}.")
    return index


def evaluate_retrieval(
    query_ids: Sequence[str],
    query_emb,
    index_ids: Sequence[str],
    index_emb,
    solution: Mapping[str, tuple[Sequence[str], str]],
    k: int = 100,
    block: int | tuple[int, int] = (1024, 32768),
    unretrievable: Collection[str] = (),
) -> dict[str, float | int]:
    """GLDv2 retrieval mAP@k (dot-product ranking), Public and Private queries apart.

    Only queries with usage Public or Private and a non-empty ground truth are scored (and only
    they are searched); query ids not in the solution are ignored. Ranking uses `knn.topk` with
    blocks `block` = (query_block, gallery_block) or one int for both, so the full Q×N
    similarity is never built. Embeddings are used as given (L2-normalise them for cosine).

    Returns {'public', 'private': mAP@k (NaN when no such query), 'num_public', 'num_private'}.

    `unretrievable`: solution index ids that have no embedding (images skipped as unreadable):
    they stay relevant but are never retrieved, so they count as misses.

    Raises ValueError on embedding/id count mismatches, duplicate ids, scored solution query ids
    absent from `query_ids` (Ignored ones need not be embedded), or solution index ids absent
    from `index_ids` and not in `unretrievable` (a few are named).
    """
    query_emb, index_emb = np.asarray(query_emb), np.asarray(index_emb)
    if query_emb.ndim != 2 or index_emb.ndim != 2:
        raise ValueError(
            f"Embeddings must be 2-D; got {query_emb.shape} (queries), {index_emb.shape} (index)."
        )
    if query_emb.shape[0] != len(query_ids):
        raise ValueError(f"{query_emb.shape[0]} query embeddings but {len(query_ids)} query ids.")
    if index_emb.shape[0] != len(index_ids):
        raise ValueError(f"{index_emb.shape[0]} index embeddings but {len(index_ids)} index ids.")
    q_pos = _id_index(query_ids, "query_ids")
    i_pos = _id_index(index_ids, "index_ids")
    absent_q = [q for q in retrieval_queries(solution) if q not in q_pos]
    if absent_q:
        raise ValueError(
            f"{len(absent_q)} scored (Public/Private) solution query ids are not in query_ids: "
            f"{preview(absent_q)}."
        )
    # Never-retrieved positions for unembedded relevant images: distinct, below every index row.
    i_pos = i_pos | {i: -1 - n for n, i in enumerate(sorted(set(unretrievable) - set(i_pos)))}
    absent_i = sorted({i for imgs, _ in solution.values() for i in imgs if i not in i_pos})
    if absent_i:
        raise ValueError(
            f"{len(absent_i)} solution index ids are not in index_ids: {preview(absent_i)}."
        )
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    qb, gb = (block, block) if isinstance(block, (int, np.integer)) else block

    result: dict[str, float | int] = {}
    for usage, name in (("Public", "public"), ("Private", "private")):
        scored = [(q, imgs) for q, (imgs, u) in solution.items() if u == usage and imgs]
        result[f"num_{name}"] = len(scored)
        if not scored:
            result[name] = float("nan")
            continue
        rows = np.asarray([q_pos[q] for q, _ in scored])
        _, idx = knn.topk(
            query_emb[rows],
            index_emb,
            min(k, len(index_ids)),
            query_block=int(qb),
            gallery_block=int(gb),
        )
        positives = [[i_pos[i] for i in imgs] for _, imgs in scored]
        result[name], _ = metrics.map_at_k(np.asarray(idx), positives, k=k)
    return result


# ---------------------------------------------------------------------------------------------
# Wiring: data.name=gldv2.


def build(cfg, workdir: str | None) -> DatasetParts:
    """The GLDv2 training set (raw files, or `data.prepared`), its recorded old split, and the
    tests of data.gldv2.tests in that order."""
    g = cfg.gldv2
    unknown = set(g.tests) - set(TESTS)
    if unknown:
        raise ValueError(f"data.gldv2.tests has {sorted(unknown)}; use some of {TESTS}.")
    if cfg.prepared:
        train, split = prepared.train_and_split(cfg)
    else:
        if not g.root:
            raise ValueError("data.name=gldv2 needs data.gldv2.root (or data.prepared).")
        require_dir(g.root, "data.gldv2.root")
        csv_path = os.path.join(g.root, g.csv)
        require_file(csv_path, "data.gldv2.csv", "GLDv2 training CSV")
        options = {**images.read_options(cfg), "preprocess": images.preprocess_from_config(cfg)}
        train = GLDv2Train(csv_path, g.root, image_size=cfg.image_size, **options)
        split = _recorded_split(cfg, train, workdir)
    tests = [
        retrieval_test(cfg) if name == "gldv2" else revisited.retrieval_test(cfg, name)
        for name in g.tests
    ]
    description = f"GLDv2 {os.path.basename(g.csv)} ({g.root or cfg.prepared})"
    return DatasetParts(train=train, tests=tests, description=description, old_split=split)


def _recorded_split(cfg, train: GLDv2Train, workdir: str | None) -> OldSplit:
    """The old split from data.gldv2.split_file, or drawn and saved there (default: the workdir)."""
    path = cfg.gldv2.split_file or (workdir and os.path.join(workdir, "old_split.json"))
    asked = {"fraction": cfg.old_fraction, "mode": cfg.old_split, "seed": cfg.split_seed}
    if path and epath.Path(path).exists():
        split, meta = read_split_file(path, image_ids=train.image_ids)
        if any(meta[k] != v for k, v in asked.items()):
            raise ValueError(
                f"{path} holds the split fraction={meta['fraction']} mode={meta['mode']} "
                f"seed={meta['seed']}, but the config asks for {asked}; point "
                "data.gldv2.split_file elsewhere or match the config to the file."
            )
        return split
    split = old_split(train.labels, train.num_classes, **asked)
    if path and jax.process_index() == 0:
        write_split(path, split, image_ids=train.image_ids, **asked)
    return split


def retrieval_test(cfg) -> RetrievalTest:
    """GLDv2's retrieval test: the solution's scored queries against index.csv's images, from
    the raw files or from `data.prepared` (which holds a copy of the solution file)."""
    g = cfg.gldv2
    solution_path = os.path.join(cfg.prepared or g.root, SOLUTION_FILE)
    where = "data.prepared" if cfg.prepared else "data.gldv2.root"
    require_file(solution_path, where, "GLDv2 retrieval solution (data.gldv2.tests has 'gldv2')")
    solution = read_retrieval_solution(solution_path)
    if cfg.prepared:
        query, index = (prepared.source(cfg, split) for split in ("test", "index"))
    else:
        index_csv = os.path.join(g.root, INDEX_FILE)
        require_file(
            index_csv, "data.gldv2.root", "GLDv2 index list (data.gldv2.tests has 'gldv2')"
        )
        options = {
            "image_size": cfg.image_size,
            "preprocess": images.preprocess_from_config(cfg),
            **images.read_options(cfg),
        }
        query = TestImages(g.root, "test", retrieval_queries(solution), **options)
        index = TestImages(g.root, "index", read_id_csv(index_csv), **options)
    solution = _scorable(solution, query, index)

    def score(query_emb, gallery_emb, eval_cfg):
        out = evaluate_retrieval(
            query.ids,
            query_emb,
            index.ids,
            gallery_emb,
            solution,
            unretrievable=set(getattr(index, "skipped_ids", ())),
        )
        return {
            "mAP@100/private": out["private"],
            "mAP@100/public": out["public"],
            "num_private": out["num_private"],
            "num_public": out["num_public"],
        }

    return RetrievalTest(
        "gldv2",
        query,
        index,
        score,
        protocol="GLDv2 retrieval test: mAP@100, Private and Public queries apart",
        columns=("mAP@100/private", "mAP@100/public"),
    )


def _scorable(solution: dict, query, index) -> dict:
    """`solution` without the scored queries that were skipped as unreadable (they cannot be
    embedded), with a warning; relevant index images that were skipped stay, as misses."""
    skipped = set(getattr(query, "skipped_ids", ()))
    if not skipped and not getattr(index, "skipped_ids", ()):
        return solution
    kept = {q: v for q, v in solution.items() if q not in skipped}
    logging.warning(
        "GLDv2 retrieval test: %d scored queries and %d index images were skipped as unreadable; "
        "the queries are not scored, the index images count as never retrieved.",
        len(solution) - len(kept),
        len(getattr(index, "skipped_ids", ())),
    )
    return kept
