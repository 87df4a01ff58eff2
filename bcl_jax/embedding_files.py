"""Embeddings as files: a set embedded by any model, from any framework, in a plain format.

A set named `<name>` in a directory is four files (a PyTorch or TensorFlow script can write them
with NumPy and json alone):

  <name>.npy         float32 (N, D): one row per item
  <name>.ids.txt     the N item ids, one per line, in the rows' order (UTF-8)
  <name>.labels.npy  int64 (N,): the items' labels, only when the set has labels
  <name>.json        the manifest: {"format": "bcl_jax.embeddings/1", "num_items": N, "dim": D,
                     "dtype": "float32", "has_labels": bool, "identity": {...},
                     "sha256": {"<name>.npy": hex digest, "<name>.ids.txt": ..., ...}}

`sha256` holds the digest of every other file of the set, as written; reading checks each file
against it and a file that differs stops (`storage.DamagedError`, naming it): a set whose rows,
ids or labels were changed or swapped for another set's after writing is never scored. A
manifest without `sha256` (an older bcl_jax, or a script that leaves it out) is read with a
warning.

`identity` is whatever the caller records about the model (architecture, weights digest,
checkpoint path, step, framework). Every file is written to a temporary name and renamed over
the final one, the manifest last. Paths go through `etils.epath`, so `gs://` works where a
backend for it is installed.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter

import numpy as np
from absl import logging
from etils import epath

from bcl_jax.data import storage

FORMAT = 'bcl_jax.embeddings/1'
# Rows further than this from unit norm are reported (they are normalised either way).
UNIT_NORM_TOLERANCE = 1e-3
_SHOWN = 5  # offending ids or rows quoted in an error


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
    """A loaded set: (N, D) float32 unit rows, their ids, labels (or None) and the manifest."""

    emb: np.ndarray
    ids: list[str]
    labels: np.ndarray | None
    manifest: dict


def model_identity(model, checkpoint_dir: str) -> dict:
    """What a manifest records of a bcl_jax model (a `stage.Trained`) and where it came from."""
    return dict(
        framework='bcl_jax',
        weights=model.identity(),
        model=model.describe(),
        checkpoint=checkpoint_dir,
        step=model.step,
    )


def file_paths(directory, name: str) -> dict[str, epath.Path]:
    """The four files of the set `name` in `directory` (keys emb, ids, labels, manifest)."""
    if not name or '/' in name or name.startswith('.'):
        raise ValueError(f'embedding set name must be a plain file stem; got {name!r}.')
    d = epath.Path(directory)
    return {
        'emb': d / f'{name}.npy',
        'ids': d / f'{name}.ids.txt',
        'labels': d / f'{name}.labels.npy',
        'manifest': d / f'{name}.json',
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _few(items) -> str:
    items = list(items)
    more = f' and {len(items) - _SHOWN} more' if len(items) > _SHOWN else ''
    return ', '.join(repr(x) for x in items[:_SHOWN]) + more


def _check_ids(ids: list[str], count: int, where: str):
    if len(ids) != count:
        raise ValueError(f'{where}: {len(ids)} ids for {count} embeddings; give one id per row.')
    bad = [i for i in ids if not i or '\n' in i or '\r' in i]
    if bad:
        raise ValueError(f'{where}: ids must be non-empty and on one line; got {_few(bad)}.')
    duplicates = [i for i, n in Counter(ids).items() if n > 1]
    if duplicates:
        raise ValueError(f'{where}: duplicate ids {_few(duplicates)}; each item needs its own id.')


def _check_labels(labels: np.ndarray, count: int, where: str) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != count:
        raise ValueError(
            f'{where}: labels must be ({count},), one per embedding; got shape {labels.shape}.'
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'{where}: labels must be integers; got dtype {labels.dtype}.')
    return labels.astype(np.int64)


def _check_finite(emb: np.ndarray, ids: list[str], where: str):
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise ValueError(
            f'{where}: {bad.size} rows hold NaN or inf, e.g. rows '
            f'{_few(f"{r} (id {ids[r]})" for r in bad)}; check the model that embedded them.'
        )


def write_embeddings(directory, name: str, emb, *, ids, labels=None, identity: dict) -> dict:
    """Writes the set `name` (see the module docstring) and returns its manifest.

    Args:
      directory: local or `gs://` folder (created if missing).
      name: the set's file stem, e.g. 'gallery_phi2'.
      emb: (N, D) embeddings, stored as float32 as given (normalised on read, not here).
      ids: N item ids (str(id) is stored), unique, in the rows' order.
      labels: optional (N,) integer labels.
      identity: JSON-serialisable facts about the model that embedded the set.
    """
    where = f'embeddings {name!r}'
    emb = np.asarray(emb)
    if emb.ndim != 2 or 0 in emb.shape:
        raise ValueError(f'{where}: emb must be a non-empty (N, D) array; got shape {emb.shape}.')
    emb = emb.astype(np.float32)
    ids = [str(i) for i in ids]
    _check_ids(ids, len(emb), where)
    _check_finite(emb, ids, where + ' (as float32)')
    if labels is not None:
        labels = _check_labels(np.asarray(labels), len(emb), where)
    if not isinstance(identity, dict):
        raise TypeError(f'{where}: identity must be a dict; got {type(identity).__name__}.')
    manifest = {
        'format': FORMAT,
        'num_items': int(emb.shape[0]),
        'dim': int(emb.shape[1]),
        'dtype': 'float32',
        'has_labels': labels is not None,
        'identity': identity,
    }
    try:
        manifest_text = json.dumps(manifest, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{where}: identity is not strict JSON ({e}).') from e

    paths = file_paths(directory, name)
    payloads = {
        'emb': _npy_bytes(emb),
        'ids': ''.join(i + '\n' for i in ids).encode('utf-8'),
    }
    if labels is not None:
        payloads['labels'] = _npy_bytes(labels)
    manifest[storage.DIGEST] = {
        paths[k].name: storage.bytes_digest(data) for k, data in payloads.items()
    }
    manifest_text = json.dumps(manifest, indent=1, allow_nan=False)
    paths['manifest'].parent.mkdir(parents=True, exist_ok=True)
    paths['manifest'].unlink(missing_ok=True)  # no manifest beside files it does not describe
    for key, data in payloads.items():
        storage.write_atomic(paths[key], data)
    storage.write_atomic(paths['manifest'], manifest_text.encode('utf-8'))
    if labels is None:  # a labels file left by an earlier write of this name is not this set's
        paths['labels'].unlink(missing_ok=True)
    return manifest


def _read_manifest(paths: dict, where: str) -> dict:
    if not paths['manifest'].exists():
        raise FileNotFoundError(f'{where}: no manifest {paths["manifest"]}.')
    try:
        manifest = json.loads(paths['manifest'].read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f'{where}: the manifest {paths["manifest"]} is not valid JSON ({e}).'
        ) from e
    if not isinstance(manifest, dict):
        raise ValueError(f'{where}: the manifest {paths["manifest"]} is not a JSON object.')
    if manifest.get('format') != FORMAT:
        raise ValueError(f'{where}: format {manifest.get("format")!r}, expected {FORMAT!r}.')
    for key in ('num_items', 'dim', 'dtype'):
        if key not in manifest:
            raise ValueError(f'{where}: the manifest has no {key!r}.')
    return manifest


def _reorder(ids: list[str], expected_ids, where: str) -> np.ndarray:
    """Row indices that put the file's rows in the order of `expected_ids` (compared as str)."""
    expected = [str(i) for i in expected_ids]
    row_of = {i: r for r, i in enumerate(ids)}
    missing = [i for i in expected if i not in row_of]
    unknown = sorted(set(ids) - set(expected))
    if missing or unknown or len(expected) != len(ids):
        raise ValueError(
            f'{where}: the ids do not match the dataset ({len(expected)} expected, {len(ids)} '
            f'in the file); missing: {_few(missing) or "none"}; not in the dataset: '
            f'{_few(unknown) or "none"}'
            + ('; the dataset ids repeat.' if not (missing or unknown) else '.')
        )
    return np.fromiter((row_of[i] for i in expected), dtype=np.int64, count=len(expected))


