"""Image files to pixels: decoding every PIL mode to 8-bit RGB, the up-front scan of a dataset's
files, and `ImageList`, the random-access source that the file-based datasets share.

Decoding (`open_rgb`) applies the EXIF orientation and converts each mode with its own scale:

- 8-bit modes ('RGB', 'L', '1', 'CMYK', 'YCbCr', ...): PIL's conversion ('CMYK': R = (255 − C)
  (255 − K) / 255, rounded).
- 16-bit ('I;16*', 16-bit PNGs of every colour type) and 'I': v → round(v / 257), i.e. v / 65535
  of full scale. PIL keeps only the high byte of a 16-bit RGB(A) PNG; the low byte is decoded
  too, so the result is exact. 'I' (32-bit int) is read as 16-bit, clipped to [0, 65535].
- 'F' (32-bit float): intensities in [0, 1], clipped (a warning says when values exceed 1).
- Alpha ('RGBA', 'LA', 'P' with transparency, 'PA', premultiplied 'RGBa'/'La'): composited over
  white, out = round(255 · (c·a + 1 − a)) with c and a in [0, 1].

`scan` checks a dataset's files before any training: by default it opens each file's header
(PIL reads the header without decoding pixels) and checks that a JPEG or PNG ends with its end
marker (a truncated file does not), in a thread pool, with a progress bar for large sets;
`decode` mode decodes every file (also finds damage inside the data, ~20× slower); `off` skips
the check. With data.skip_corrupt the files the scan finds are dropped; a file that fails only
when read later stops with a hint to scan with `decode` (skip_corrupt cannot drop it then).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os

import jax
import numpy as np
import tqdm
from absl import logging
from etils import epath
from PIL import ExifTags, Image

from bcl_jax.data.dataset import preview

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
SCAN_MODES = ('header', 'decode', 'off')
EVAL_MODES = ('center_crop', 'resize')
SKIP_HINT = (
    'Fix or delete the file(s), or set data.skip_corrupt=True to skip unreadable images (the '
    'skipped files are listed in the results).'
)
# The hint of an image that fails when read for training or evaluation: the up-front scan
# passed it (or was off), so data.skip_corrupt alone cannot drop it.
LOAD_HINT = (
    "The up-front scan did not catch it: fix or delete the file, or set "
    "data.scan_images='decode' so that the scan decodes every file before any work (and, "
    'with data.skip_corrupt=True, skips those that fail).'
)
# A file that ends before its format's end marker is truncated (the header scan reads the last
# bytes only); JPEG may carry trailing bytes after its end marker, so the marker is looked for
# in the last _TAIL bytes.
_END_MARKERS = {'JPEG': b'\xff\xd9', 'PNG': b'IEND\xaeB`\x82'}
_TAIL = 1024
_SCAN_THREADS = 32  # The scan waits on storage (a bucket's latency), not on the CPU.
_PROGRESS_FROM = 5000  # Files from which the scan shows a progress bar.
_WHITE = 1.0
# A 16-bit PNG's unpacker, which keeps the high bytes -> the one that reads the low bytes.
_SIXTEEN_BIT_PNG = {'RGB;16B': 'RGB;16L', 'RGBA;16B': 'RGBA;16L'}


def read_options(cfg) -> dict:
    """The data config's options for reading image files: {'skip_corrupt', 'scan'}.

    data.skip_corrupt (default False) drops unreadable files of every source (listed in
    `Data.skipped`); data.scan_images (default 'header') is how the files are checked up front.
    """
    folder = cfg.get('folder')
    if folder is not None and folder.get('skip_corrupt', False):
        raise ValueError(
            'data.folder.skip_corrupt is now data.skip_corrupt (one switch for every image '
            'source); set data.skip_corrupt=True instead.'
        )
    return {
        'skip_corrupt': bool(cfg.get('skip_corrupt', False)),
        'scan': cfg.get('scan_images', 'header'),
    }


# Training decodes for random crops, when data.train_resize_size is 0: PrunNet's Resize(256) before
# RandomCrop(224) (8/7); for random-resized crops twice the crop, so that the smallest crops (8%
# of the area, 28% of the side) still hold ~0.57 image_size pixels across.
_AUTO_TRAIN_RESIZE = {'random_crop': 8 / 7, 'random_resized_crop': 2.0}


def preprocess_from_config(cfg) -> Preprocess:
    """The `Preprocess` of a data config: data.image_size, data.eval_preprocess ('center_crop'),
    data.eval_resize_size (0), data.train_resize_size (0: automatic for data.augment)."""
    size = check_image_size(cfg.image_size)
    train = int(cfg.get('train_resize_size', 0))
    if not train and cfg.get('augment', 'pad_crop') in _AUTO_TRAIN_RESIZE:
        train = round(size * _AUTO_TRAIN_RESIZE[cfg.get('augment')])
    return Preprocess(
        image_size=size,
        eval_mode=cfg.get('eval_preprocess', 'center_crop'),
        eval_resize_size=int(cfg.get('eval_resize_size', 0)),
        train_resize_size=train,
    )


class CorruptImageError(ValueError):
    """An image file that PIL cannot open or decode; `reason` says why, in one line."""

    def __init__(self, message: str, reason: str = ''):
        super().__init__(message)
        self.reason = reason or message


def check_image_size(image_size) -> int:
    """`image_size` as an int; ValueError unless it is a positive int (not a bool)."""
    is_int = isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool)
    if not is_int or image_size <= 0:
        raise ValueError(f'image_size must be a positive int, got {image_size!r}.')
    return int(image_size)


def _describe(file) -> str:
    return repr(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else 'image bytes'


def _read(file) -> bytes:
    """The bytes of a path (local or any epath filesystem) or of a file-like object."""
    if hasattr(file, 'read'):
        file.seek(0)
        return file.read()
    return epath.Path(file).read_bytes()


# ---------------------------------------------------------------------------------------------
# Modes.


def _unit(values: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(values.astype(np.float64) / full_scale, 0.0, 1.0)


def _png16(data: bytes, image: Image.Image) -> np.ndarray | None:
    """The exact samples in [0, 1] of a 16-bit RGB, RGBA or grey+alpha PNG, else None.

    `image`: the file opened, not yet loaded. PIL decodes these to 8 bits by keeping each
    sample's high byte. Decoding the same data again with the little-endian unpacker gives the
    low bytes ('RGB;16L' takes the second byte of each big-endian pair as the low one); grey+alpha
    has no such unpacker, so its 4-byte pixels are read as one big-endian 32-bit int, grey in the
    upper half.
    """
    if image.format != 'PNG' or len(image.tile) != 1:
        return None
    tile = image.tile[0]

    def decode(mode: str, rawmode: str) -> np.ndarray:
        again = Image.open(io.BytesIO(data))
        again._mode = mode  # The unpacker must match the mode of the image it fills.
        again.tile = [tile._replace(args=rawmode)]
        again.load()
        return np.asarray(again)

    if tile.args in _SIXTEEN_BIT_PNG:
        high = decode(image.mode, tile.args).astype(np.uint32)
        low = decode(image.mode, _SIXTEEN_BIT_PNG[tile.args]).astype(np.uint32)
        return _unit(high * 256 + low, 65535.0)
    if tile.args == 'LA;16B':
        packed = decode('I', 'I;32B').view(np.uint32)
        grey, alpha = packed >> 16, packed & 0xFFFF
        return _unit(np.stack([grey, grey, grey, alpha], axis=-1), 65535.0)
    return None


def _unit_channels(image: Image.Image) -> np.ndarray:
    """(H, W, 3 or 4) float64 in [0, 1] of a loaded image in a mode that PIL's own conversion to
    RGB would get wrong (16-bit, float, alpha)."""
    mode = image.mode
    if mode.startswith('I;16') or mode == 'I':
        grey = _unit(np.asarray(image), 65535.0)
    elif mode == 'F':
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() > 1.0:
            logging.log_first_n(
                logging.WARNING,
                'A float (mode F) image has values up to %g; float images are read as [0, 1] '
                'and larger values are clipped to white.',
                1,
                values.max(),
            )
        grey = np.clip(values, 0.0, 1.0)
    else:  # Alpha modes: PIL's RGBA expands palettes and un-premultiplies 'RGBa' / 'La'.
        return _unit(np.asarray(image.convert('RGBA')), 255.0)
    return np.repeat(grey[..., None], 3, axis=-1)


def _to_uint8_rgb(unit: np.ndarray) -> np.ndarray:
    """(H, W, 3) or (H, W, 4) values in [0, 1] -> uint8 RGB, alpha composited over white."""
    if unit.shape[-1] == 4:
        alpha = unit[..., 3:]
        unit = unit[..., :3] * alpha + _WHITE * (1.0 - alpha)
    return np.floor(unit * 255.0 + 0.5).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """A loaded `image` as 8-bit RGB at the right scale for its mode (module docstring)."""
    mode = image.mode
    if mode == 'RGB':
        return image
    if mode in ('L', '1', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'RGBX'):
        return image.convert('RGB')
    if mode == 'P' and 'transparency' not in image.info:
        return image.convert('RGB')
    return Image.fromarray(_to_uint8_rgb(_unit_channels(image)), 'RGB')


def decode(file, *, draft_size: int | None = None) -> tuple[Image.Image, int]:
    """(8-bit RGB image in the file's stored orientation, its EXIF orientation 1..8).

    `draft_size`: a JPEG may be decoded at a reduced scale, no smaller than this on either side.
    Raises CorruptImageError when the file is missing or cannot be opened or decoded.
    """
    try:
        data = _read(file)
    except FileNotFoundError:
        raise FileNotFoundError(f'Image file {_describe(file)} not found. {LOAD_HINT}') from None
    buffer = io.BytesIO(data)
    try:
        image = Image.open(buffer)
        exact = _png16(data, image)
        if exact is not None:
            rgb = Image.fromarray(_to_uint8_rgb(exact), 'RGB')
        else:
            if draft_size:
                image.draft('RGB', (draft_size, draft_size))  # JPEG only: a reduced-scale decode
            image.load()
            rgb = to_rgb(image)
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files.
        # The reason names the file, not the buffer's memory address (messages stay stable).
        reason = f'{type(e).__name__}: {e}'.replace(repr(buffer), _describe(file))
        reason = reason.replace('\n', ' ')
        raise CorruptImageError(
            f'Cannot decode image {_describe(file)} ({reason}). {LOAD_HINT}', reason
        ) from e
    return rgb, orientation if orientation in _TRANSPOSE else 1


# EXIF orientation -> the transpose that shows the image upright, and where it takes a point.
_TRANSPOSE = {
    1: (None, lambda x, y, w, h: (x, y)),
    2: (Image.Transpose.FLIP_LEFT_RIGHT, lambda x, y, w, h: (w - x, y)),
    3: (Image.Transpose.ROTATE_180, lambda x, y, w, h: (w - x, h - y)),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, lambda x, y, w, h: (x, h - y)),
    5: (Image.Transpose.TRANSPOSE, lambda x, y, w, h: (y, x)),
    6: (Image.Transpose.ROTATE_270, lambda x, y, w, h: (h - y, x)),
    7: (Image.Transpose.TRANSVERSE, lambda x, y, w, h: (h - y, w - x)),
    8: (Image.Transpose.ROTATE_90, lambda x, y, w, h: (y, w - x)),
}


def upright(image: Image.Image, orientation: int, box=None):
    """(`image` turned upright, `box` (x1, y1, x2, y2 in its stored pixels, clipped) in the
    upright image's pixels). Without a box, the box is the whole image."""
    width, height = image.size
    x1, y1, x2, y2 = (0.0, 0.0, width, height) if box is None else (float(v) for v in box)
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f'Bounding box {list(box)} is empty inside the {width}x{height} image.')
    method, where = _TRANSPOSE[orientation]
    if method is None:
        return image, (x1, y1, x2, y2)
    (a, b), (c, d) = where(x1, y1, width, height), where(x2, y2, width, height)
    return image.transpose(method), (min(a, c), min(b, d), max(a, c), max(b, d))


def open_rgb(file, *, draft_size: int | None = None) -> Image.Image:
    """`file` (a path on any epath filesystem, or a file-like object) as an upright 8-bit RGB
    PIL image; see `decode`."""
    image, orientation = decode(file, draft_size=draft_size)
    return upright(image, orientation)[0]


def center_crop(image: Image.Image, size: int, box=None, resize_size: int = 0) -> np.ndarray:
    """The central square of `box` (float pixels; default the whole image) resized to size ×
    size (bilinear): resizing the shorter side to `size` and cropping the centre, in one
    resampling. `resize_size` > size: the shorter side is resized to `resize_size` first and the
    central size × size kept (a crop of size / resize_size of the side, e.g. 224 of 256)."""
    x1, y1, x2, y2 = (0.0, 0.0, *image.size) if box is None else box
    side = min(x2 - x1, y2 - y1) * (size / resize_size if resize_size > size else 1.0)
    left, top = (x1 + x2 - side) / 2, (y1 + y2 - side) / 2
    square = (left, top, left + side, top + side)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=square)
    return np.asarray(resized, dtype=np.uint8)


