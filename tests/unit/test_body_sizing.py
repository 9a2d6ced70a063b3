"""Issue 27 item 4: every body is sized from its header before any decode (pipeline.data.image_headers
and fetch_guard.check_body), OpenCV's pixel cap travels to the download workers, and HDR/float
images are tone-mapped instead of stored black (pipeline.data.images).

Real bodies come from Pillow's and OpenCV's encoders; bombs are real headers with their size
fields rewritten; every check runs in-process.
"""

from __future__ import annotations

import contextlib
import io
import random
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.data import fetch_guard, images
from pipeline.data.fetch_guard import check_body, normalize_error
from pipeline.data.image_headers import Header, Unsized, read_header
from pipeline.data.images import (
    normalize_for_img2dataset,
    opencv_mishandles,
    passes_as_is,
    tone_map,
)
from pipeline.netguard import (
    BODY_REASONS,
    ENV_OPENCV_MAX_PIXELS,
    FetchPolicy,
    FetchRejected,
    decoder_env,
)
from tests.ingest_server import decompression_bomb
from tests.unit.test_images import exif_jpeg, web_images

W, H = 123, 45  # distinct, not square: a swapped width and height shows
BOMB = 9000  # 9000 x 9000 = 81 Mpx, over the 64 Mpx default


def _pil(fmt: str, mode: str = "RGB", size=(W, H), **kw) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _cv(ext: str, array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, array)
    assert ok, ext
    return data.tobytes()


def _float_rgb(size=(W, H)) -> np.ndarray:
    return np.random.default_rng(1).random((size[1], size[0], 3), np.float32) * 4


def _bodies() -> dict[str, tuple[bytes, str]]:
    """name -> (body, format read_header must report), all W x H."""
    grey = np.random.default_rng(2).integers(0, 255, (H, W), np.uint8)
    return {
        "jpeg": (_pil("JPEG"), "JPEG"), "jpeg_grey": (_pil("JPEG", "L"), "JPEG"),
        "jpeg_cmyk": (_pil("JPEG", "CMYK"), "JPEG"), "jpeg_progressive": (_pil("JPEG", progressive=True), "JPEG"),
        "png": (_pil("PNG"), "PNG"), "png_palette": (_pil("PNG", "P"), "PNG"), "png_rgba": (_pil("PNG", "RGBA"), "PNG"),
        "png16": (_cv(".png", grey.astype(np.uint16) * 257), "PNG"),
        "gif": (_pil("GIF", "P"), "GIF"), "webp": (_pil("WEBP"), "WEBP"),
        "webp_lossless": (_pil("WEBP", lossless=True), "WEBP"), "webp_alpha": (_pil("WEBP", "RGBA"), "WEBP"),
        "bmp": (_pil("BMP"), "BMP"), "bmp_cv": (_cv(".bmp", grey), "BMP"),
        "tiff": (_pil("TIFF"), "TIFF"), "tiff_lzw": (_pil("TIFF", compression="tiff_lzw"), "TIFF"),
        "tiff_be": (_cv(".tiff", grey), "TIFF"),
        "hdr": (_cv(".hdr", _float_rgb()), "HDR"), "pfm": (_cv(".pfm", _float_rgb()), "PFM"),
        "pfm_grey": (_cv(".pfm", _float_rgb()[..., 0].copy()), "PFM"),
        "ppm": (_pil("PPM"), "PNM"), "pgm": (_cv(".pgm", grey), "PNM"), "pbm": (_pil("PPM", "1"), "PNM"),
        "pam": (_cv(".pam", grey), "PAM"),
        "jp2": (_pil("JPEG2000"), "JPEG2000"), "j2k": (_pil("JPEG2000", no_jp2=True), "JPEG2000"),
        "avif": (_pil("AVIF"), "AVIF"), "ico": (_pil("ICO", sizes=[(W, H)]), "ICO"),
        "sunraster": (_cv(".ras", grey), "SUNRASTER"), "qoi": (_pil("QOI"), "QOI"),
    }


BODIES = _bodies()