REMEDY = (
    'Write the set again (python -m bcl_jax.export, or embedding_files.write_embeddings), or '
    'restore the folder from a copy; never mix files of different sets or models.'
)


def _read_checked(path: epath.Path, manifest: dict, where: str) -> bytes:
    """The file's bytes, checked against the manifest's digest of it when it records one."""
    data = path.read_bytes()
    recorded = manifest.get(storage.DIGEST)
    if recorded is not None:
        if path.name not in recorded:
            raise storage.DamagedError(
                f'{where}: {path} is not listed in the manifest of the set. {REMEDY}'
            )
        storage.check_digest(path, storage.bytes_digest(data), recorded[path.name], remedy=REMEDY)
    return data


def _load_array(path: epath.Path, where: str, manifest: dict) -> np.ndarray:
    data = _read_checked(path, manifest, where)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise ValueError(f'{where}: {path} is not a readable .npy array ({e}).') from e


def _unit_rows(emb: np.ndarray, ids: list[str], where: str, tolerance: float) -> np.ndarray:
    """Rows divided by their L2 norm; zero rows stop, rows far from unit norm are reported.
    Rows already unit to float32 rounding (|norm − 1| < 1e-6, as a model that normalises
    writes them) are kept bit for bit, so scores from files equal those of the embeddings."""
    norms = np.linalg.norm(emb, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f'{where}: {zero.size} all-zero rows, ids {_few(ids[r] for r in zero)}.')
    off = np.abs(norms - 1.0)
    if off.max() > tolerance:
        logging.warning(
            '%s: %d of %d rows were not unit vectors (norms %.4g to %.4g); normalised on load.',
            where,
            int((off > tolerance).sum()),
            len(norms),
            float(norms.min()),
            float(norms.max()),
        )
    rescale = np.abs(norms - 1.0) >= 1e-6
    return np.where(rescale[:, None], emb / norms[:, None], emb).astype(emb.dtype)