def resize(image: Image.Image, size: int, box=None) -> np.ndarray:
    """All of `box` (default the whole image) resized to size × size (bilinear), aspect ratio
    not kept: torchvision's Resize((size, size)), as the BCL references evaluate."""
    box = (0.0, 0.0, *image.size) if box is None else box
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box), np.uint8)


def _upright_region(file, draft_size: int | None, box):
    image, orientation = decode(file, draft_size=draft_size)
    try:
        return upright(image, orientation, box)
    except ValueError as e:
        raise ValueError(f'{e} ({_describe(file)})') from None


def load_image(
    file, image_size: int, box=None, *, mode: str = 'center_crop', resize_size: int = 0
) -> np.ndarray:
    """Decodes `file` to a uint8 RGB image_size × image_size square for evaluation.

    `mode` 'center_crop': the shorter side resized to `resize_size` (0: image_size) and the
    centre cropped; 'resize': the whole image resized to the square. `box` (x1, y1, x2, y2 in
    the file's stored pixels, clipped to the image), when given, is cut out first and then
    treated as the whole image (Revisited Oxford/Paris query crops); it is taken before the EXIF
    orientation, as tools that ignore the orientation drew it.

    Raises:
      CorruptImageError: the file cannot be opened or decoded.
      FileNotFoundError: the file is missing.
      ValueError: `box` is empty inside the image, or `mode` is unknown.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f'data.eval_preprocess={mode!r} is not one of {EVAL_MODES}.')
    # A box is in full-resolution pixels: no reduced-scale decode then.
    draft = None if box is not None else max(image_size, resize_size)
    image, region = _upright_region(file, draft, box)
    if mode == 'resize':
        return resize(image, image_size, region)
    return center_crop(image, image_size, region, resize_size)


def load_train_image(file, resize_size: int) -> np.ndarray:
    """Decodes `file` to uint8 RGB with its shorter side resized to `resize_size` (bilinear,
    aspect ratio kept, no crop): what random crops for training are cut from."""
    image, _ = _upright_region(file, resize_size, None)
    width, height = image.size
    if width <= height:
        shape = (resize_size, max(1, round(height * resize_size / width)))
    else:
        shape = (max(1, round(width * resize_size / height)), resize_size)
    return np.asarray(image.resize(shape, Image.Resampling.BILINEAR), np.uint8)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a source turns files into pixels.

    image_size: side of the square images.
    eval_mode: 'center_crop' (shorter side to eval_resize_size, central square) or 'resize'
      (the whole image squashed to the square, as AdvBCT and Hot-refresh evaluate).
    eval_resize_size: center_crop's shorter side before the crop; 0 = image_size (no margin).
      256 with image_size 224 is PrunNet's Resize(256) + CenterCrop(224).
    train_resize_size: the shorter side of the images random crops are cut from
      (`load_train_image`); 0 = image_size.
    """

    image_size: int
    eval_mode: str = 'center_crop'
    eval_resize_size: int = 0
    train_resize_size: int = 0

    def __post_init__(self):
        check_image_size(self.image_size)
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f'data.eval_preprocess={self.eval_mode!r} is not one of {EVAL_MODES}.')
        for name in ('eval_resize_size', 'train_resize_size'):
            value = getattr(self, name)
            if value and value < self.image_size:
                raise ValueError(
                    f'data.{name}={value} is smaller than data.image_size={self.image_size}; use '
                    '0 (= image_size) or a larger size.'
                )

    @classmethod
    def of(cls, image_size: int, preprocess: Preprocess | None) -> Preprocess:
        """`preprocess`, or the default one at `image_size`; ValueError if their sizes differ."""
        if preprocess is None:
            return cls(check_image_size(image_size))
        if preprocess.image_size != image_size:
            raise ValueError(
                f'image_size={image_size} but preprocess.image_size={preprocess.image_size}.'
            )
        return preprocess

    @property
    def train_size(self) -> int:
        return self.train_resize_size or self.image_size

    def eval_args(self) -> dict:
        """`load_image`'s keyword arguments for this preprocessing."""
        return {'mode': self.eval_mode, 'resize_size': self.eval_resize_size}

    def describe(self) -> str:
        if self.eval_mode == 'resize':
            return f'eval: resize to {self.image_size}x{self.image_size}'
        side = self.eval_resize_size or self.image_size
        return f'eval: shorter side {side}, centre {self.image_size}x{self.image_size}'


