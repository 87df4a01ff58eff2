"""Tests for bcl_jax.data.images: every PIL mode decoded against the file's own pixel values,
EXIF orientation, and the up-front scan."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bcl_jax.data import images

RNG = np.random.default_rng(0)


def _png(path, samples: np.ndarray, color_type: int, bit_depth: int = 16):
    """Writes a PNG by hand (PIL cannot write 16-bit colour): `samples` (H, W[, C]) big-endian
    `bit_depth` samples; rows cycle through the filters None, Sub and Up, so that the decoder's
    unfiltering is exercised as well."""
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    dtype = '>u2' if bit_depth == 16 else np.uint8
    raw = samples.astype(dtype).reshape(h, w * channels).view(np.uint8).reshape(h, -1)
    bpp = channels * bit_depth // 8
    rows, previous = [], np.zeros(raw.shape[1], np.uint8)
    for y in range(h):
        row, kind = raw[y], y % 3
        if kind == 1:  # Sub: the byte minus the same byte of the pixel to the left.
            row = row - np.concatenate([np.zeros(bpp, np.uint8), row[:-bpp]])
        elif kind == 2:  # Up: the byte minus the byte above.
            row = row - previous
        rows.append(bytes([kind]) + row.astype(np.uint8).tobytes())
        previous = raw[y]

    def chunk(kind, data):
        return (
            struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
        )

    header = struct.pack('>IIBBBBB', w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b'\x89PNG\r\n\x1a\n'
        + chunk(b'IHDR', header)
        + chunk(b'IDAT', zlib.compress(b''.join(rows)))
        + chunk(b'IEND', b'')
    )
    return path


def _over_white(rgb, alpha, full_scale):
    """Reference: float64 composite over white, rounded half up to 8 bits."""
    c, a = rgb / full_scale, alpha[..., None] / full_scale
    return np.floor(255.0 * (c * a + 1.0 - a) + 0.5).astype(np.uint8)


def _decoded(path):
    return np.asarray(images.open_rgb(path))


def test_16_bit_grey_png_is_scaled_not_white(tmp_path):
    values = RNG.integers(0, 65536, (5, 7)).astype(np.uint16)
    values[0, :4] = [0, 128, 129, 65535]  # 128/257 rounds down, 129/257 up
    path = tmp_path / 'g16.png'
    Image.fromarray(values).save(path)  # PIL writes 'I;16' as a 16-bit grey PNG
    assert Image.open(path).mode == 'I;16'
    got = _decoded(path)
    want = np.floor(values / 257.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(got, np.stack([want] * 3, axis=-1))
    assert got[0, :4, 0].tolist() == [0, 0, 1, 255]
    assert (got < 255).mean() > 0.9  # not the all-white image PIL's own conversion gives


@pytest.mark.parametrize(
    'channels, color_type', [(3, 2), (4, 6), (2, 4)], ids=['rgb', 'rgba', 'la']
)
def test_16_bit_colour_pngs_keep_both_bytes(tmp_path, channels, color_type):
    """PIL opens these as 8-bit 'RGB'/'RGBA' with only the high bytes: v // 256, not
    round(v / 257) (they differ e.g. at 255 and 65280)."""
    values = RNG.integers(0, 65536, (6, 5, channels)).astype(np.uint16)
    values[0, 0, 0], values[0, 1, 0] = 255, 65280  # //256: 0 and 255; round(/257): 1 and 254
    path = _png(tmp_path / 'c16.png', values, color_type)
    got = _decoded(path)
    if channels == 3:
        want = np.floor(values / 257.0 + 0.5).astype(np.uint8)
    else:
        colour = values[..., :3] if channels == 4 else np.repeat(values[..., :1], 3, axis=-1)
        want = _over_white(colour.astype(np.float64), values[..., -1].astype(np.float64), 65535.0)
    np.testing.assert_array_equal(got, want)
    if channels == 3:
        assert got[0, 0, 0] == 1 and got[0, 1, 0] == 254


def test_8_bit_alpha_modes_are_composited_over_white(tmp_path):
    rgba = RNG.integers(0, 256, (4, 6, 4)).astype(np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255  # fully transparent: white; opaque: the colour
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    want = _over_white(rgba[..., :3].astype(float), rgba[..., 3].astype(float), 255.0)
    got = _decoded(tmp_path / 'rgba.png')
    np.testing.assert_array_equal(got, want)
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == rgba[0, 1, :3].tolist()

    la = rgba[..., [0, 3]]
    Image.fromarray(la, 'LA').save(tmp_path / 'la.png')
    grey = np.repeat(la[..., :1].astype(float), 3, axis=-1)
    np.testing.assert_array_equal(
        _decoded(tmp_path / 'la.png'), _over_white(grey, la[..., 1], 255.0)
    )


def test_palette_with_transparency(tmp_path):
    palette = RNG.integers(0, 256, (4, 3)).astype(np.uint8)
    index = RNG.integers(0, 4, (5, 5)).astype(np.uint8)
    image = Image.fromarray(index, 'P')
    image.putpalette(palette.reshape(-1).tolist())
    image.save(tmp_path / 'p.png', transparency=bytes([255, 0, 128, 255]))  # tRNS per entry
    alpha = np.array([255, 0, 128, 255], float)[index]
    want = _over_white(palette[index].astype(float), alpha, 255.0)
    np.testing.assert_array_equal(_decoded(tmp_path / 'p.png'), want)
    image.save(tmp_path / 'opaque.png')  # Without transparency: the palette colours.
    np.testing.assert_array_equal(_decoded(tmp_path / 'opaque.png'), palette[index])


def test_cmyk_bilevel_int_and_float_modes(tmp_path, caplog):
    cmyk = RNG.integers(0, 256, (3, 4, 4)).astype(np.uint8)
    Image.fromarray(cmyk, 'CMYK').save(tmp_path / 'cmyk.tif')
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    want = np.floor((255 - c) * (255 - k) / 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(tmp_path / 'cmyk.tif'), want)

    bits = RNG.integers(0, 2, (4, 9)).astype(bool)
    Image.fromarray(bits).save(tmp_path / 'one.png')
    assert Image.open(tmp_path / 'one.png').mode == '1'
    np.testing.assert_array_equal(_decoded(tmp_path / 'one.png')[..., 1], bits * 255)

    ints = RNG.integers(0, 65536, (3, 5)).astype(np.int32)
    Image.fromarray(ints, 'I').save(tmp_path / 'i.tif')
    assert Image.open(tmp_path / 'i.tif').mode == 'I'
    want = np.floor(ints / 257.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(tmp_path / 'i.tif')[..., 2], want)

    floats = RNG.uniform(0, 1, (3, 5)).astype(np.float32)
    Image.fromarray(floats, 'F').save(tmp_path / 'f.tif')
    want = np.floor(255.0 * floats.astype(np.float64) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(tmp_path / 'f.tif')[..., 0], want)
    floats[0, 0] = 7.0
    Image.fromarray(floats, 'F').save(tmp_path / 'f7.tif')
    with caplog.at_level(logging.WARNING):
        got = _decoded(tmp_path / 'f7.tif')
    assert got[0, 0, 0] == 255 and 'values up to 7' in caplog.text


def _with_orientation(path, pixels, orientation, **options):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), **options)
    return path


@pytest.mark.parametrize('orientation, turn', [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    """Orientation 6: the stored image is shown turned 90° clockwise (rot90 k=-1); 8: counter-
    clockwise; 3: 180°. Reference: the stored pixels as PIL decodes them, turned by numpy."""
    stored = np.full((20, 40, 3), (10, 10, 250), np.uint8)  # blue, with a red top-left
    stored[:10, :20] = (250, 10, 10)
    path = _with_orientation(tmp_path / 'o.jpg', stored, orientation, quality=100)
    plain = np.asarray(Image.open(path).convert('RGB'))  # stored frame
    np.testing.assert_array_equal(_decoded(path), np.rot90(plain, k=turn))
    # A box is in the stored pixels: an 8x8 box in the red corner, at scale 1 (exact pixels),
    # stays red however the file turns; read in the upright frame it would hold blue.
    png = _with_orientation(tmp_path / 'o.png', stored, orientation)
    crop = images.load_image(png, 8, box=(4, 2, 12, 10))
    np.testing.assert_array_equal(crop, np.full((8, 8, 3), (250, 10, 10), np.uint8))
    whole = images.load_image(png, 20)  # upright, then the central square, at scale 1
    upright = np.rot90(stored, k=turn)
    square = upright[10:30] if turn % 2 else upright[:, 10:30]
    np.testing.assert_array_equal(whole, square)


def test_default_path_is_unchanged_for_8_bit_files(tmp_path):
    """8-bit RGB and grey files decode as before: PIL's draft, convert('RGB') and one bilinear
    resize of the central square (the built-in benchmark's and every old result's pixels)."""
    rgb = RNG.integers(0, 256, (30, 50, 3)).astype(np.uint8)
    for name, pixels in (('a.jpg', rgb), ('b.png', rgb), ('c.jpg', rgb[..., 0])):
        Image.fromarray(pixels).save(tmp_path / name)
        with Image.open(tmp_path / name) as img:
            img.draft('RGB', (8, 8))
            img = img.convert('RGB')
            w, h = img.size
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            want = np.asarray(img.resize((8, 8), Image.Resampling.BILINEAR, box=box))
        np.testing.assert_array_equal(images.load_image(tmp_path / name, 8), want)


def test_file_objects_and_missing_files(tmp_path):
    pixels = RNG.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'PNG')
    np.testing.assert_array_equal(images.open_rgb(io.BytesIO(buffer.getvalue())), pixels)
    with pytest.raises(FileNotFoundError, match='nope.png'):
        images.load_image(tmp_path / 'nope.png', 4)
    (tmp_path / 'bad.png').write_bytes(b'not a png')
    with pytest.raises(images.CorruptImageError, match='bad.png') as info:
        images.load_image(tmp_path / 'bad.png', 4)
    assert 'BytesIO' not in str(info.value)  # the message names the file, not a buffer


def test_scan(tmp_path, caplog):
    paths = []
    for k in range(4):
        Image.fromarray(RNG.integers(0, 256, (5, 5, 3)).astype(np.uint8)).save(
            tmp_path / f'{k}.png'
        )
        paths.append(str(tmp_path / f'{k}.png'))
    keep, skipped = images.scan(paths, what='four', skip_corrupt=False)
    assert keep.tolist() == [0, 1, 2, 3] and skipped == []
    (tmp_path / '1.png').write_bytes(b'')
    paths.append(str(tmp_path / 'gone.png'))
    with pytest.raises(FileNotFoundError, match=r'four: 1 of 5 images are missing: .*gone.png'):
        images.scan(paths, what='four', skip_corrupt=False)
    with pytest.raises(images.CorruptImageError, match=r'1 of 4 images cannot be read: .*1.png'):
        images.scan(paths[:4], what='four', skip_corrupt=False)
    with caplog.at_level(logging.WARNING):
        keep, skipped = images.scan(paths, what='four', skip_corrupt=True)
    assert keep.tolist() == [0, 2, 3] and skipped == [paths[1], paths[4]]
    assert 'skipping 2 unreadable image(s) of 5' in caplog.text
    assert images.scan(paths, what='four', skip_corrupt=False, mode='off')[0].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


def _blocks(tmp_path):
    """A 40x20 PNG: columns 0-9 green, 10-19 red, 20-39 blue; shrunk 2x, the second output
    column (support 2: source columns 1-5) is green and the one before last blue."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10], pixels[:, 10:20], pixels[:, 20:] = (0, 200, 0), (200, 0, 0), (0, 0, 200)
    Image.fromarray(pixels).save(tmp_path / 'blocks.png')
    return tmp_path / 'blocks.png'


