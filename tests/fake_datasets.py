"""Small fake datasets in the released file formats (GLDv2, Revisited Oxford/Paris, In-shop).

Images of one class share a colour, so that even the smoke configs learn something; every image
differs by a gradient and its size.
"""

import contextlib
import hashlib
import os
import pickle

import fsspec
import numpy as np
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_classes
from PIL import Image

from bcl_jax.data import gldv2


def image(path, seed, w=20, h=15, base=None):
    """A smooth RGB image (JPEG-friendly), saved in the format of the path's extension."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, 3) if base is None else np.asarray(base, float)
    pixels = base + xx[..., None] * rng.uniform(-5, 5, 3) + yy[..., None] * rng.uniform(-5, 5, 3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def hex_id(text):
    """A GLDv2-style 16-hex-character image id."""
    return hashlib.md5(text.encode()).hexdigest()[:16]


def _colour(label):
    return np.random.default_rng(1000 + label).uniform(30, 220, 3)


def gldv2_root(root, *, landmarks=10, per_class=4, index_per_landmark=2, queries=6):
    """train_clean.csv + train/, index.csv + index/, test/ + retrieval_solution_v2.1.csv.

    Query q shows landmark q; its ground truth is that landmark's index images. Queries
    alternate Public/Private; one extra Ignored query is written too.
    """
    root = os.fspath(root)
    rows, seed, index_ids, index_of = [], 0, [], {}
    for lm in range(landmarks):
        ids = [hex_id(f'train{lm}-{k}') for k in range(per_class)]
        rows.append(f'{100 + 7 * lm},{" ".join(ids)}')
        for image_id in ids:
            seed += 1
            image(gldv2.image_path(root, image_id, 'train'), seed, 14 + seed % 9, base=_colour(lm))
        index_of[lm] = [hex_id(f'index{lm}-{k}') for k in range(index_per_landmark)]
        for image_id in index_of[lm]:
            seed += 1
            image(gldv2.image_path(root, image_id, 'index'), seed, base=_colour(lm))
            index_ids.append(image_id)
    with open(os.path.join(root, 'train_clean.csv'), 'w') as f:
        f.write('landmark_id,images\n' + '\n'.join(rows) + '\n')
    with open(os.path.join(root, gldv2.INDEX_FILE), 'w') as f:
        f.write('id\n' + ''.join(i + '\n' for i in index_ids))
    solution = []
    for q in range(queries + 1):
        query_id = hex_id(f'test{q}')
        image(gldv2.image_path(root, query_id, 'test'), 500 + q, 15, 22, base=_colour(q))
        usage = 'Ignored' if q == queries else ('Public', 'Private')[q % 2]
        solution.append(f'{query_id},{" ".join(index_of[q % landmarks])},{usage}\n')
    with open(os.path.join(root, gldv2.SOLUTION_FILE), 'w') as f:
        f.write('id,images,Usage\n' + ''.join(solution))
    return root


_REVISITED_NAMES = {
    'roxford5k': ('all_souls', 'ashmolean', 'balliol', 'bodleian', 'keble', 'magdalen'),
    'rparis6k': ('paris_defense', 'paris_eiffel', 'paris_louvre', 'paris_pantheon'),
}


def revisited_root(parent, dataset, *, database_per_landmark=3):
    """<parent>/<dataset>/gnd_<dataset>.pkl and jpg/: one query per landmark; of its database
    images the first is easy, the second hard, the third junk."""
    root = os.path.join(os.fspath(parent), dataset)
    imlist, qimlist, gnd = [], [], []
    for lm, name in enumerate(_REVISITED_NAMES[dataset]):
        first = len(imlist)
        imlist += [f'{name}_{100 * lm + k:06d}' for k in range(database_per_landmark)]
        qimlist.append(f'{name}_{100 * lm + 99:06d}')
        gnd.append(
            {
                'bbx': [2.0, 1.0, 18.0, 14.0],
                'easy': [first],
                'hard': [first + 1],
                'junk': [first + 2],
            }
        )
    for k, name in enumerate(imlist + qimlist):
        lm = next(i for i, p in enumerate(_REVISITED_NAMES[dataset]) if name.startswith(p))
        image(os.path.join(root, 'jpg', name + '.jpg'), 900 + k, 24, 18, base=_colour(lm))
    with open(os.path.join(root, f'gnd_{dataset}.pkl'), 'wb') as f:
        pickle.dump({'imlist': imlist, 'qimlist': qimlist, 'gnd': gnd}, f)
    return root


def inshop_root(root, *, train_items=10, train_per_item=3, eval_items=10, gallery_per_item=5):
    """list_eval_partition.txt and img/: each evaluation item has one query and
    `gallery_per_item` gallery images (In-shop's Recall@50 needs a gallery of 50)."""
    root = os.fspath(root)
    rows = []
    for i in range(train_items):
        item = f'id_{2 * i:08d}'
        rows += [
            (f'img/WOMEN/Dresses/{item}/{k:02d}_1_front.jpg', item, 'train', i)
            for k in range(train_per_item)
        ]
    for i in range(eval_items):
        item = f'id_{2 * i + 1:08d}'
        statuses = ['query'] + ['gallery'] * gallery_per_item
        rows += [
            (f'img/MEN/Shirts/{item}/{k:02d}_1_front.jpg', item, s, 50 + i)
            for k, s in enumerate(statuses)
        ]
    for seed, (path, _, _, colour) in enumerate(rows):
        image(os.path.join(root, path), 300 + seed, 16, 12 + seed % 5, base=_colour(colour))
    with open(os.path.join(root, 'list_eval_partition.txt'), 'w') as f:
        f.write(f'{len(rows)}\nimage_name item_id evaluation_status\n')
        f.write(''.join(f'{p}  {i}  {s}\n' for p, i, s, _ in rows))
    return root


class InMemoryGCS(MemoryFileSystem):
    """fsspec's in-memory filesystem answering for the gs:// and gcs:// protocols."""

    protocol = ('gs', 'gcs')
    store: dict = {}  # noqa: RUF012  (fsspec's class-level store, one per filesystem class)
    pseudo_dirs: list = ['']  # noqa: RUF012
    root_marker = ''

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ('gs://', 'gcs://'):
            path = path.removeprefix(prefix)
        return path.rstrip('/')


@contextlib.contextmanager
def fake_gcs():
    """gs:// paths served from memory for the duration: etils.epath sends gs:// to fsspec's
    'gcs' filesystem (when TensorFlow is not installed), and fsspec's registry maps that name
    to InMemoryGCS here instead of gcsfs. No network."""
    cached = epath_backend.fsspec_backend._get_filesystem
    for name in ('gs', 'gcs'):
        fsspec.register_implementation(name, InMemoryGCS, clobber=True)
    cached.cache_clear()
    try:
        yield
    finally:
        for name in ('gs', 'gcs'):
            fsspec_classes.pop(name, None)  # back to the lazy gcsfs entry
        cached.cache_clear()
        InMemoryGCS.store.clear()
        InMemoryGCS.pseudo_dirs[:] = ['']


class ArraySource:
    """A random-access source over arrays; label i of image i unless labels are given."""

    def __init__(self, images, labels, num_classes):
        self.images, self.num_classes = images, num_classes
        self.labels = np.asarray(labels, np.int32)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {'image': self.images[int(i)], 'label': self.labels[int(i)]}


def indexed(n, size=6, num_classes=None, labels=None):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    if labels is None:
        labels = np.arange(n)
    return ArraySource(images, labels, num_classes or n)
