"""Writing files on any filesystem etils.epath opens: local disks, gs://, s3://, ...

Reading needs nothing of its own (`epath.Path(p).read_bytes()`, `.open()`); writing a file
that a crash must not leave half-written does: `write_atomic` writes a temporary file next to
the target and renames it into place. On a local disk the rename is atomic (readers see the old
content or the new) and the data is synced first; on an object store an object only becomes
visible once its upload completes, and the rename is a copy, so readers never see a torn file
there either.
"""

from __future__ import annotations

import hashlib
import os
import uuid

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
    """Whether `path` is on the local filesystem (no scheme such as gs://)."""
    return '://' not in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """`path` as an absolute path string; URIs (gs://...) are absolute already."""
    path = os.fspath(path)
    return os.path.abspath(path) if is_local(path) else path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8) to `path` through a temporary file renamed into place;
    creates the parent folders."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.tmp-{uuid.uuid4().hex}-{path.name}'
    payload = data.encode('utf-8') if isinstance(data, str) else data
    try:
        with tmp.open('wb') as f:
            f.write(payload)
            if is_local(path):
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append(path: str | os.PathLike, text: str) -> None:
    """Appends `text` to a log file: in place on a local disk; on an object store, where
    objects cannot grow, by rewriting the object (logs are small)."""
    if is_local(path):
        with open(path, 'a') as f:
            f.write(text)
        return
    path = epath.Path(path)
    write_atomic(path, (path.read_text() if path.exists() else '') + text)


# ------------------------------------------------------------------------------------ digests

DIGEST = 'sha256'  # the algorithm of every content digest bcl_jax writes beside its files
_CHUNK = 1 << 20


class DamagedError(ValueError):
    """A file's bytes differ from the digest recorded when it was written: it was damaged
    (a disk, a copy, a hand edit) after bcl_jax wrote it. Never read past: restore the file, or
    make it anew (for a stage: --config.on_change=retrain)."""


def bytes_digest(data: bytes) -> str:
    """The sha256 hex digest of `data`."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB chunks (any epath filesystem)."""
    h = hashlib.sha256()
    with epath.Path(path).open('rb') as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_digest(path, actual: str, recorded: str, *, remedy: str) -> None:
    """Raises `DamagedError` naming `path` when `actual` differs from the `recorded` digest."""
    if actual != recorded:
        raise DamagedError(
            f'{path} is damaged: its content differs from the {DIGEST} digest recorded when it '
            f'was written ({recorded[:16]}..., now {actual[:16]}...). {remedy}'
        )