def test_eval_resize_keeps_the_whole_image_centre_crop_does_not(tmp_path):
    """An 80x20 image, columns 0-19 green, 20-59 red, 60-79 blue. Resized whole to 8x8, each
    output column averages 10 source columns (bilinear support 10): the first is green, the last
    blue. The centre crop takes columns 30-50 (support 2.5): red throughout."""
    pixels = np.zeros((20, 80, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:60], pixels[:, 60:] = (0, 200, 0), (200, 0, 0), (0, 0, 200)
    Image.fromarray(pixels).save(tmp_path / 'wide.png')
    squashed = images.load_image(tmp_path / 'wide.png', 8, mode='resize')
    cropped = images.load_image(tmp_path / 'wide.png', 8)
    assert squashed.shape == cropped.shape == (8, 8, 3)
    assert squashed[:, 0].tolist() == [[0, 200, 0]] * 8
    assert squashed[:, -1].tolist() == [[0, 0, 200]] * 8
    np.testing.assert_array_equal(cropped, np.full((8, 8, 3), (200, 0, 0), np.uint8))
    with pytest.raises(ValueError, match="data.eval_preprocess='stretch'"):
        images.load_image(tmp_path / 'wide.png', 8, mode='stretch')


def test_eval_resize_size_crops_the_centre_of_a_larger_resize(tmp_path):
    """Shorter side to 20, centre 10x10 (PrunNet's Resize(256) + CenterCrop(224) pattern): of a
    40x40 image, the central 20x20 source pixels (support 2: columns 8-32), here all red."""
    pixels = np.full((40, 40, 3), (0, 0, 200), np.uint8)
    pixels[6:34, 6:34] = (200, 0, 0)
    Image.fromarray(pixels).save(tmp_path / 'centre.png')
    inner = images.load_image(tmp_path / 'centre.png', 10, resize_size=20)
    np.testing.assert_array_equal(inner, np.full((10, 10, 3), (200, 0, 0), np.uint8))
    whole = images.load_image(tmp_path / 'centre.png', 10)  # resize_size 0: all of it
    assert whole[0, 0].tolist() == [0, 0, 200] and whole[5, 5].tolist() == [200, 0, 0]


def test_load_train_image_keeps_the_aspect_ratio(tmp_path):
    path = _blocks(tmp_path)
    train = images.load_train_image(path, 10)  # 40x20 -> 20x10: shorter side 10, uncropped
    assert train.shape == (10, 20, 3)
    assert (
        train[:, 1].tolist() == [[0, 200, 0]] * 10 and train[:, -2].tolist() == [[0, 0, 200]] * 10
    )
    Image.fromarray(np.zeros((21, 13, 3), np.uint8)).save(tmp_path / 'odd.png')
    assert images.load_train_image(tmp_path / 'odd.png', 7).shape == (11, 7, 3)  # 21*7/13


def test_preprocess_config_and_validation():
    from ml_collections import config_dict

    cfg = config_dict.ConfigDict({'image_size': 224})
    assert images.preprocess_from_config(cfg) == images.Preprocess(224)
    cfg.augment = 'random_resized_crop'
    assert images.preprocess_from_config(cfg).train_resize_size == 448
    cfg.augment = 'random_crop'
    assert images.preprocess_from_config(cfg).train_resize_size == 256  # 224 * 8/7
    cfg.train_resize_size, cfg.eval_preprocess, cfg.eval_resize_size = 300, 'resize', 256
    assert images.preprocess_from_config(cfg) == images.Preprocess(224, 'resize', 256, 300)
    with pytest.raises(ValueError, match='data.eval_resize_size=100 is smaller'):
        images.Preprocess(224, eval_resize_size=100)
    with pytest.raises(ValueError, match="data.eval_preprocess='crop'"):
        images.Preprocess(224, eval_mode='crop')
    with pytest.raises(ValueError, match='image_size=8 but preprocess.image_size=224'):
        images.Preprocess.of(8, images.Preprocess(224))
