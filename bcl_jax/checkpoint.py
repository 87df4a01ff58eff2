"""Checkpoints (orbax) and atomic result files: whatever a run has written survives a crash.

A checkpoint holds four items: `weights` (params and BatchNorm statistics: all that a later
stage needs to use the model), `train` (step, optimizer state, NaN flag), `data` (the input
iterator's position) and `meta` (stage, model description, seconds trained). Orbax writes each
step to a temporary folder and renames it when complete, so a killed run resumes from the last
complete step. A step that cannot be read (a damaged disk, a hand-edited folder) is moved aside
to `<directory>-damaged/<step>` with a warning, and the previous step is used.

Once a step is written, process 0 records the sha256 digest of every file of its items in
`<step>/digests.json`; reading a step first checks the files of the items it reads against it,
and a file that differs stops with `DamagedError` naming it (restore it, or retrain the stage
with --config.on_change=retrain): damaged weights never load. A step written by an older
bcl_jax (no digests.json) still loads, with a one-line warning.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from bcl_jax.data import storage
from bcl_jax.data.storage import DamagedError

__all__ = ['Checkpointer', 'DamagedError', 'MismatchError', 'write_atomic']

ITEMS = ('weights', 'train', 'data', 'meta')
DIGESTS = 'digests.json'  # in each step's folder: {"sha256": {relative path: hex digest}}
DIGEST_FORMAT = 'bcl_jax.digests/1'
REMEDY = (
    'Restore the checkpoint from a copy, or rerun with --config.on_change=retrain to move the '
    'stage aside (kept as <stage>.replaced-<n>) and train it anew.'
)


def write_atomic(path: str, text: str | bytes):
    """Writes a file so that readers see the old content or the new, never a torn one; any
    path etils.epath opens (local, gs://, ...). One home: `bcl_jax.data.storage.write_atomic`."""
    storage.write_atomic(path, text)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class DiskFullError(OSError):
    """A checkpoint could not be written: the disk (or quota) is full. One line, with the cause."""

    def __init__(self, directory: str):
        parent = str(epath.Path(directory).parent)
        super().__init__(
            f'no space left on the device writing a checkpoint to {directory} '
            f'({_free_space(parent)}). Free space (or give --workdir on another disk) and '
            'rerun: the stage resumes from its last complete checkpoint.'
        )
        self.errno = errno.ENOSPC
        self.bcl_jax_input = True  # the commands end with this line (bcl_jax.console)


def _disk_full(error: BaseException) -> bool:
    """Whether `error` or an error it chains from is ENOSPC (orbax and tensorstore raise it as
    OSError, or as a ValueError that quotes the OS message)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if 'No space left on device' in str(error) or 'Disk quota exceeded' in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _quiet_closed_loop_callbacks():
    """When an asynchronous save fails (a full disk), orbax closes its event loop while
    tensorstore's writes of the other chunks are still in flight; each of their completion
    callbacks then reports 'Event loop is closed' as an unraisable error, from another thread
    and before the main thread learns of the failure: a hundred tracebacks ahead of the one line
    that says what happened (the save's own error, raised at the next save or at `close`). Those
    reports, and only those, are left unsaid while a process saves asynchronously."""
    previous = sys.unraisablehook
    if getattr(previous, 'bcl_jax_quiet', False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
            previous(unraisable)

    hook.bcl_jax_quiet = True
    sys.unraisablehook = hook


def _free_space(directory: str) -> str:
    try:
        return f'{shutil.disk_usage(storage.absolute(directory)).free / 2**20:.1f} MiB free'
    except OSError:
        return 'free space unknown'


class MismatchError(ValueError):
    """A checkpoint of another model than the config describes (not a damaged one)."""


# Model fields that checkpoints of older bcl_jax versions do not record, and their value then.
MODEL_DEFAULTS = {'pool': 'avg'}


def _check_meta(saved: dict, expected: dict, directory: str):
    """A checkpoint of another architecture, size or class count stops with what differs."""
    diffs = []
    for key in ('model', 'num_classes'):
        if key not in expected:
            continue
        want, got = expected[key], saved.get(key)
        if isinstance(want, dict):
            got = dict(MODEL_DEFAULTS, **(got or {}))
            diffs += [
                f'{key}.{k}: checkpoint has {got.get(k)!r}, config says {v!r}'
                for k, v in want.items()
                if got.get(k) != v
            ]
        elif got != want:
            diffs.append(f'{key}: checkpoint has {got!r}, config says {want!r}')
    if diffs:
        raise MismatchError(
            f'checkpoint {directory} does not match the config:\n  '
            + '\n  '.join(diffs)
            + '\nFix the config to match the checkpoint, or point to the right one.'
        )


class Checkpointer:
    """Thin wrapper over orbax's CheckpointManager for one training stage."""

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int | None,
        read_only: bool = False,
        async_save: bool = False,
    ):
        """`async_save`: `save` returns once the arrays are copied off the devices and writes in
        the background while training goes on; the next save, a restore and `close` wait for it."""
        self.directory = storage.absolute(directory)
        self._read_only = read_only
        self._async = async_save
        if async_save:
            _quiet_closed_loop_callbacks()
        if read_only and not epath.Path(self.directory).is_dir():
            raise FileNotFoundError(f'checkpoint directory {self.directory} does not exist')
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._undigested: list[int] = []  # steps saved whose digests are not yet written
        self._verified: set[tuple[int, str]] = set()  # (step, item) whose files were checked

    # ------------------------------------------------------------------------ digests

    def _step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def _item_files(self, step: int, item: str) -> dict[str, epath.Path]:
        """{path relative to the step folder: path} of every file of `item` at `step`."""
        root = self._step_dir(step)
        base = root / item
        if not base.exists():
            return {}
        files, folders = {}, [base]
        while folders:  # a walk (epath's glob refuses '**' on object stores)
            for p in folders.pop().iterdir():
                if p.is_dir():
                    folders.append(p)
                else:
                    files[str(p.relative_to(root))] = p
        return dict(sorted(files.items()))

    def _write_digests(self):
        """Records the digests of the steps saved since the last call (once they are written)."""
        pending, self._undigested = self._undigested, []
        if not pending:
            return
        self._manager.wait_until_finished()
        if jax.process_index() != 0:
            return
        for step in pending:
            if not self._step_dir(step).exists():  # already deleted (max_to_keep)
                continue
            files = {}
            for item in ITEMS:
                files.update(
                    {rel: storage.file_digest(p) for rel, p in self._item_files(step, item).items()}
                )
            record = {'format': DIGEST_FORMAT, storage.DIGEST: files}
            storage.write_atomic(self._step_dir(step) / DIGESTS, json.dumps(record, indent=0))
            self._verified.update((step, item) for item in ITEMS)

    def verify(self, step: int, items=ITEMS):
        """Checks the files of `items` at `step` against the step's recorded digests; raises
        `DamagedError` naming the first file that is missing or differs. A step without digests
        (written by an older bcl_jax) is let through with a warning."""
        self._write_digests()
        items = [i for i in items if (step, i) not in self._verified]
        if not items:
            return
        path = self._step_dir(step) / DIGESTS
        try:
            record = json.loads(path.read_text())
            recorded = record[storage.DIGEST]
        except FileNotFoundError:
            logging.warning(
                'checkpoint step %d in %s has no content digests (written by an older bcl_jax): '
                'its files cannot be checked',
                step,
                self.directory,
            )
            self._verified.update((step, i) for i in ITEMS)  # one warning per step
            return
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedError(f'{path} is damaged ({type(e).__name__}: {e}). {REMEDY}') from e
        for item in items:
            present = self._item_files(step, item)
            for rel in sorted(r for r in recorded if r.split('/', 1)[0] == item):
                if rel not in present:
                    raise DamagedError(
                        f'{self._step_dir(step) / rel} is missing from the checkpoint (it is '
                        f'listed in {path}). {REMEDY}'
                    )
                storage.check_digest(
                    present[rel], storage.file_digest(present[rel]), recorded[rel], remedy=REMEDY
                )
            extra = sorted(set(present) - set(recorded))
            if extra:
                raise DamagedError(
                    f'{self._step_dir(step) / extra[0]} was not part of the checkpoint when it '
                    f'was written (it is not listed in {path}). {REMEDY}'
                )
            self._verified.add((step, item))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict, meta: dict):
        """Writes `step`; a full disk stops with one `DiskFullError` (the step is not kept: the
        previous one stays the latest)."""
        try:
            self._save(step, state, data_state, meta)
        except Exception as e:
            if not _disk_full(e):
                raise
            raise DiskFullError(self.directory) from None

    def _save(self, step: int, state: dict, data_state: dict, meta: dict):
        self._write_digests()  # of the previous (asynchronous) save, now that it is written
        weights = dict(params=state['params'], batch_stats=state['batch_stats'])
        train = {k: v for k, v in state.items() if k not in weights}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                weights=ocp.args.StandardSave(weights),
                train=ocp.args.StandardSave(train),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        self._undigested.append(step)
        self._verified = {v for v in self._verified if v[0] != step}
        if not self._async:
            self._write_digests()

    def _meta(self, step: int, expected: dict) -> dict:
        self.verify(step, ('meta',))
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            'meta'
        ]
        _check_meta(meta, expected, self.directory)
        return meta

    def _latest_readable(self, read):
        """`read(step)` at the latest step that can be read. Later steps that fail while an
        earlier one reads fine are damaged: warned about and moved aside (unless the directory
        is read-only). When no step reads, nothing is moved and the latest step's error is
        raised (code that cannot read any step is no sign of damage). A config mismatch
        (`MismatchError`) stops at once."""
        failed = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                value = read(step)
            except (MismatchError, DamagedError):
                raise
            except Exception as e:  # orbax raises many kinds on a damaged step  # noqa: BLE001
                failed.append((step, e))
                continue
            for bad, e in failed:
                where = 'skipped it' if self._read_only else f'moved it to {self._move_aside(bad)}'
                logging.warning(
                    'checkpoint step %d in %s cannot be read (%s: %s); %s and used step %d',
                    bad,
                    self.directory,
                    type(e).__name__,
                    e,
                    where,
                    step,
                )
            return value
        if failed:
            raise failed[0][1]
        raise FileNotFoundError(f'no checkpoint step in {self.directory}')

    def _move_aside(self, step: int) -> str:
        aside = epath.Path(self.directory + '-damaged') / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                aside.rmtree()
            (epath.Path(self.directory) / str(step)).rename(aside)
        self._manager.reload()
        return str(aside)

    def read_meta(self) -> dict:
        """The meta item of the latest readable step (e.g. its settings' fingerprint)."""
        return self._latest_readable(lambda step: self._meta(step, {}))

    def restore(self, step: int, state: dict, expected_meta: dict, *, strict: bool = True):
        """(state, data_state, meta) at `step`, onto the shardings of the template `state`.

        The arrays land with the template's shardings, on its mesh, whatever mesh wrote them.
        `strict=False` also pads (with zeros) or truncates arrays whose shape differs from the
        template's: a class axis padded for another device count (bcl_jax.sharding). Pass it
        only with `expected_meta` naming the model and class count, which rules out any other
        difference.
        """
        meta = self._meta(step, expected_meta)
        self.verify(step, ('weights', 'train', 'data'))
        weights = dict(params=state['params'], batch_stats=state['batch_stats'])
        train = {k: v for k, v in state.items() if k not in weights}
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                weights=ocp.args.StandardRestore(_abstract(weights), strict=strict),
                train=ocp.args.StandardRestore(_abstract(train), strict=strict),
                data=ocp.args.JsonRestore(),
            ),
        )
        return dict(out['train'], **out['weights']), out['data'], meta

    def restore_latest(self, state: dict, expected_meta: dict, *, strict: bool = True):
        """`restore` at the latest readable step: (state, data_state, meta, step)."""
        return self._latest_readable(
            lambda step: (*self.restore(step, state, expected_meta, strict=strict), step)
        )

    def restore_weights(self, step: int, weights: dict, expected_meta: dict, *, strict=True):
        """(weights, meta) only: what using a finished model needs (`strict` as in `restore`)."""
        meta = self._meta(step, expected_meta)
        self.verify(step, ('weights',))
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                weights=ocp.args.StandardRestore(_abstract(weights), strict=strict)
            ),
        )
        return out['weights'], meta

    def restore_latest_weights(self, weights: dict, expected_meta: dict, *, strict=True):
        """`restore_weights` at the latest readable step: (weights, meta, step)."""
        return self._latest_readable(
            lambda step: (*self.restore_weights(step, weights, expected_meta, strict=strict), step)
        )

    def close(self):
        """Waits for a save still being written (and records its digests), then releases the
        manager; a full disk stops with one `DiskFullError`."""
        try:
            self._write_digests()
            self._manager.wait_until_finished()
        except Exception as e:
            if not _disk_full(e):
                raise
            raise DiskFullError(self.directory) from None
        finally:
            self._manager.close()
