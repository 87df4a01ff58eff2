"""What the training images are, byte for byte: one digest over every image file's sha256.

`data.fingerprint='content'` (the default for data.name=folder) puts `images_digest` of the
training images into the data fingerprint, so that replacing images under the same names (new
pixels, same file names and sizes) changes it and the stages trained on the old images are not
reused. Each file is read once, streamed: its sha256 is cached in the work directory
(`data_digests.json`) under its path, size and modification time, and a rerun reads only files
whose size or time changed. `data.fingerprint='names'` leaves the bytes out (ids, labels and
split only: instant on any dataset, blind to images changed in place).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

import jax
from absl import logging
from etils import epath

from bcl_jax.data import storage

CACHE = 'data_digests.json'
CACHE_FORMAT = 'bcl_jax.data_digests/1'
MODES = ('content', 'names')


def _stat(path: str) -> tuple:
    """(size, modification time) as precisely as the filesystem gives them."""
    st = epath.Path(path).stat()
    size = getattr(st, 'st_size', None)
    size = getattr(st, 'length', None) if size is None else size
    mtime = getattr(st, 'st_mtime_ns', None)
    mtime = getattr(st, 'mtime', None) if mtime is None else mtime
    return int(size), str(mtime)


def _load_cache(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        record = json.loads(epath.Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logging.warning('%s cannot be read (%s); the images are digested anew', path, e)
        return {}
    return record.get('files', {}) if record.get('format') == CACHE_FORMAT else {}


def images_digest(paths, *, cache_dir: str | None, threads: int = 4) -> str:
    """sha256 over the sha256 of each file of `paths`, in their order (where they live does not
    enter, only their bytes and order). File digests are cached in `cache_dir`/data_digests.json
    by path, size and modification time (no cache without `cache_dir`)."""
    cache_path = None if cache_dir is None else os.path.join(cache_dir, CACHE)
    cache = _load_cache(cache_path)

    def digest(path: str) -> tuple[str, dict]:
        size, mtime = _stat(path)
        hit = cache.get(path)
        if hit and hit.get('size') == size and hit.get('mtime') == mtime:
            return hit['sha256'], hit
        return None, dict(size=size, mtime=mtime)

    paths = list(paths)
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        found = list(pool.map(digest, paths))
        todo = [i for i, (d, _) in enumerate(found) if d is None]
        if todo:
            logging.info('reading %d of %d images for the data fingerprint', len(todo), len(paths))
        fresh = dict(zip(todo, pool.map(lambda i: storage.file_digest(paths[i]), todo)))
    h = hashlib.sha256()
    files = {}
    for i, (path, (d, entry)) in enumerate(zip(paths, found)):
        d = fresh.get(i, d)
        files[path] = dict(entry, sha256=d)
        h.update(f'{len(d)}:{d}'.encode())
    if cache_path is not None and todo and jax.process_index() == 0:
        storage.write_atomic(cache_path, json.dumps(dict(format=CACHE_FORMAT, files=files)))
    return h.hexdigest()[:16]
