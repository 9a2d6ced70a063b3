"""Decode any web image to 8-bit RGB the same way everywhere, and hand img2dataset only images it decodes right.

Every place that turns image bytes into pixels (the filter pass, dedup, the training loader,
evaluation references, the model's SR input, the loader benchmark) goes through :func:`to_rgb`,
because PIL's ``convert("RGB")`` gets several real web images wrong:

- 16-bit grey (``I;16``: 16-bit PNG and TIFF) is clipped at 255, so it comes out white; 32-bit
  ``I`` and float ``F`` likewise. Here they are scaled to 8 bits.
- alpha (``RGBA``, ``LA``, ``PA``, palette or colour-key transparency) is dropped, which leaves
  whatever colour the transparent pixels happen to hold, usually black. Here it is composited on
  white, as img2dataset does and as a browser shows the image on a white page.
- CMYK ignores its embedded ICC profile. Here the profile is used when there is one.

EXIF orientation is applied too (see :func:`_upright`). An RGB image without orientation is
returned as it is, still lazy: JPEG draft mode set before the call keeps working.

:func:`normalize_for_img2dataset` is the download side. img2dataset 1.47 decodes with OpenCV's
``imdecode(IMREAD_UNCHANGED)``; measured on the modes of :func:`opencv_mishandles` it stores a
16-bit grey PNG as 16 bits (white once read), mattes 16-bit alpha as if it were 8-bit (garbage),
writes float images black, fails on 32-bit integer ones and ignores EXIF orientation (sideways
photos). Those bodies are decoded here with :func:`to_rgb` and re-encoded as lossless PNG before
img2dataset sees them; everything it decodes right (8-bit RGB, grey, palette, alpha, GIF) passes
through byte for byte, told from the fetch guard's header read (:func:`passes_as_is`) without
opening the body. Radiance HDR and PFM, linear-light float that OpenCV hands img2dataset as is
(stored black), are tone-mapped (:func:`tone_map`) and stored as 8-bit PNG.

    from pipeline.data.images import open_rgb, to_rgb
    rgb = open_rgb(data)               # image bytes -> 8-bit RGB PIL image
    rgb = to_rgb(Image.open(path))     # any PIL image -> 8-bit RGB PIL image
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from pipeline.data.image_headers import Header

# Image members a WebDataset sample may carry (img2dataset's encode formats, plus .jpeg); every
# reader of shards and reference folders picks images by these.
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
WHITE = (255, 255, 255)
EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Formats and modes that img2dataset's OpenCV decode was measured to get right (8-bit only).
_OPENCV_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
_OPENCV_MODES = ("RGB", "L", "1", "P", "RGBA", "LA")
# Float formats OpenCV decodes to linear light, which img2dataset stores black: tone-mapped here.
HDR_FORMATS = ("HDR", "PFM")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> the 8-bit RGB image a browser shows on a white page.

    Deep grey (``I;16*``, ``I``, ``F``) is scaled to 8 bits, never clipped; alpha and palette
    transparency are composited on white; CMYK goes through its embedded ICC profile when it has
    one; EXIF orientation is applied. Raises what PIL raises for a corrupt image.
    """
    img = _upright(img)
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img  # the common case: no copy, no decode forced
    if mode in _DEEP_MODES:
        return _deep_to_rgb(img)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode == "LAB":
        return _icc_to_srgb(img, _lab_profile())
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # convert("RGBA") turns a palette or colour-key transparency into a real alpha channel.
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, WHITE)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # L, 1, P, YCbCr, HSV, RGBX


def open_rgb(data: bytes) -> Image.Image:
    """Image bytes (any format PIL reads) -> 8-bit RGB, via :func:`to_rgb`."""
    return to_rgb(Image.open(io.BytesIO(data)))


def _orientation(img: Image.Image, header_only: bool = False) -> int:
    # header_only: only EXIF that Image.open already parsed (JPEG APP1, WebP, a PNG eXIf before
    # IDAT); PIL's PNG getexif() otherwise decodes the whole image to look for one after IDAT.
    if header_only and "exif" not in img.info:
        return 1
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels are shown as stored
        return 1