@pytest.mark.parametrize("name", sorted(BODIES))
def test_every_format_is_sized_from_its_header(name):
    body, fmt = BODIES[name]
    header = read_header(body)
    want = (W, H) if fmt != "ICO" else Image.open(io.BytesIO(body)).size  # ICO keeps the ratio in 256 px
    assert (header.format, header.width, header.height) == (fmt, *want), header
    assert check_body(body, None, 64_000_000) == header


def test_bits_channels_and_orientation_come_from_the_header():
    assert read_header(BODIES["jpeg"][0])[3:] == (8, 3, 1)
    assert read_header(BODIES["jpeg_grey"][0]).channels == 1
    assert read_header(BODIES["jpeg_cmyk"][0]).channels == 4
    assert read_header(BODIES["png16"][0]).bits == 16
    assert read_header(BODIES["hdr"][0]).bits == read_header(BODIES["pfm"][0]).bits == 32
    buf = io.BytesIO()
    Image.fromarray(np.zeros((H, W), np.float32)).save(buf, "TIFF")
    assert read_header(buf.getvalue()).bits == 32  # SampleFormat 3: a float TIFF
    for orientation in (1, 3, 6, 8):
        assert read_header(exif_jpeg(orientation)).orientation == orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    assert read_header(_pil("PNG", exif=exif)).orientation == 6  # eXIf before IDAT
    assert read_header(_pil("WEBP", exif=exif)).orientation == 0  # unread here: Pillow decides


def test_the_header_fast_path_agrees_with_pillows_answer():
    # Whatever passes on the header alone is what opencv_mishandles (a Pillow open) passes too.
    bodies = [d for _, d, _, _ in web_images()] + [exif_jpeg(o) for o in (1, 6)] + [b for b, _ in BODIES.values()]
    for body in bodies:
        if passes_as_is(read_header(body)):
            assert opencv_mishandles(Image.open(io.BytesIO(body)), body) is None, read_header(body)
    assert passes_as_is(read_header(BODIES["jpeg"][0])) and not passes_as_is(read_header(exif_jpeg(6)))
    assert not passes_as_is(read_header(BODIES["jpeg_cmyk"][0])) and not passes_as_is(read_header(BODIES["png16"][0]))


# --- bombs: real headers declaring 9000 x 9000 -------------------------------------------------

def _patch(body: bytes, at: int, fmt: str, *values) -> bytes:
    out = bytearray(body)
    struct.pack_into(fmt, out, at, *values)
    return bytes(out)


def _tiff_bomb(big: bool) -> bytes:
    if big:  # BigTIFF: 8-byte offsets, 20-byte entries
        head = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16)
        entries = b"".join(struct.pack("<HHQQ", tag, 16, 1, BOMB) for tag in (256, 257))
        return head + struct.pack("<Q", 2) + entries + bytes(8)
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, BOMB) for tag in (256, 257))
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 2) + entries + bytes(4)