# ---------------------------------------------------------------------------------------------
# The up-front scan.


def _problem(path: str, mode: str) -> str | None:
    """None if `path` opens as an image (`mode` 'header': its header; 'decode': all of it)."""
    try:
        if mode == 'decode':
            open_rgb(path, draft_size=64)
        else:
            with epath.Path(path).open('rb') as f:
                try:
                    with Image.open(f) as image:
                        image.size  # noqa: B018  (the header holds it: reading it is the check)
                        marker = _END_MARKERS.get(image.format)
                except Exception as e:  # noqa: BLE001  (unidentified, truncated header, ...)
                    return f'{type(e).__name__}: {e}'.replace(repr(f), repr(path))
                if marker is not None and marker not in _tail(f):
                    return f'truncated: the file ends before its {image.format} end marker'
    except FileNotFoundError:
        return 'file not found'
    except CorruptImageError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001  (unidentified, truncated header, permission, ...)
        return f'{type(e).__name__}: {e}'.replace('\n', ' ')
    return None


def _tail(f) -> bytes:
    """The last _TAIL bytes of an open file."""
    size = f.seek(0, io.SEEK_END)
    f.seek(max(0, size - _TAIL))
    return f.read()


def scan(
    paths: list[str], *, what: str, skip_corrupt: bool, mode: str = 'header'
) -> tuple[np.ndarray, list[str]]:
    """Checks every file of `paths` before any work; returns (indices kept, paths skipped).

    Raises (naming `what`, the files and data.skip_corrupt) unless `skip_corrupt`:
    FileNotFoundError when files are missing, CorruptImageError when some cannot be read.
    With `skip_corrupt` the bad files are dropped, and a warning lists them.
    """
    if mode not in SCAN_MODES:
        raise ValueError(f'data.scan_images={mode!r} is not one of {SCAN_MODES}.')
    if mode == 'off' or not paths:
        return np.arange(len(paths)), []
    show = len(paths) >= _PROGRESS_FROM and jax.process_index() == 0
    with (
        concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool,
        tqdm.tqdm(total=len(paths), desc=f'scan {what}', unit='img', disable=not show) as bar,
    ):
        problems = []
        for problem in pool.map(lambda p: _problem(p, mode), paths):
            problems.append(problem)
            bar.update(1)
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    if not bad:
        return np.arange(len(paths)), []
    shown = preview(f'{p} ({why})' for p, why in bad)
    if not skip_corrupt:
        missing = [p for p, why in bad if why == 'file not found']
        if missing:
            raise FileNotFoundError(
                f'{what}: {len(missing)} of {len(paths)} images are missing: '
                f'{preview(missing)}. {SKIP_HINT}'
            )
        raise CorruptImageError(
            f'{what}: {len(bad)} of {len(paths)} images cannot be read: {shown}. {SKIP_HINT}'
        )
    if len(bad) == len(paths):
        raise CorruptImageError(f'{what}: all {len(paths)} images are unreadable, e.g. {shown}.')
    logging.warning(
        '%s: skipping %d unreadable image(s) of %d: %s', what, len(bad), len(paths), shown
    )
    skipped = {p for p, _ in bad}
    keep = np.array([i for i, p in enumerate(paths) if p not in skipped], dtype=np.int64)
    return keep, [p for p, _ in bad]