def _upright(img: Image.Image) -> Image.Image:
    # Browsers apply EXIF orientation (CSS image-orientation: from-image is the default), so the
    # caption was written for the upright photo; a phone picture stored sideways with
    # orientation 6 would teach the model sideways scenes. The stored shards carry no EXIF
    # (img2dataset re-encodes), so there this is a no-op.
    method = _TRANSPOSE.get(_orientation(img))
    return img if method is None else img.transpose(method)


def _deep_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grey -> 8-bit grey, scaled to the range the data is in."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if img.mode == "F" and lo >= 0 and hi <= 1:
        a8 = a * 255.0  # the float image convention (float TIFF, EXR): 0..1
    elif img.mode == "F" and lo >= 0 and hi <= 255:
        a8 = a  # PIL's own convention for F: 0..255
    elif lo >= 0 and hi <= 65535:
        a8 = a / 257.0  # 16-bit data (I;16, or I holding it): 65535 -> 255, 0x8080 -> 128
    else:  # data beyond 16 bits or negative: stretch what is there
        a8 = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a, np.float64)
    grey = np.rint(np.clip(a8, 0, 255)).astype(np.uint8)
    key = img.info.get("transparency")
    if isinstance(key, int) and img.mode.startswith("I;16"):
        grey[np.asarray(img) == key] = 255  # 16-bit grey PNG colour key: transparent -> white
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    # PIL decodes every CMYK JPEG with the Adobe convention (stored inverted, as Photoshop
    # writes them), like browsers do: the values here are ink amounts, 0 = paper.
    icc = img.info.get("icc_profile")
    if icc:
        from PIL import ImageCms

        try:
            return _icc_to_srgb(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)))
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # a broken profile: fall back to the plain conversion, as browsers do
    return img.convert("RGB")


def _icc_to_srgb(img: Image.Image, profile) -> Image.Image:
    from PIL import ImageCms

    return ImageCms.profileToProfile(img, profile, _srgb_profile(), outputMode="RGB")


@functools.cache
def _srgb_profile():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def _lab_profile():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))


def _png_bit_depth(body: bytes) -> int | None:
    # IHDR is the first chunk: 8-byte signature, length, b"IHDR", width, height, bit depth.
    return body[24] if len(body) > 24 and body[12:16] == b"IHDR" else None


def opencv_mishandles(img: Image.Image, body: bytes) -> str | None:
    """Why img2dataset's OpenCV decode would store ``body`` wrong; None when it gets it right.

    ``img`` is ``Image.open`` of ``body`` (header only). PIL reports a 48/64-bit PNG as plain
    RGB/RGBA, so the bit depth is read from the PNG header itself.
    """
    if img.format not in _OPENCV_FORMATS:
        return f"format {img.format}"  # TIFF, BMP, ICO, ...: rare, and may hold any mode or depth
    if img.mode not in _OPENCV_MODES:
        return f"mode {img.mode}"  # CMYK, I;16, I, F, ...
    if img.format == "PNG" and _png_bit_depth(body) == 16:
        return "16-bit PNG"
    if _orientation(img, header_only=True) != 1:
        return "EXIF orientation"
    return None


def passes_as_is(header: Header) -> bool:
    """True when img2dataset's OpenCV decode gets a body with this header right, so it can pass
    byte for byte with no Pillow open: 8-bit JPEG (grey or colour), PNG up to 8 bits, GIF, WebP,
    none with an EXIF orientation. The same answer :func:`opencv_mishandles` gives, from the
    header alone (orientation 0, EXIF the header reader left unread, is not an answer)."""
    if header.orientation != 1:
        return False
    if header.format == "JPEG":
        return header.bits == 8 and header.channels in (1, 3)
    if header.format == "PNG":
        return header.bits <= 8
    return header.format in ("GIF", "WEBP")