def _bombs() -> dict[str, bytes]:
    jpeg = BODIES["jpeg"][0]
    sof = jpeg.index(b"\xff\xc0")
    webp = BODIES["webp"][0]
    j2k = BODIES["j2k"][0]
    avif = BODIES["avif"][0]
    ispe = avif.index(b"ispe")
    ico_png = decompression_bomb(BOMB, BOMB)
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(ico_png), 22) + ico_png
    gif = BODIES["gif"][0]
    frame = gif.index(b"\x2c" + struct.pack("<HHHH", 0, 0, W, H))  # the first image descriptor
    return {
        "png": decompression_bomb(BOMB, BOMB), "jpeg": _patch(jpeg, sof + 5, ">HH", BOMB, BOMB),
        "gif_screen": _patch(gif, 6, "<HH", BOMB, BOMB),
        "gif_frame_over_the_screen": _patch(gif, frame + 5, "<HH", BOMB, BOMB),  # a small screen
        "webp_vp8": _patch(BODIES["webp"][0], 26, "<HH", BOMB, BOMB),
        "webp_vp8l": _patch(BODIES["webp_lossless"][0], 21, "<I", (BOMB - 1) | (BOMB - 1) << 14),
        "webp_vp8x": b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + bytes(4)
        + 2 * (BOMB - 1).to_bytes(3, "little") + webp[12:],  # canvas size - 1, then the image
        "bmp": _patch(BODIES["bmp"][0], 18, "<ii", BOMB, -BOMB),  # top-down: a negative height
        "tiff": _tiff_bomb(False), "bigtiff": _tiff_bomb(True),
        "hdr": b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 9000 +X 9000\n" + bytes(5000),
        "hdr_columns_first": b"#?RGBE\n\n+X 9000 -Y 9000\n" + bytes(100),
        "hdr_long_header": b"#?RADIANCE\n" + b"COMMENT=" + b"x" * 100_000 + b"\n\n-Y 9000 +X 9000\n",
        "pfm": b"PF\n9000 9000\n-1.0\n" + bytes(100), "pnm": b"P6\n# a comment\n9000 9000\n255\n" + bytes(100),
        "pnm_long_comment": b"P5\n#" + b"c" * 5000 + b"\n# another\n 9000\n\t9000 255\n",
        "pam": b"P7\nWIDTH 9000\nHEIGHT 9000\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n",
        "j2k": _patch(j2k, 8, ">IIII", BOMB, BOMB, 0, 0), "avif": _patch(avif, ispe + 8, ">II", BOMB, BOMB),
        "ico_embedded_png": ico, "qoi": _patch(BODIES["qoi"][0], 4, ">II", BOMB, BOMB),
        "sunraster": _patch(BODIES["sunraster"][0], 4, ">II", BOMB, BOMB),
        "psd": b"8BPS\x00\x01" + bytes(6) + struct.pack(">HII", 3, BOMB, BOMB) + bytes(16),
    }


