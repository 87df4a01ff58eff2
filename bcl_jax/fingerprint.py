"""A stage's fingerprint: every setting that determines its result, stored with its checkpoints.

A rerun whose fingerprint differs stops and lists the differing fields (`check_fingerprint`)
instead of reusing or resuming a model trained under other settings; `config.on_change='retrain'`
moves the old stage aside and trains it anew. Fields that cannot change a trained model are left
out, all of them in `EXEMPT`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from bcl_jax.errors import ChangedConfigError

# Config fields that cannot change a trained model: how often to log or save, how many devices
# or threads do the work (8 devices compute what 1 does, to float rounding), evaluation settings
# (evaluation is rerun every time), which stages to run, and where the data lies (what the data
# is goes into the fingerprint through `Data.fingerprint`).
EXEMPT = (
    'log_every_steps',
    'ckpt',
    'mesh',
    'eval',
    'seeds',
    'methods',
    'variants',
    'on_change',
    'data.num_threads',
    'data.workers',
    'data.scan_images',
    'data.skip_corrupt',
    'data.fingerprint',  # how the data is identified; what it is enters through data_identity
    'data.prepared',
    'data.folder.train_dir',
    'data.folder.query_dir',
    'data.folder.gallery_dir',
    'data.gldv2.root',
    'data.gldv2.split_file',
    'data.gldv2.tests',
    'data.revisited',
    'data.inshop.root',
    'data.tfds.data_dir',
)


def _flatten(tree, prefix='') -> dict:
    """{dotted.path: leaf} of nested dicts; tuples and lists are leaves (as lists)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f'{prefix}{k}.'))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _exempt(path: str) -> bool:
    return any(path == e or path.startswith(e + '.') for e in EXEMPT)


def config_fingerprint(config, sections) -> dict:
    """{dotted field: value} of the config's `sections` (dotted paths), exempt fields left out."""
    config = json.loads(config.to_json())
    out = {}
    for section in sections:
        value = config
        for part in section.split('.'):
            value = value[part]
        out.update(_flatten(value, section + '.') if isinstance(value, dict) else {section: value})
    return {k: v for k, v in out.items() if not _exempt(k)}


def _names_a_digest(key: str) -> bool:
    """A field recorded next to a digest to say which setting made it (an upgrade's fraction
    beside its classes' digest): absent from a stage saved before it was recorded, the digest
    alone decides."""
    return key.startswith('upgrades.') and key.endswith('.fraction')


def differences(saved: dict, wanted: dict) -> list[str]:
    """'field: saved -> wanted' for every field that differs (missing on one side included),
    except a field added to bcl_jax after the stage was saved that is off now (None or False):
    new settings are added switched off, so it was made as that setting makes it (and a field
    that names a digest's setting, `_names_a_digest`)."""
    keys = sorted(set(saved) | set(wanted))
    missing = '(not set)'
    added_off = lambda k: (
        k not in saved and (any(wanted[k] is off for off in (None, False)) or _names_a_digest(k))
    )
    return [
        f'{k}: {saved.get(k, missing)!r} -> {wanted.get(k, missing)!r}'
        for k in keys
        if saved.get(k, missing) != wanted.get(k, missing) and not added_off(k)
    ]


def check_fingerprint(saved: dict | None, wanted: dict, *, where: str, what: str):
    """Stops when `saved` (from a checkpoint or a bank's sidecar) differs from `wanted`."""
    if saved is None:
        raise ChangedConfigError(
            f'{where} holds {what} with no record of the settings it was made with (written by '
            'an older bcl_jax). Use a new --workdir, or --config.on_change=retrain to move it '
            'aside and train it anew.'
        )
    diffs = differences(saved, wanted)
    if diffs:
        shown = '\n  '.join(diffs[:20]) + ('\n  ...' if len(diffs) > 20 else '')
        raise ChangedConfigError(
            f'{where} holds {what} made with other settings (saved -> now):\n  {shown}\n'
            'Its results would not be those of this config. Use a new --workdir for the new '
            'settings, or rerun with --config.on_change=retrain to move the old stage aside '
            '(kept as <stage>.replaced-<n>) and train it anew.'
        )


def array_digest(*arrays) -> str:
    """A digest of arrays' bytes, shapes and dtypes (a data identity without images)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f'{a.dtype}{a.shape}'.encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def data_identity(data) -> str:
    """What the training data is (`Data.fingerprint` where the dataset gives one)."""
    given = getattr(data, 'fingerprint', None)
    if given:
        return given
    return array_digest(data.train.labels, data.old_label, np.asarray([len(data.train)]))