def normalize_for_img2dataset(body: bytes, header: Header | None = None) -> bytes:
    """``body`` unchanged when img2dataset decodes it right, else its :func:`to_rgb` as lossless PNG.

    ``header`` (the fetch guard's :func:`pipeline.data.image_headers.read_header`) settles the
    common case without opening the body. High-dynamic-range bodies (Radiance HDR, PFM), which
    img2dataset would store black, are tone-mapped (:func:`tone_map`). A body PIL cannot open or
    decode is returned unchanged: img2dataset then reports its own decoding error for the row.
    """
    if header is not None and passes_as_is(header):
        return body
    if header is not None and header.format in HDR_FORMATS:
        if not header.pixels:  # no size the guard could check: not decoded here
            raise HdrUnreadable(f"{header.format} header without a readable size")
        return _png_bytes(tone_map(_decode_float(body)))
    try:
        img = Image.open(io.BytesIO(body))
        if opencv_mishandles(img, body) is None:
            return body
        return _png_bytes(to_rgb(img))
    except Exception:  # noqa: BLE001 - corrupt or unsupported: img2dataset's decoder has its say
        return body


def _png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    # compress_level 1: img2dataset decodes this once and re-encodes it; lossless is what counts.
    # No EXIF is carried over: exifread (img2dataset's "exif" column) cannot read it from a PNG.
    img.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _decode_float(body: bytes) -> np.ndarray:
    """An HDR/PFM body -> float32 RGB (H, W, 3), linear light, by OpenCV (Pillow reads neither
    Radiance HDR nor colour PFM). The caller has sized it; OPENCV_IO_MAX_IMAGE_PIXELS is the
    second wall. Raises :class:`HdrUnreadable` when OpenCV cannot decode it."""
    import cv2

    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    try:
        bgr = cv2.imdecode(np.frombuffer(body, np.uint8), flags)
    except cv2.error as err:
        raise HdrUnreadable(f"OpenCV cannot decode it: {str(err).strip()[:200]}") from None
    if bgr is None:
        raise HdrUnreadable("OpenCV cannot decode it")
    bgr = bgr.astype(np.float32, copy=False)
    return np.repeat(bgr[..., None], 3, axis=-1) if bgr.ndim == 2 else bgr[..., 2::-1]


class HdrUnreadable(ValueError):
    """An HDR/float body that cannot be decoded or holds no light; ``str()`` is the fetch
    guard's ``"hdr_unreadable: ..."`` so the row's error counts under that reason."""

    def __init__(self, detail: str):
        super().__init__(f"hdr_unreadable: {detail}")


def tone_map(rgb: np.ndarray, key: float = 0.18) -> Image.Image:
    """Linear-light float RGB -> 8-bit sRGB, by Reinhard et al.'s photographic operator (2002).

    Exposure comes from the image's log-average luminance (eq. 1), scaled to ``key`` (mid grey);
    the extended operator (eq. 4) maps the 99.5th-percentile luminance to white, so the highlights
    of a sunset stay bright and a flat image is not pushed to grey. Colour ratios are kept (each
    channel scaled by the luminance's compression), then the sRGB transfer curve applies. A
    body with no finite positive light raises :class:`HdrUnreadable` rather than storing black.
    """
    rgb = np.nan_to_num(rgb.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    np.maximum(rgb, 0.0, out=rgb)
    lum = rgb @ np.float32([0.2126, 0.7152, 0.0722])  # Rec. 709 / sRGB luminance
    lit = lum[lum > 0]
    if lit.size == 0:
        raise HdrUnreadable("no positive pixel values: it would be stored black")
    log_avg = float(np.exp(np.mean(np.log(lit.astype(np.float64)))))
    scaled = lum * np.float32(key / log_avg)
    white = max(float(np.percentile(scaled[lum > 0], 99.5)), 1e-6)
    mapped = scaled * (1.0 + scaled / np.float32(white * white)) / (1.0 + scaled)
    ratio = np.divide(mapped, lum, out=np.zeros_like(lum), where=lum > 0)
    linear = np.clip(rgb * ratio[..., None], 0.0, 1.0)
    srgb = np.where(linear <= 0.0031308, linear * 12.92, 1.055 * np.power(linear, 1 / 2.4) - 0.055)
    return Image.fromarray(np.rint(srgb * 255.0).astype(np.uint8), "RGB")
