r"""Converts a raw dataset download into ArrayRecord shards that `prepared.PreparedSource` reads.

Usage::

    python -m bcl_jax.data.prepare --dataset=gldv2 --src=/data/gldv2 --dst=/data/gldv2_256 \
        [--image_size=256] [--quality=95] [--shard_size=1024] [--workers=<cpus>] \
        [--csv=train_clean.csv] [--old_fraction=0.3] [--old_split=classes] [--split_seed=0]

Splits:
  gldv2   train from <src>/<csv>; with <src>/index.csv and <src>/retrieval_solution_v2.1.csv also
          index (index.csv ids) and test (the solution's Public/Private queries with ground
          truth, in solution order); the solution file is copied to dst. index and test labels
          are positions: every image is its own class.
  inshop  train, query, gallery from <src>/list_eval_partition.txt.
  folder  train from <src>/train; query and gallery from <src>/query and <src>/gallery when
          both exist (class folders, as `folder.ImageFolder`).

Every image is decoded with `images.load_image` (RGB, shorter side resized to image_size,
centre-cropped) in a thread pool and stored as JPEG bytes, one record per image, in
`<split>-<k>-of-<n>.array_record` shards of `shard_size` images. Written to dst as well:
`<split>.labels.npy` (int32), `<split>.ids.txt` (GLDv2 image ids, else paths relative to src),
`unreadable.txt` (split<TAB>path<TAB>error), `old_split.json` (the old model's share of train,
`split_file.write_split`), `prepare_args.json`, and `manifest.json`, last.

Unreadable or missing images are dropped, listed and warned about; a train class left without
images, or a split left empty, stops the run. Each finished shard is renamed into place and gets a
sidecar `<shard>.json`, so re-running the same command resumes an interrupted run (the output is
byte-identical to an uninterrupted one) and re-draws only the old split when --old_* changed.
Re-running on a dst prepared from other data or at another size or quality stops with an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import posixpath

import numpy as np
import tqdm
from absl import app, flags, logging
from array_record.python import array_record_module
from etils import epath
from PIL import Image

from bcl_jax.data import folder, gldv2, images, inshop, prepared, split_file, splits
from bcl_jax.data.dataset import preview
from bcl_jax.data.storage import absolute, write_atomic

DATASETS = ("gldv2", "inshop", "folder")
ARGS_FILE = "prepare_args.json"
UNREADABLE_FILE = "unreadable.txt"
OLD_SPLIT_FILE = "old_split.json"
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: fast random access


@dataclasses.dataclass
class SplitList:
    """One split of a raw dataset, before decoding.

    paths: the source image files; ids: the id of each (stored in `<split>.ids.txt`); labels:
    int32; classes: the label space, or None when every image is its own class (labels are then
    positions, renumbered over the images that could be read).
    """

    name: str
    paths: list[str]
    ids: list[str]
    labels: np.ndarray
    classes: list[str] | None


def _in_src(source: folder.ImageFolder, src: str) -> list[str]:
    """The source's ids (paths relative to its folder, NFC) as paths relative to `src`."""
    prefix = posixpath.relpath(source.root, src)
    return [f"{prefix}/{i}" for i in source.ids]