@pytest.mark.parametrize("name", sorted(_bombs()))
def test_bombs_are_refused_by_size_before_any_decode(name, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a decoder was called")

    monkeypatch.setattr(Image, "open", never)
    monkeypatch.setattr(cv2, "imdecode", never)
    body = _bombs()[name]
    assert read_header(body).pixels == BOMB * BOMB, read_header(body)
    with pytest.raises(FetchRejected, match=f"^decompression_bomb: declared {BOMB}x{BOMB} pixels > "
                                            "max_pixels=64000000"):
        check_body(body, "image/x-anything", 64_000_000)


def test_the_old_100k_png_bomb_and_the_limit_edge():
    with pytest.raises(FetchRejected, match="^decompression_bomb: declared 100000x100000"):
        check_body(decompression_bomb(), "image/png", 64_000_000)
    assert check_body(BODIES["hdr"][0], None, W * H).pixels == W * H  # at the limit: passes
    with pytest.raises(FetchRejected, match="^decompression_bomb: .*\\(HDR\\)"):
        check_body(BODIES["hdr"][0], None, W * H - 1)


# --- hostile and truncated headers ------------------------------------------------------------

def test_truncated_bodies_never_crash_the_reader():
    # Every prefix of every body: a header, or Unsized; never an IndexError or struct.error.
    for name, (body, _) in BODIES.items():
        for n in range(min(len(body), 300)):
            try:
                header = read_header(body[:n])
            except Unsized:
                continue
            assert header.width >= 0 and header.height >= 0, (name, n)


def test_random_tails_behind_every_magic_never_crash_the_reader():
    rng = random.Random(0)
    magics = {bytes(b[:12]) for b, _ in BODIES.values()} | {b"#?RADIANCE\n", b"P7\n", b"PF\n", b"\x00\x00\x01\x00"}
    for magic in sorted(magics):
        for _ in range(300):
            body = magic + rng.randbytes(rng.randrange(0, 200))
            with contextlib.suppress(Unsized):
                read_header(body)


def test_a_header_cut_before_its_size_goes_to_the_decoder_which_fails_on_it():
    # The decoder finds no size there either: it reports its decoding error (test_download's
    # truncated JPEG). Nothing it could allocate was declared.
    assert read_header(b"\xff\xd8\xff\xe0garbage").pixels == 0
    check_body(b"\xff\xd8\xff\xe0garbage", "image/jpeg", 100)
    assert read_header(BODIES["png"][0][:20]) == Header("PNG", 0, 0)


def test_jpeg_resync_and_a_frame_header_hidden_from_the_segment_walk():
    jpeg = BODIES["jpeg"][0]
    stray = jpeg[:2] + b"\x00\x13\x37" + jpeg[2:]  # bytes between segments: libjpeg skips to the next marker
    assert read_header(stray)[:3] == ("JPEG", W, H)
    # An APP segment whose length overruns the body hides the SOF from the walk: the fallback
    # still finds the largest SOF-shaped size anywhere in the body.
    hidden = b"\xff\xd8\xff\xe1\xff\xff" + _patch(jpeg, jpeg.index(b"\xff\xc0") + 5, ">HH", BOMB, BOMB)[2:]
    with pytest.raises(FetchRejected, match="^decompression_bomb"):
        check_body(hidden, None, 64_000_000)


def test_hostile_counts_and_offsets_stay_cheap():
    # A TIFF whose IFD claims 65535 entries, an ICO with 65535 entries, ISOBMFF boxes of size 0
    # and 1: each read in bounded time, to a size or to nothing.
    tiff = b"II*\x00" + struct.pack("<IH", 8, 65535) + struct.pack("<HHII", 256, 4, 1, 50) * 3
    assert read_header(tiff).width == 50
    ico = struct.pack("<HHH", 0, 1, 65535) + struct.pack("<BBBBHHII", 32, 32, 0, 0, 1, 32, 10, 0xFFFFFFF0) * 3
    assert read_header(ico)[:3] == ("ICO", 32, 32)
    avif = BODIES["avif"][0]
    assert read_header(avif[:32] + b"\x00\x00\x00\x00meta" + bytes(16)).pixels == 0
    assert read_header(avif[:32] + b"\x00\x00\x00\x01meta" + struct.pack(">Q", 2**62)).pixels == 0


# --- what cannot be sized, or decoded -----------------------------------------------------------

@pytest.mark.parametrize("body, reason", [
    (b"\xff\x0a\xfa\x7f" + bytes(64), "unsized_format"),  # JPEG XL codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(64), "unsized_format"),  # JPEG XL container
    (b"v/1\x01\x02\x00\x00\x00channels\x00" + bytes(64), "unsized_format"),  # OpenEXR
    (b"DDS |\x00\x00\x00" + bytes(120), "unsized_format"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n" + bytes(64), "unsized_format"),  # Pillow would run Ghostscript
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "unsized_format"),  # no decoder has HEVC
    (b"\x00\x01garbage", "unsupported_format"), (bytes(100), "unsupported_format"),
    (b"%PDF-1.7\n" + bytes(64), "unsupported_format"),
    (b"\xef\xbb\xbf  <svg xmlns='http://www.w3.org/2000/svg'/>", "not_an_image"),
    (b'{"error": "not found"}', "not_an_image"),
])
def test_what_the_guard_cannot_size_is_refused_with_a_reason(body, reason):
    with pytest.raises(FetchRejected, match=f"^{reason}: ") as err:
        check_body(body, "image/png", 64_000_000)
    assert reason in BODY_REASONS and normalize_error(str(err.value)) == reason


def test_body_reasons_have_one_owner():
    import inspect

    source = inspect.getsource(fetch_guard) + inspect.getsource(images)
    assert "BODY_REASONS = " not in source  # defined in pipeline.netguard only
    assert len(set(BODY_REASONS)) == len(BODY_REASONS)


# --- OpenCV's own wall ----------------------------------------------------------------------------

def test_opencv_pixel_cap_reaches_the_download_child_and_spark_executors():
    from pipeline.data import download, spark

    policy = FetchPolicy(max_pixels=12_345_678)
    assert decoder_env(policy) == {ENV_OPENCV_MAX_PIXELS: "12345678"}
    assert ENV_OPENCV_MAX_PIXELS == "OPENCV_IO_MAX_IMAGE_PIXELS"  # the name OpenCV reads
    assert download._child_env(policy)[ENV_OPENCV_MAX_PIXELS] == "12345678"
    conf = spark.session_conf("local[2]", policy)
    assert conf[f"spark.executorEnv.{ENV_OPENCV_MAX_PIXELS}"] == "12345678"


# --- HDR and float images -----------------------------------------------------------------------

def sunset(size=(160, 120)) -> np.ndarray:
    """Linear-light RGB of an orange sky brightening to the horizon, with a sun 20x brighter."""
    w, h = size
    y = np.linspace(0.3, 2.3, h, dtype=np.float32)[:, None, None]
    sky = np.float32([1.0, 0.45, 0.12]) * y * np.ones((h, w, 1), np.float32)
    yy, xx = np.mgrid[:h, :w]
    sky[(yy - 0.66 * h) ** 2 + (xx - w / 2) ** 2 < (h / 12) ** 2] = (20.0, 12.0, 5.0)
    return sky


@pytest.mark.parametrize("ext", [".hdr", ".pfm"])
def test_an_orange_sunset_hdr_comes_out_orange_and_bright(ext):
    body = _cv(ext, sunset()[..., ::-1].copy())  # OpenCV writes BGR
    plain = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert plain.dtype == np.float32  # what img2dataset gets: stored as uint8 it is black (max 1)
    out = normalize_for_img2dataset(body, check_body(body, None, 64_000_000))
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (160, 120)
    a = np.asarray(img).astype(int)
    assert a.max() > 200, a.max()
    r, g, b = a.reshape(-1, 3).mean(0)
    assert r > 120 and r > g + 25 > b + 50, (r, g, b)  # orange, not grey and not black
    assert a[-1].mean() > a[0].mean() + 30  # brighter toward the horizon, as in the scene
    assert a[80, 80, 0] == 255  # the sun


def test_a_grey_pfm_keeps_its_orientation():
    grey = np.zeros((40, 30), np.float32)
    grey[:10] = 2.0  # top rows lit (PFM stores rows bottom to top: the decoder flips them)
    grey[10:] = 0.05
    img = np.asarray(Image.open(io.BytesIO(normalize_for_img2dataset(_cv(".pfm", grey), read_header(
        _cv(".pfm", grey))))))
    assert img[:10].min() > 200 and img[10:].max() < 120


@pytest.mark.parametrize("pixels", [np.zeros((8, 8, 3), np.float32), np.full((8, 8, 3), np.nan, np.float32),
                                    np.full((8, 8, 3), -3.0, np.float32)])
def test_an_hdr_with_no_light_is_refused_not_stored_black(pixels):
    with pytest.raises(images.HdrUnreadable, match="^hdr_unreadable: "):
        tone_map(pixels)
    body = _cv(".pfm", pixels)
    with pytest.raises(ValueError, match="^hdr_unreadable: "):
        normalize_for_img2dataset(body, read_header(body))
    assert "hdr_unreadable" in BODY_REASONS


def test_an_undecodable_hdr_is_refused_with_its_reason():
    body = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 4 +X 4\n"  # sized, but no pixel data
    with pytest.raises(ValueError, match="^hdr_unreadable: "):
        normalize_for_img2dataset(body, check_body(body, None, 64_000_000))


def test_an_hdr_without_a_readable_size_is_never_decoded(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(cv2, "imdecode", never)
    for body in (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n", b"#?RADIANCE\n\n-Y many +X more\n", b"PF\n12"):
        header = check_body(body, None, 64_000_000)  # cut short: passes the size check with no size
        with pytest.raises(ValueError, match="^hdr_unreadable: .*without a readable size"):
            normalize_for_img2dataset(body, header)


def test_tone_map_keeps_colour_ratios_and_a_flat_image_is_not_grey():
    flat = np.ones((4, 4, 3), np.float32) * np.float32([0.02, 0.01, 0.005])  # a dim orange, any exposure
    a = np.asarray(tone_map(flat)).astype(int)
    assert a[..., 0].min() > 200 and a[0, 0, 0] > a[0, 0, 1] > a[0, 0, 2]
    assert np.array_equal(np.asarray(tone_map(flat)), np.asarray(tone_map(flat * 1000)))  # exposure-free
