"""An old model known only by its embeddings (`config.old.embeddings`): from any framework.

The old model's only roles in the prototype methods are its embeddings of the new training set
(the prototype bank) and of the test sets (old/old, new/old). A folder of embedding files in
bcl_jax.embedding_files' format gives them without the network:

  train.*            the new training set (`data.train`, every class), for the prototypes
  <test>.query.*     each retrieval test's queries, and <test>.gallery.* where it has a gallery

`python -m bcl_jax.export --sets=all` writes such a folder from a bcl_jax model; a PyTorch or
TensorFlow model writes it with NumPy (docs/lifecycle.md gives the recipe). Rows are matched to
the dataset by id (the image ids, or row numbers for sets without ids) and their labels are
checked against the dataset's. Methods that run the old network on every batch (`l2`,
`bct_influence`) and sequential upgrades need the network, and are refused before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import numpy as np

from bcl_jax import embedding_files
from bcl_jax.data import pipeline

TRAIN_SET = 'train'


def source_ids(source) -> list[str]:
    """A source's image ids (file ids or relative paths), else its row numbers."""
    ids = getattr(source, 'ids', None)
    return [str(i) for i in (ids if ids is not None else range(len(source)))]


def set_names(data):
    """(set name, source) of every set an old model's embeddings cover: the training set, then
    each test's queries and gallery (the names `python -m bcl_jax.export` writes)."""
    yield TRAIN_SET, data.train
    for test in data.tests:
        yield f'{test.name}.query', test.query
        if test.gallery is not None:
            yield f'{test.name}.gallery', test.gallery


@dataclasses.dataclass(eq=False)
class GivenEmbeddings:
    """The old model as its embedding files, in the place of a trained model (`stage.Trained`):
    no weights (`params` and `batch_stats` are empty, so a reference carries none), its
    embeddings read by set, and an identity from the files' manifests."""

    directory: str
    sets: list  # (name, source): the dataset's sets it covers
    params: dict = dataclasses.field(default_factory=dict)
    batch_stats: dict = dataclasses.field(default_factory=dict)
    step: int | None = None
    total_steps: int | None = None
    seconds: float = 0.0
    notes: dict = dataclasses.field(default_factory=dict)
    _loaded: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def for_data(cls, directory: str, data) -> GivenEmbeddings:
        """The folder's sets for `data`; a missing set stops here, naming the file it needs."""
        given = cls(directory, list(set_names(data)))
        embedding_files.check_folder(directory)  # an export's folder: whole, of one model
        for name, _ in given.sets:
            path = embedding_files.file_paths(directory, name)['manifest']
            if not path.exists():
                raise FileNotFoundError(
                    f'old.embeddings: {path} not found. The folder needs the old model\'s '
                    f'embeddings of every set: {", ".join(n for n, _ in given.sets)} '
                    '(python -m bcl_jax.export --sets=all writes them).'
                )
        return given

    def embeddings(self, source) -> np.ndarray:
        """(N, D) float32 unit rows of `source` (one of `sets`), in the source's order."""
        name = next((n for n, s in self.sets if s is source), None)
        if name is None:
            raise ValueError('old.embeddings covers the training set and the tests only')
        if name not in self._loaded:
            loaded = embedding_files.read_embeddings(
                self.directory, name, expected_ids=source_ids(source)
            )
            labels = np.asarray(source.labels)
            if loaded.labels is not None and not np.array_equal(loaded.labels, labels):
                wrong = np.flatnonzero(loaded.labels != labels)
                raise ValueError(
                    f'old.embeddings {name!r} in {self.directory}: the labels of {len(wrong)} '
                    f'items differ from the dataset\'s (ids {[loaded.ids[i] for i in wrong[:5]]})'
                    ': the files were written for other data.'
                )
            self._loaded[name] = loaded.emb
        return self._loaded[name]

    def batches(self, source, *, mesh, batch_size: int):
        """(embeddings, labels, valid) global arrays in `pipeline.eval_batches`' batches."""
        emb, labels = self.embeddings(source), np.asarray(source.labels)
        local = pipeline.local_batch_size(batch_size)
        offset, n = jax.process_index() * local, len(emb)
        for b in range(-(-n // batch_size)):
            rows = np.arange(local) + b * batch_size + offset
            picked = np.minimum(rows, n - 1)
            batch = dict(emb=emb[picked], label=labels[picked], valid=rows < n)
            batch = pipeline.to_global(batch, mesh)
            yield batch['emb'], batch['label'], batch['valid']

    @property
    def dim(self) -> int:
        """The embeddings' dimension, from the training set's manifest."""
        manifest = embedding_files.file_paths(self.directory, TRAIN_SET)['manifest']
        return int(json.loads(manifest.read_text())['dim'])

    def with_weights(self, params, batch_stats) -> GivenEmbeddings:
        return self  # it has none: a reference's leaves hold no old weights

    def identity(self) -> str:
        """A digest of the folder's manifests (which name the model that wrote each set)."""
        h = hashlib.sha256()
        for name, _ in self.sets:
            manifest = embedding_files.file_paths(self.directory, name)['manifest']
            h.update(json.dumps(json.loads(manifest.read_text()), sort_keys=True).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return dict(embeddings=self.directory, sets=[n for n, _ in self.sets])

    def model(self, *_, **__):
        raise ValueError(
            'this method runs the old network on every batch; old.embeddings gives only the old '
            "model's embeddings (give old.checkpoint instead)"
        )

    embed_fn = model