def check_classes_kept(labels, classes, what: str) -> None:
    """ValueError naming the classes of `classes` that no label in `labels` points at any more
    (every image of theirs was skipped)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    empty = [classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(
            f'{what}: class(es) {preview(empty)} have only unreadable images; an empty class '
            'cannot be trained on or evaluated. Fix their files or remove the classes.'
        )


# ---------------------------------------------------------------------------------------------
# The source the file-based datasets share.


class ImageList:
    """Random-access source (grain protocol) over image files `paths` with int32 `labels`.

    ``ds[i]`` is ``{'image': uint8 (image_size, image_size, 3), 'label': int32}``, decoded by
    `load_image`. The dataset sources (folders, GLDv2, In-shop) set `paths`, `labels`, `ids`
    (what identifies each image independently of where the dataset lives), `image_size` and
    `skipped` (files the scan dropped).
    """

    paths: list[str]
    labels: np.ndarray
    ids: list[str]
    image_size: int
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    preprocess: Preprocess

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """The image as evaluation sees it (and pad_crop training)."""
        index = int(index)
        image = load_image(self.paths[index], self.image_size, **self.preprocess.eval_args())
        return {'image': image, 'label': np.int32(self.labels[index])}

    def train_item(self, index: int) -> dict[str, np.ndarray]:
        """The image for random crops: shorter side `train_resize_size`, uncropped."""
        index = int(index)
        image = load_train_image(self.paths[index], self.preprocess.train_size)
        return {'image': image, 'label': np.int32(self.labels[index])}