def list_splits(
    dataset: str, src: str, *, csv: str = "train_clean.csv"
) -> tuple[list[SplitList], dict[str, str]]:
    """The splits of the raw dataset in `src`, and extra files to copy: {name in dst: path}."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; expected one of {DATASETS}.")
    if not epath.Path(src).is_dir():
        raise FileNotFoundError(f"Source directory {src!r} does not exist (--src).")
    if dataset == "gldv2":
        return _gldv2_splits(src, csv)
    if dataset == "inshop":
        partition = inshop.read_partition(src)
        result = []
        for name in inshop.SPLITS:
            part = partition[name]
            paths = [posixpath.join(src, p) for p in part.paths]
            result.append(SplitList(name, paths, list(part.paths), part.labels, list(part.classes)))
        return result, {}
    # Unreadable files are found and listed while encoding: no scan here.
    train = folder.ImageFolder(posixpath.join(src, "train"), image_size=1, scan="off")
    result = [SplitList("train", train.paths, _in_src(train, src), train.labels, train.classes)]
    query_dir, gallery_dir = posixpath.join(src, "query"), posixpath.join(src, "gallery")
    has_query, has_gallery = epath.Path(query_dir).is_dir(), epath.Path(gallery_dir).is_dir()
    if has_query and has_gallery:
        for source in folder.eval_folders(query_dir, gallery_dir, image_size=1, scan="off"):
            name = posixpath.basename(source.root)
            ids = _in_src(source, src)
            result.append(SplitList(name, source.paths, ids, source.labels, source.classes))
    elif has_query or has_gallery:
        logging.warning(
            "%s has only one of query/ and gallery/; both are needed, so neither is prepared.", src
        )
    return result, {}


def _gldv2_splits(src: str, csv: str) -> tuple[list[SplitList], dict[str, str]]:
    csv_path = posixpath.join(src, csv)
    if not epath.Path(csv_path).is_file():
        raise FileNotFoundError(
            f"GLDv2 training CSV {csv_path!r} not found; pass --csv=train_clean.csv or train.csv "
            "(a file in --src)."
        )
    image_ids, labels, landmark_ids = gldv2.read_train_csv(csv_path)
    paths = [gldv2.image_path(src, i, "train") for i in image_ids]
    classes = [str(x) for x in landmark_ids.tolist()]
    result = [SplitList("train", paths, image_ids, labels, classes)]
    index_csv = posixpath.join(src, gldv2.INDEX_FILE)
    solution_csv = posixpath.join(src, gldv2.SOLUTION_FILE)
    if not (epath.Path(index_csv).is_file() and epath.Path(solution_csv).is_file()):
        logging.warning(
            "GLDv2: %s and %s are not both in %s; only train is prepared (no retrieval test).",
            gldv2.INDEX_FILE,
            gldv2.SOLUTION_FILE,
            src,
        )
        return result, {}
    index_ids = gldv2.read_id_csv(index_csv)
    solution = gldv2.read_retrieval_solution(solution_csv)
    test_ids = gldv2.retrieval_queries(solution)
    for name, ids in (("index", index_ids), ("test", test_ids)):
        paths = [gldv2.image_path(src, i, name) for i in ids]
        result.append(SplitList(name, paths, list(ids), np.arange(len(ids), dtype=np.int32), None))
    return result, {gldv2.SOLUTION_FILE: solution_csv}


# ---------------------------------------------------------------------------------------------
# Shards.


def shard_name(split: str, k: int, n: int) -> str:
    return f"{split}-{k:05d}-of-{n:05d}.array_record"


def _encode(path: str, *, image_size: int, quality: int) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None), or (None, why) for a missing or undecodable file."""
    try:
        image = images.load_image(path, image_size)
    except FileNotFoundError:
        return None, "file not found"
    except images.CorruptImageError as e:
        return None, e.reason
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), None


def _write_shard(path: str, records: list[bytes]) -> None:
    """Writes `records` to `path` through a temporary file, renamed when complete."""
    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()
    epath.Path(tmp).replace(path)


def _list_digest(ids: list[str], labels: np.ndarray) -> str:
    """Checksum of a shard's share of the split list, so a resumed run sees a changed source."""
    text = "\n".join(f"{i}\t{int(c)}" for i, c in zip(ids, labels))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dumps(payload) -> str:
    return json.dumps(payload, sort_keys=True, indent=1, allow_nan=False) + "\n"


