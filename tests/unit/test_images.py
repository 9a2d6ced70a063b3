"""Tests for pipeline.data.images: every image mode a web crawl meets decodes to the RGB a browser shows.

Images are built in memory the way real files come: 16-bit PNGs written chunk by chunk (PIL
cannot write 48/64-bit PNG), CMYK JPEGs with PIL's Adobe marker and with an embedded ICC
profile, palettes with tRNS, EXIF-rotated JPEGs. The builders are reused by
tests/integration/test_image_modes_download.py, which serves the same files to the real download.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import normalize_for_img2dataset, open_rgb, opencv_mishandles, to_rgb

# PNG colour types (IHDR byte 25)
GREY, RGB, GREY_ALPHA, RGB_ALPHA = 0, 2, 4, 6


def png(pixels, color_type: int, bit_depth: int = 16, trns: bytes | None = None) -> bytes:
    """A PNG written by hand from an [H, W] or [H, W, C] array: any bit depth PNG allows."""
    arr = np.asarray(pixels)
    dtype = ">u2" if bit_depth == 16 else "u1"

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + row.astype(dtype).tobytes() for row in arr)  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"tRNS", trns) if trns else b"")
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def solid(color, size=(96, 64)) -> np.ndarray:
    """[H, W, C] (or [H, W] for a scalar) array of one colour."""
    w, h = size
    return np.broadcast_to(np.asarray(color), (h, w, *np.shape(color))).copy()


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB 0..255 -> CIE Lab (D50, the ICC connection space)."""
    c = np.asarray(rgb, float) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169],
                       [0.0139322, 0.0971045, 0.7141733]])  # Bradford-adapted to D50
    xyz = lin @ to_xyz.T / np.array([0.9642, 1.0, 0.8249])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def cmyk_icc_profile(ink_to_rgb) -> bytes:
    """A minimal ICC v2 CMYK output profile: one lut8 A2B0 with a 2-point grid per ink.

    ``ink_to_rgb(c, m, y, k)`` (inks 0..1) gives the sRGB colour of each grid corner.
    """
    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    corners = np.array(np.meshgrid(*[[0.0, 1.0]] * 4, indexing="ij")).reshape(4, -1).T  # C varies slowest
    lab = srgb_to_lab(np.array([ink_to_rgb(*c) for c in corners]))
    lab8 = np.clip(np.rint(np.stack([lab[:, 0] * 2.55, lab[:, 1] + 128, lab[:, 2] + 128], -1)), 0, 255)
    ramp = bytes(range(256))
    identity = b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    a2b0 = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + identity + ramp * 4 + lab8.astype("u1").tobytes() + ramp * 3
    d50 = s15(0.9642) + s15(1.0) + s15(0.8249)
    text = b"test CMYK\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(12 + 67)
    tags = [(b"A2B0", a2b0), (b"wtpt", b"XYZ " + bytes(4) + d50), (b"desc", desc)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
              + bytes(12) + b"acsp" + bytes(28) + d50 + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + data


def naive_inks(c, m, y, k):
    return 255 * (1 - c) * (1 - k), 255 * (1 - m) * (1 - k), 255 * (1 - y) * (1 - k)


def cyan_prints_magenta(c, m, y, k):
    """A profile no naive conversion could imitate: cyan and magenta inks swapped."""
    return naive_inks(m, c, y, k)


def exif_jpeg(orientation: int, size=(96, 64)) -> bytes:
    """A JPEG stored with its left half red and right half blue, tagged with ``orientation``."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif)


def px(img: Image.Image, xy=None) -> tuple[int, ...]:
    """The pixel at ``xy`` (default: the centre)."""
    return img.getpixel(xy or (img.width // 2, img.height // 2))


def close(got, want, tol: int) -> bool:
    return all(abs(int(g) - int(w)) <= tol for g, w in zip(got, want, strict=True))


# (name, bytes, expected centre colour, tolerance): what a browser shows on a white page.
# Shared with tests/integration/test_image_modes_download.py.
def web_images() -> list[tuple[str, bytes, tuple[int, int, int], int]]:
    half_red = Image.new("P", (96, 64), 1)
    half_red.putpalette([255, 255, 255, 200, 30, 30])
    one_bit = Image.new("1", (96, 64), 1)
    cmyk = Image.new("RGB", (96, 64), (200, 60, 30)).convert("CMYK")
    return [
        ("rgb_jpeg", encode(Image.new("RGB", (96, 64), (200, 60, 30)), "JPEG", quality=95), (200, 60, 30), 3),
        ("grey_png", encode(Image.new("L", (96, 64), 100), "PNG"), (100, 100, 100), 0),
        ("grey16_png", png(solid(0x8080), GREY), (128, 128, 128), 0),
        ("rgb48_png", png(solid([0x8080, 0x4040, 0xC0C0]), RGB), (128, 64, 192), 0),
        ("rgba64_png_half_red", png(solid([0xFFFF, 0, 0, 0x8000]), RGB_ALPHA), (255, 127, 127), 1),
        ("la16_png_half_grey", png(solid([0x8080, 0x8000]), GREY_ALPHA), (191, 191, 191), 1),
        ("la8_png_half_black", png(solid([0, 128], (96, 64)), GREY_ALPHA, 8), (127, 127, 127), 1),
        ("rgba8_png_half_red", encode(Image.new("RGBA", (96, 64), (255, 0, 0, 128)), "PNG"), (255, 127, 127), 1),
        ("rgba_webp_half_red", encode(Image.new("RGBA", (96, 64), (255, 0, 0, 128)), "WEBP", lossless=True),
         (255, 127, 127), 1),
        ("palette_png", encode(half_red, "PNG"), (200, 30, 30), 0),
        ("palette_png_half_alpha", encode(half_red, "PNG", transparency=bytes([255, 128])), (227, 142, 142), 1),
        ("palette_gif_transparent", encode(half_red, "GIF", transparency=1), (255, 255, 255), 0),
        ("one_bit_png", encode(one_bit, "PNG"), (255, 255, 255), 0),
        ("cmyk_jpeg", encode(cmyk, "JPEG", quality=95), (200, 60, 30), 4),
        ("cmyk_jpeg_icc", encode(Image.new("CMYK", (96, 64), (255, 0, 0, 0)), "JPEG", quality=95,
                                 icc_profile=cmyk_icc_profile(cyan_prints_magenta)), (255, 0, 255), 8),
        ("float_tiff", encode(Image.fromarray(solid(np.float32(0.5))), "TIFF"), (128, 128, 128), 0),
        ("int32_tiff", encode(Image.fromarray(solid(np.int32(0x8080))), "TIFF"), (128, 128, 128), 0),
    ]


@pytest.mark.parametrize("name, data, want, tol", web_images(), ids=[c[0] for c in web_images()])
def test_every_mode_decodes_to_what_a_browser_shows(name, data, want, tol):
    img = open_rgb(data)
    assert img.mode == "RGB" and img.size == (96, 64)
    assert close(px(img), want, tol), (name, px(img), want)


def test_rgb_is_returned_as_is_and_jpeg_draft_still_works():
    data = encode(Image.new("RGB", (512, 256), (10, 120, 240)), "JPEG", quality=90)
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (64, 32))  # what the training loader does before decoding
    assert to_rgb(img) is img
    assert img.size == (64, 32) and close(px(img), (10, 120, 240), 3)


def test_16_bit_grey_is_scaled_not_clipped():
    ramp = np.array([[0, 257, 1000, 0x8080, 0xFF00, 0xFFFF]], np.uint16)
    want = [0, 1, 4, 128, 254, 255]
    for mode, raw in (("I;16", ramp.astype("<u2").tobytes()), ("I;16L", ramp.astype("<u2").tobytes()),
                      ("I;16B", ramp.astype(">u2").tobytes())):
        img = Image.frombytes(mode, (6, 1), raw)
        assert np.asarray(to_rgb(img))[0, :, 0].tolist() == want, mode
    from_png = Image.open(io.BytesIO(png(ramp, GREY)))
    assert from_png.mode == "I;16" and from_png.convert("RGB").getpixel((3, 0)) == (255, 255, 255)  # the bug
    assert np.asarray(to_rgb(from_png))[0].tolist() == [[v] * 3 for v in want]


def test_48_and_64_bit_png_as_pil_opens_them():
    # PIL opens 16-bit colour PNGs as 8-bit RGB/RGBA (high byte) and 16-bit grey+alpha as RGBA.
    assert Image.open(io.BytesIO(png(solid([1, 2, 3]), RGB))).mode == "RGB"
    assert Image.open(io.BytesIO(png(solid([1, 2, 3, 4]), RGB_ALPHA))).mode == "RGBA"
    assert Image.open(io.BytesIO(png(solid([1, 2]), GREY_ALPHA))).mode == "RGBA"
    left_opaque = solid([0, 0xFFFF, 0, 0xFFFF])
    left_opaque[:, 48:, 3] = 0  # right half fully transparent
    img = open_rgb(png(left_opaque, RGB_ALPHA))
    assert px(img, (10, 10)) == (0, 255, 0) and px(img, (80, 10)) == (255, 255, 255)


def test_int32_and_float_ranges():
    def grey(arr) -> list[int]:
        return np.asarray(to_rgb(Image.fromarray(np.asarray([arr]))))[0, :, 0].tolist()

    assert grey(np.float32([0.0, 0.25, 0.5, 1.0])) == [0, 64, 128, 255]  # the 0..1 float convention
    assert grey(np.float32([0.0, 100.0, 255.0])) == [0, 100, 255]  # PIL's own 0..255 for F
    assert grey(np.float32([-1.0, 0.0, 1.0])) == [0, 128, 255]  # out of both: stretched
    assert grey(np.float32([np.nan, 0.5, np.inf])) == [0, 128, 0]
    assert grey(np.int32([0, 0x8080, 65535])) == [0, 128, 255]  # 16-bit data in a 32-bit image
    assert grey(np.int32([-100, 0, 155])) == [0, 100, 255]  # negative: stretched
    assert grey(np.int32([-7, -7])) == [0, 0]  # flat and out of range: no division by zero


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    assert px(to_rgb(rgba)) == (255, 127, 127)
    assert rgba.convert("RGB").getpixel((0, 0)) == (255, 0, 0)  # what convert("RGB") shows: opaque red
    assert px(to_rgb(Image.new("LA", (4, 4), (0, 128)))) == (127, 127, 127)
    assert px(to_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 0)))) == (255, 255, 255)
    assert px(to_rgb(Image.new("RGBA", (4, 4), (10, 20, 30, 255)))) == (10, 20, 30)
    pa = Image.new("PA", (4, 4), (1, 128))
    pa.putpalette([0, 0, 0, 0, 0, 255])
    assert px(to_rgb(pa)) == (127, 127, 255)
    keyed = Image.open(io.BytesIO(png(solid([10, 20, 30], (4, 4)), RGB, 8, trns=struct.pack(">HHH", 10, 20, 30))))
    assert keyed.info["transparency"] == (10, 20, 30) and px(to_rgb(keyed)) == (255, 255, 255)
    grey16_keyed = Image.open(io.BytesIO(png(solid(500, (4, 4)), GREY, trns=struct.pack(">H", 500))))
    assert px(to_rgb(grey16_keyed)) == (255, 255, 255)


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (4, 2), 1)
    pal.putpalette([255, 255, 255, 200, 30, 30, 0, 0, 0])
    pal.putpixel((0, 0), 2)
    assert px(to_rgb(pal), (1, 1)) == (200, 30, 30) and px(to_rgb(pal), (0, 0)) == (0, 0, 0)
    opened = Image.open(io.BytesIO(encode(pal, "PNG", transparency=2)))
    assert px(to_rgb(opened), (0, 0)) == (255, 255, 255) and px(to_rgb(opened), (1, 1)) == (200, 30, 30)


def test_one_bit_and_grey():
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(one)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert px(to_rgb(Image.new("L", (2, 2), 77))) == (77, 77, 77)


def test_cmyk_jpeg_plain_and_with_icc_profile():
    source = (200, 60, 30)
    cmyk = encode(Image.new("RGB", (32, 32), source).convert("CMYK"), "JPEG", quality=95)
    img = Image.open(io.BytesIO(cmyk))
    assert img.mode == "CMYK" and img.info.get("adobe")  # PIL writes (and reads) Adobe-inverted CMYK
    assert close(px(to_rgb(img)), source, 4)
    icc = cmyk_icc_profile(cyan_prints_magenta)
    for inks, want in (((0, 0, 0, 0), (255, 255, 255)), ((255, 0, 0, 0), (255, 0, 255)), ((0, 0, 0, 255), (0, 0, 0))):
        data = encode(Image.new("CMYK", (16, 16), inks), "JPEG", quality=95, icc_profile=icc)
        assert close(px(open_rgb(data)), want, 8), (inks, px(open_rgb(data)))
    plain = encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    assert close(px(open_rgb(plain)), (0, 255, 255), 8)  # no profile: the naive conversion
    broken = encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95, icc_profile=b"not a profile")
    assert close(px(open_rgb(broken)), (0, 255, 255), 8)


def test_lab_goes_through_icc():
    from PIL import ImageCms

    lab = ImageCms.profileToProfile(Image.new("RGB", (4, 4), (200, 60, 30)), ImageCms.createProfile("sRGB"),
                                    ImageCms.createProfile("LAB"), outputMode="LAB")
    assert close(px(to_rgb(lab)), (200, 60, 30), 3)


@pytest.mark.parametrize("orientation, red_at, blue_at, size", [
    (1, (10, 32), (80, 32), (96, 64)),  # as stored: left half red
    (3, (80, 32), (10, 32), (96, 64)),  # rotated 180
    (6, (32, 10), (32, 80), (64, 96)),  # shown rotated 90 clockwise: the left half ends up on top
    (8, (32, 80), (32, 10), (64, 96)),  # 90 counter-clockwise: left half at the bottom
])
def test_exif_orientation_is_applied(orientation, red_at, blue_at, size):
    img = open_rgb(exif_jpeg(orientation))
    assert img.size == size
    assert close(px(img, red_at), (255, 0, 0), 4) and close(px(img, blue_at), (0, 0, 255), 4)


def _why(data: bytes) -> str | None:
    return opencv_mishandles(Image.open(io.BytesIO(data)), data)


def test_what_img2dataset_gets_wrong():
    # Measured against img2dataset 1.47's Resizer (OpenCV imdecode, IMREAD_UNCHANGED).
    reasons = {name: _why(data) for name, data, _, _ in web_images()}
    assert reasons == {
        "rgb_jpeg": None, "grey_png": None, "la8_png_half_black": None, "rgba8_png_half_red": None,
        "rgba_webp_half_red": None, "palette_png": None, "palette_png_half_alpha": None,
        "palette_gif_transparent": None, "one_bit_png": None,
        "grey16_png": "mode I;16",  # kept 16-bit: white once read
        "rgb48_png": "16-bit PNG", "rgba64_png_half_red": "16-bit PNG", "la16_png_half_grey": "16-bit PNG",
        "cmyk_jpeg": "mode CMYK", "cmyk_jpeg_icc": "mode CMYK",  # ICC ignored
        "float_tiff": "format TIFF", "int32_tiff": "format TIFF",  # black / resize error
    }
    assert _why(exif_jpeg(6)) == "EXIF orientation" and _why(exif_jpeg(1)) is None


def test_the_check_reads_headers_only():
    plain = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    img = Image.open(io.BytesIO(plain))
    assert opencv_mishandles(img, plain) is None and img._im is None  # nothing decoded
    exif = Image.Exif()
    exif[0x0112] = 6
    for fmt in ("PNG", "WEBP"):  # EXIF orientation outside JPEG: img2dataset ignores it there too
        data = encode(Image.new("RGB", (64, 32)), fmt, exif=exif)
        img = Image.open(io.BytesIO(data))
        assert opencv_mishandles(img, data) == "EXIF orientation" and img._im is None, fmt


def test_normalize_passes_good_bodies_through_untouched():
    for name, data, _, _ in web_images():
        if _why(data) is None:
            assert normalize_for_img2dataset(data) is data, name


@pytest.mark.parametrize("name", ["grey16_png", "rgba64_png_half_red", "cmyk_jpeg_icc", "float_tiff"])
def test_normalize_reencodes_as_lossless_rgb_png(name):
    data = dict((n, d) for n, d, _, _ in web_images())[name]
    out = normalize_for_img2dataset(data)
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG" and img.mode == "RGB" and _why(out) is None
    assert np.array_equal(np.asarray(img), np.asarray(open_rgb(data)))


def test_normalize_applies_exif_orientation():
    out = normalize_for_img2dataset(exif_jpeg(6))
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG" and img.size == (64, 96) and not img.getexif().get(0x0112)
    assert close(px(img, (32, 10)), (255, 0, 0), 4)


def test_normalize_leaves_what_pil_cannot_decode_to_img2dataset():
    grey16 = png(solid(0x8080), GREY)
    for body in (b"\x00\x01garbage", grey16[:60], b"GIF89a" + bytes(10)):
        assert normalize_for_img2dataset(body) is body


def test_filter_and_dedup_see_the_rgb_image():
    from pipeline.data.dedup import image_signature
    from pipeline.data.filter_registry import Sample

    deep = png(solid(0x8080), GREY)
    flat = encode(Image.new("L", (96, 64), 128), "PNG")
    sample = Sample(key="k", caption="a grey square", image_bytes=deep)
    assert sample.image.mode == "RGB" and px(sample.image) == (128, 128, 128)
    deep_sig, flat_sig = image_signature(deep, sample.image), image_signature(flat, Image.open(io.BytesIO(flat)))
    assert deep_sig[1:] == flat_sig[1:]  # same pHash and thumbnail as the 8-bit grey it looks like
    assert set(deep_sig[2]) == {128}


def test_evaluation_references_decode_16_bit(tmp_path):
    from pipeline.release.eval_data import load_references

    (tmp_path / "a.png").write_bytes(png(solid(0x8080, (32, 32)), GREY))
    (tmp_path / "a.txt").write_text("a grey square")
    images, captions = load_references(str(tmp_path), 4)
    assert captions == ["a grey square"] and images.shape == (1, 32, 32, 3)
    assert int(images.min()) == int(images.max()) == 128