def read_embeddings(
    directory,
    name: str,
    *,
    expected_ids=None,
    expected_dim: int | None = None,
    unit_norm_tolerance: float = UNIT_NORM_TOLERANCE,
) -> EmbeddingSet:
    """Loads and checks the set `name`; rows are L2-normalised on load (retrieval is cosine).

    Checks, each with an error naming the set: the manifest's dim against `expected_dim` (before
    the array is read), the array's shape and dtype against the manifest, the ids and labels
    files' lengths, duplicate ids, NaN/inf and all-zero rows. With `expected_ids` (the
    dataset's ids, in its order; compared as str), the rows come back in that order whatever
    order the file holds them in; ids missing from the file or unknown to the dataset stop with
    a few of each shown. Rows whose norm is more than `unit_norm_tolerance` from 1 are logged.
    """
    where = f'embeddings {name!r} in {directory}'
    paths = file_paths(directory, name)
    manifest = _read_manifest(paths, where)
    count, dim = int(manifest['num_items']), int(manifest['dim'])
    if expected_dim is not None and dim != expected_dim:
        raise ValueError(f'{where}: embedding dim {dim}, but {expected_dim} is expected.')
    if storage.DIGEST not in manifest:
        logging.warning(
            '%s: the manifest records no content digests (an older bcl_jax or another writer): '
            'its files cannot be checked',
            where,
        )
    text = _read_checked(paths['ids'], manifest, where).decode('utf-8')
    ids = [i.removesuffix('\r') for i in text.split('\n')]
    if ids and ids[-1] == '':  # the last line's newline
        ids.pop()
    _check_ids(ids, count, where + f' ({paths["ids"].name})')
    rows = None if expected_ids is None else _reorder(ids, expected_ids, where)
    labels = None
    if manifest.get('has_labels'):
        labels = _check_labels(_load_array(paths['labels'], where, manifest), count, where)

    emb = _load_array(paths['emb'], where, manifest)
    if emb.shape != (count, dim) or emb.dtype != np.float32:
        raise ValueError(
            f'{where}: {paths["emb"].name} holds {emb.dtype} {emb.shape}, but the manifest says '
            f'float32 ({count}, {dim}).'
        )
    _check_finite(emb, ids, where)
    emb = _unit_rows(emb, ids, where, unit_norm_tolerance)
    if rows is not None:
        emb, ids = emb[rows], [ids[r] for r in rows]
        labels = None if labels is None else labels[rows]
    return EmbeddingSet(emb=emb, ids=ids, labels=labels, manifest=manifest)


# ------------------------------------------------------------------------ a folder as one unit

FOLDER_MANIFEST = 'manifest.json'
FOLDER_FORMAT = 'bcl_jax.embedding_folder/1'


def write_folder_manifest(directory, identity: dict) -> dict:
    """Writes `manifest.json` naming every file of the folder with its sha256 and the model
    (`identity`, its weights digest among it) that embedded every set; returns it."""
    d = epath.Path(directory)
    files = sorted(
        p for p in d.iterdir() if p.name != FOLDER_MANIFEST and not p.name.startswith('.')
    )
    manifest = {
        'format': FOLDER_FORMAT,
        'model': identity,
        'sets': sorted(p.name[: -len('.json')] for p in files if p.name.endswith('.json')),
        storage.DIGEST: {p.name: storage.file_digest(p) for p in files},
    }
    storage.write_atomic(d / FOLDER_MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def check_folder(directory) -> dict | None:
    """The folder's manifest, once every file it names has its recorded digest and no file is
    missing or added; None (with a warning) for a folder written without one. A difference stops
    (`storage.DamagedError`, naming the file): the folder mixes files of several exports (e.g. one
    model's query set beside another's gallery) or was changed after it was written."""
    d = epath.Path(directory)
    path = d / FOLDER_MANIFEST
    if not path.exists():
        logging.warning(
            '%s has no %s (not written by python -m bcl_jax.export): its sets are checked one by '
            'one, not as one unit',
            directory,
            FOLDER_MANIFEST,
        )
        return None
    remedy = (
        'The folder mixes files of different exports or was changed after it was written: '
        'export the model again into a new folder (python -m bcl_jax.export).'
    )
    try:
        manifest = json.loads(path.read_text())
        recorded = manifest[storage.DIGEST]
        if manifest.get('format') != FOLDER_FORMAT:
            raise ValueError(f'format {manifest.get("format")!r}, expected {FOLDER_FORMAT!r}')
    except (ValueError, KeyError, TypeError) as e:
        raise storage.DamagedError(f'{path} is damaged ({e}). {remedy}') from e
    present = {
        p.name for p in d.iterdir() if p.name != FOLDER_MANIFEST and not p.name.startswith('.')
    }
    for name in sorted(recorded):
        if name not in present:
            raise storage.DamagedError(f'{d / name} is missing; {path} lists it. {remedy}')
        storage.check_digest(d / name, storage.file_digest(d / name), recorded[name], remedy=remedy)
    extra = sorted(present - set(recorded))
    if extra:
        raise storage.DamagedError(f'{d / extra[0]} is not listed in {path}. {remedy}')
    return manifest