def _prepare_split(
    part: SplitList,
    dst: str,
    *,
    shard_size: int,
    encode,
    pool: concurrent.futures.Executor,
) -> tuple[list[str], list[int], list[dict]]:
    """Writes (or finds written) the shards of one split -> (shard names, kept, unreadable)."""
    n = len(part.paths)
    num_shards = -(-n // shard_size)
    names, kept, unreadable = [], [], []
    with tqdm.tqdm(total=n, desc=part.name, unit="img") as bar:
        for k in range(num_shards):
            name = shard_name(part.name, k, num_shards)
            start, stop = k * shard_size, min((k + 1) * shard_size, n)
            digest = _list_digest(part.ids[start:stop], part.labels[start:stop])
            shard, sidecar = posixpath.join(dst, name), posixpath.join(dst, name + ".json")
            if epath.Path(sidecar).is_file() and epath.Path(shard).is_file():
                done = json.loads(epath.Path(sidecar).read_text(encoding="utf-8"))
                if done["list_sha256"] != digest:
                    raise ValueError(
                        f"{sidecar}: images {start}..{stop - 1} of {part.name!r} differ from "
                        "those of the interrupted run in this directory (the source lists "
                        "changed); prepare into a fresh --dst."
                    )
                bar.update(stop - start)
            else:
                records, done = [], {"list_sha256": digest, "kept": [], "unreadable": []}
                results = pool.map(encode, part.paths[start:stop])
                for position, (record, error) in enumerate(results, start=start):
                    if record is None:
                        done["unreadable"].append({"path": part.paths[position], "error": error})
                    else:
                        records.append(record)
                        done["kept"].append(position)
                    bar.update(1)
                _write_shard(shard, records)
                write_atomic(sidecar, json.dumps(done, sort_keys=True) + "\n")
            names.append(name)
            kept.extend(done["kept"])
            unreadable.extend({"split": part.name, **u} for u in done["unreadable"])
    return names, kept, unreadable


def _check_kept(part: SplitList, kept: list[int], unreadable: list[dict]) -> None:
    if not kept:
        raise ValueError(
            f"All {len(part.paths)} {part.name!r} images are unreadable or missing, e.g. "
            f"{preview(u['path'] for u in unreadable)}; check --src."
        )
    if unreadable:
        logging.warning(
            "%d of %d %s images are unreadable or missing and were dropped: %s",
            len(unreadable),
            len(part.paths),
            part.name,
            preview(f"{u['path']} ({u['error']})" for u in unreadable),
        )
    if part.name == "train":
        counts = np.bincount(part.labels[kept], minlength=len(part.classes))
        empty = [part.classes[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(
                f"{len(empty)} train class(es) have no readable image left: "
                f"{preview(empty)}. Fix or restore their files (see the unreadable list "
                "above), or remove the classes from the source list."
            )


# ---------------------------------------------------------------------------------------------
# The whole dataset.


def _check_args(dst: str, args: dict) -> None:
    """Records the arguments on a first run; stops a rerun with other arguments."""
    path = posixpath.join(dst, ARGS_FILE)
    if epath.Path(path).is_file():
        saved = json.loads(epath.Path(path).read_text(encoding="utf-8"))
        diffs = [
            f"{k}: {saved.get(k)!r} there, {args.get(k)!r} now"
            for k in sorted(set(saved) | set(args))
            if saved.get(k) != args.get(k)
        ]
        if diffs:
            raise ValueError(
                f"{dst} was prepared with other arguments ({'; '.join(diffs)}). Use a fresh "
                "--dst, delete this one, or rerun with the same arguments to resume it."
            )
        return
    names = [p.name for p in epath.Path(dst).iterdir()]
    ours = [n for n in names if n == prepared.MANIFEST or n.endswith(".array_record")]
    if ours:
        raise ValueError(
            f"{dst} holds prepared files ({preview(sorted(ours))}) but no {ARGS_FILE}; "
            "use a fresh --dst."
        )
    write_atomic(path, _dumps(args))


def _check_arguments(dataset, image_size, quality, shard_size, workers, old_fraction, old_split):
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; expected one of {DATASETS}.")
    for key, value, low, high in (
        ("image_size", image_size, 1, None),
        ("quality", quality, 1, 100),
        ("shard_size", shard_size, 1, None),
        ("workers", workers if workers is not None else 1, 1, None),
    ):
        if not isinstance(value, int) or value < low or (high is not None and value > high):
            limit = f"in [{low}, {high}]" if high else f">= {low}"
            raise ValueError(f"--{key}={value!r} must be an int {limit}.")
    if old_split not in splits.MODES or not 0 < old_fraction <= 1:
        raise ValueError(
            f"--old_split={old_split!r} must be one of {splits.MODES} and --old_fraction="
            f"{old_fraction} in (0, 1]."
        )


def _listed_parts(dataset: str, src: str, csv: str) -> tuple[list[SplitList], dict[str, str]]:
    """The source's non-empty splits (train must have images) and its extra files."""
    parts, extra_files = list_splits(dataset, src, csv=csv)
    if not parts[0].paths:
        raise ValueError(f"{src}: the {dataset} source lists no train images.")
    for part in [p for p in parts if not p.paths]:
        logging.warning(
            "%s: the %s source lists no %s images; split skipped.", src, dataset, part.name
        )
    parts = [p for p in parts if p.paths]
    for part in parts:
        bad = [i for i in part.ids if "\n" in i or "\r" in i]
        if bad:
            raise ValueError(f"{part.name}: ids with line breaks cannot be stored: {bad[:3]}.")
    return parts, extra_files


def _write_lists(part: SplitList, dst: str, kept: list[int]) -> tuple[dict, tuple]:
    """Writes the kept images' labels and ids -> (manifest entry without shards, (ids, labels,
    num_classes))."""
    ids = [part.ids[i] for i in kept]
    if part.classes is None:  # Every image its own class: labels are positions.
        labels, classes, num_classes = np.arange(len(kept), dtype=np.int32), None, len(kept)
    else:
        labels, classes = part.labels[kept].astype(np.int32), part.classes
        num_classes = len(classes)
    buffer = io.BytesIO()
    np.save(buffer, labels, allow_pickle=False)
    ids_text = "".join(i + "\n" for i in ids).encode("utf-8")
    write_atomic(posixpath.join(dst, prepared.labels_file(part.name)), buffer.getvalue())
    write_atomic(posixpath.join(dst, prepared.ids_file(part.name)), ids_text)
    entry = {
        "count": len(ids),
        "num_classes": num_classes,
        "classes": classes,
        "ids_sha256": hashlib.sha256(ids_text).hexdigest(),
        "labels_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
    }
    return entry, (ids, labels, num_classes)


def _write_old_split(dst: str, train: tuple, *, fraction: float, mode: str, seed: int) -> dict:
    """Draws and writes the old split of the kept train images -> its manifest entry."""
    ids, labels, num_classes = train
    split = splits.old_split(labels, num_classes, fraction=fraction, mode=mode, seed=seed)
    old_path = posixpath.join(dst, OLD_SPLIT_FILE)
    split_file.write_split(old_path, split, image_ids=ids, seed=seed, mode=mode, fraction=fraction)
    return {
        "file": OLD_SPLIT_FILE,
        "fraction": float(fraction),
        "mode": mode,
        "seed": int(seed),
        "sha256": prepared.sha256_file(old_path),
        "num_old_classes": split.num_old_classes,
        "num_old_images": len(split.indices),
    }


def prepare(
    *,
    dataset: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    image_size: int = 256,
    quality: int = 95,
    shard_size: int = 1024,
    workers: int | None = None,
    csv: str = "train_clean.csv",
    old_fraction: float = 0.3,
    old_split: str = "classes",
    split_seed: int = 0,
) -> dict:
    """Prepares `dataset` from `src` into `dst` (see the module docstring); returns the manifest."""
    _check_arguments(dataset, image_size, quality, shard_size, workers, old_fraction, old_split)
    src, dst = absolute(src), absolute(dst)
    parts, extra_files = _listed_parts(dataset, src, csv)
    epath.Path(dst).mkdir(parents=True, exist_ok=True)
    args = {
        "dataset": dataset,
        "src": src,
        "csv": csv if dataset == "gldv2" else None,
        "image_size": image_size,
        "quality": quality,
        "shard_size": shard_size,
    }
    _check_args(dst, args)
    logging.info("Preparing %s from %s into %s: %s", dataset, src, dst, args)

    encode = functools.partial(_encode, image_size=image_size, quality=quality)
    split_entries, unreadable, train = {}, [], None
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for part in parts:
            shards, kept, lost = _prepare_split(
                part, dst, shard_size=shard_size, encode=encode, pool=pool
            )
            _check_kept(part, kept, lost)
            entry, lists = _write_lists(part, dst, kept)
            split_entries[part.name] = {**entry, "shards": shards, "num_unreadable": len(lost)}
            unreadable.extend(lost)
            train = lists if part.name == "train" else train
    old = _write_old_split(dst, train, fraction=old_fraction, mode=old_split, seed=split_seed)
    files = {}
    for name, path in extra_files.items():
        data = epath.Path(path).read_bytes()
        write_atomic(posixpath.join(dst, name), data)
        files[name] = hashlib.sha256(data).hexdigest()
    write_atomic(
        posixpath.join(dst, UNREADABLE_FILE),
        "".join(f"{u['split']}\t{u['path']}\t{u['error']}\n" for u in unreadable),
    )
    manifest = {
        "format": prepared.FORMAT,
        **{k: args[k] for k in ("dataset", "src", "csv", "image_size", "quality", "shard_size")},
        "splits": split_entries,
        "old_split": old,
        "files": files,
        "unreadable": unreadable,
    }
    write_atomic(posixpath.join(dst, prepared.MANIFEST), _dumps(manifest))
    logging.info(
        "Prepared %s in %s: %s; %d unreadable images dropped; old split: %d classes, %d images.",
        dataset,
        dst,
        ", ".join(f"{k} {v['count']} images" for k, v in split_entries.items()),
        len(unreadable),
        old["num_old_classes"],
        old["num_old_images"],
    )
    return manifest


# ---------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
    """The command line's flags (defined only when run as a program)."""
    flags.DEFINE_enum("dataset", None, DATASETS, "Raw dataset format.")
    flags.DEFINE_string("src", None, "Folder of the raw download.")
    flags.DEFINE_string("dst", None, "Output folder (created; a rerun resumes it).")
    flags.DEFINE_integer("image_size", 256, "Side of the stored square images.")
    flags.DEFINE_integer("quality", 95, "JPEG quality of the stored images.")
    flags.DEFINE_integer("shard_size", 1024, "Images per ArrayRecord shard.")
    flags.DEFINE_integer("workers", None, "Decoding threads (default: number of CPUs).")
    flags.DEFINE_string("csv", "train_clean.csv", "GLDv2 training CSV in --src.")
    flags.DEFINE_float("old_fraction", 0.3, "Old model's share of the training set.")
    flags.DEFINE_enum(
        "old_split", "classes", splits.MODES, "Share of the classes or of the images."
    )
    flags.DEFINE_integer("split_seed", 0, "Seed of the old split.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    opts = flags.FLAGS
    prepare(
        dataset=opts.dataset,
        src=opts.src,
        dst=opts.dst,
        image_size=opts.image_size,
        quality=opts.quality,
        shard_size=opts.shard_size,
        workers=opts.workers,
        csv=opts.csv,
        old_fraction=opts.old_fraction,
        old_split=opts.old_split,
        split_seed=opts.split_seed,
    )


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["dataset", "src", "dst"])
    app.run(main)
