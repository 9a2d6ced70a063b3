"""Declared image size from header bytes, for every format the fetch guard hands on to a decoder.

A decoder allocates what the header declares before it reads a pixel: a 5 MB Radiance HDR that
declares 9000x9000 costs OpenCV 81 Mpx of float buffers. :func:`read_header` reads the declared
width and height (and what the download side needs to leave a body untouched: bits per sample,
channels, EXIF orientation) straight from the bytes, with no decoder and no Pillow plugin
detection, so the guard can refuse a bomb before any decode and costs a few microseconds per
body. Sized formats:

    JPEG (SOFn), PNG/APNG (IHDR), GIF (screen and first frame), WebP (VP8, VP8L, VP8X), BMP (and
    OS/2 BMP), TIFF and BigTIFF (first IFD), Radiance HDR (``-Y H +X W``), PFM, PNM/PAM (P1-P7),
    JPEG 2000 (JP2 ``ihdr`` and raw J2K ``SIZ``), AVIF (ISOBMFF ``ispe``), ICO/CUR (every entry,
    embedded PNGs included), Sun raster, QOI, Photoshop PSD.

Other bodies raise :class:`Unsized`: ``known`` is True for an image format some decoder of the
chain reads but this module does not size (JPEG XL, DDS, EPS, ...), False for anything else.
A recognised format cut short before its size fields returns a header with ``width`` 0:
the decoder cannot find a size there either and fails on it, with its own error.

    from pipeline.data.image_headers import read_header
    h = read_header(body)          # Header(format="JPEG", width=1024, height=768, bits=8, channels=3, ...)
"""

from __future__ import annotations

import contextlib
import re
import struct
from typing import NamedTuple


class Header(NamedTuple):
    """What a body's header declares. ``width``/``height`` 0: cut short before the size fields.
    ``bits`` per sample (32 for float), ``channels`` (0: not read), ``orientation`` the EXIF
    orientation (1: none; 0: EXIF present but not read here, so ask Pillow)."""

    format: str
    width: int
    height: int
    bits: int = 8
    channels: int = 0
    orientation: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height


class Unsized(ValueError):
    """A body this module cannot size; ``known``: an image format that some decoder reads."""

    def __init__(self, message: str, known: bool):
        super().__init__(message)
        self.known = known


# Image formats Pillow or OpenCV may decode that are not sized here: refused as unsized.
_KNOWN_UNSIZED = ((b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"DDS ", "DDS"),
                  (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x01\xda", "SGI"), (b"SIMPLE  =", "FITS"),
                  (b"BLP1", "BLP"), (b"BLP2", "BLP"), (b"v/1\x01", "OpenEXR"), (b"#define", "XBM"), (b"FTEX", "FTEX"))
_ISOBMFF_AVIF = (b"avif", b"avis")


def read_header(body: bytes) -> Header:
    """The declared size of ``body`` (see the module docstring); raises :class:`Unsized`."""
    head = body[:16]
    for magic, reader in _READERS:
        if head.startswith(magic):
            return reader(body)
    if head[4:8] == b"ftyp":
        return _isobmff(body)
    if head[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7") and len(head) > 2 and head[2:3].isspace():
        return _pnm(body)
    if _hdr_magic(head):
        return _radiance(body)
    for magic, name in _KNOWN_UNSIZED:
        if head.startswith(magic):
            raise Unsized(f"{name} (no size reader for it)", known=True)
    raise Unsized(f"unknown format (first bytes {bytes(head[:8])!r})", known=False)


# --- JPEG -------------------------------------------------------------------------------------

# SOF markers: C0-CF except C4 (DHT), C8 (JPG extension) and CC (DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(body: bytes) -> Header:
    i, n, orientation = 2, len(body), 1
    while i + 4 <= n:
        if body[i] != 0xFF:  # stray bytes between segments: libjpeg skips to the next marker too
            j = body.find(b"\xff", i)
            if j < 0:
                break
            i = j
            continue
        marker = body[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # TEM, RSTn: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            break
        length = int.from_bytes(body[i + 2:i + 4], "big")
        if marker in _SOF:
            if i + 10 > n:
                break
            bits, height, width, channels = struct.unpack_from(">BHHB", body, i + 4)
            return Header("JPEG", width, height, bits, channels, orientation)
        if marker == 0xE1 and body[i + 4:i + 10] == b"Exif\x00\x00":
            orientation = _tiff_orientation(body[i + 10:i + 2 + length])
        if length < 2:
            break
        i += 2 + length
    return _jpeg_fallback(body)


def _jpeg_fallback(body: bytes) -> Header:
    # No frame header on the segment walk (a cut or mangled body). A decoder that resyncs
    # differently could still find one: take the largest SOF-shaped candidate anywhere, so
    # no declared size slips past; none at all means no decoder can size it either.
    width = height = 0
    for m in re.finditer(rb"\xff[\xc0-\xc3\xc5-\xc7\xc9-\xcb\xcd-\xcf]", body):
        if m.start() + 9 <= len(body):
            h, w = struct.unpack_from(">HH", body, m.start() + 5)
            if w * h > width * height:
                width, height = w, h
    return Header("JPEG", width, height)


# --- TIFF (also EXIF) ---------------------------------------------------------------------------

_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8), 1: ("B", 1), 9: ("i", 4)}


def _tiff_ifd(data: bytes, tags: tuple[int, ...]) -> tuple[str, dict[int, int]]:
    """(byte order, {tag: first value}) for ``tags`` in the first IFD of a TIFF structure."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8:
        raise ValueError("not a TIFF structure")
    magic = struct.unpack_from(order + "H", data, 2)[0]
    big = magic == 43  # BigTIFF: 8-byte offsets and counts
    offset = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)[0]
    count_fmt, entry, head = ("Q", 20, 8) if big else ("H", 12, 2)
    count = struct.unpack_from(order + count_fmt, data, offset)[0]
    found: dict[int, int] = {}
    for k in range(min(count, 4096)):  # a hostile count cannot make this loop long
        at = offset + head + k * entry
        if at + entry > len(data):
            break  # the IFD runs past the body: keep what it held
        tag, kind = struct.unpack_from(order + "HH", data, at)
        if tag in tags and kind in _TIFF_TYPES:
            fmt, size = _TIFF_TYPES[kind]
            n = struct.unpack_from(order + ("Q" if big else "I"), data, at + 4)[0]
            value = at + (12 if big else 8)
            if n * size > (8 if big else 4):  # the values live elsewhere (BitsPerSample of RGB)
                value = struct.unpack_from(order + ("Q" if big else "I"), data, value)[0]
            with contextlib.suppress(struct.error):  # a value offset past the body: not read
                found[tag] = struct.unpack_from(order + fmt, data, value)[0]
    return order, found


def _tiff(body: bytes) -> Header:
    try:
        _, tags = _tiff_ifd(body, (256, 257, 258, 277, 339))
    except (struct.error, ValueError):
        return Header("TIFF", 0, 0)
    bits = tags.get(258, 1)
    # SampleFormat 3 is IEEE float: a float TIFF is HDR data.
    return Header("TIFF", tags.get(256, 0), tags.get(257, 0), 32 if tags.get(339) == 3 else bits, tags.get(277, 1))


def _tiff_orientation(exif: bytes) -> int:
    try:
        return _tiff_ifd(exif, (0x0112,))[1].get(0x0112, 1)
    except (struct.error, ValueError):
        return 0  # unreadable here: Pillow decides


# --- PNG, GIF, WebP, BMP, ICO -------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png(body: bytes) -> Header:
    if len(body) < 29 or body[12:16] != b"IHDR":
        return Header("PNG", 0, 0)
    width, height, bits, colour = struct.unpack_from(">IIBB", body, 16)
    orientation, i = 1, 33
    while i + 8 <= len(body):  # an eXIf chunk before the image data carries an orientation
        length, kind = struct.unpack_from(">I4s", body, i)
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"eXIf":
            orientation = _tiff_orientation(body[i + 8:i + 8 + length])
        i += 12 + length
    return Header("PNG", width, height, bits, _PNG_CHANNELS.get(colour, 0), orientation)


def _gif(body: bytes) -> Header:
    if len(body) < 13:
        return Header("GIF", 0, 0)
    width, height, flags = struct.unpack_from("<HHB", body, 6)
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while i < len(body):  # frames may be larger than the screen: some decoders allocate by frame
        if body[i] == 0x21:  # extension: label, then sub-blocks
            i += 2
            while i < len(body) and body[i]:
                i += body[i] + 1
            i += 1
        elif body[i] == 0x2C and i + 9 <= len(body):
            left, top, w, h = struct.unpack_from("<HHHH", body, i + 1)
            width, height = max(width, left + w), max(height, top + h)
            break
        else:
            break
    return Header("GIF", width, height, 8, 1)


def _webp(body: bytes) -> Header:
    if body[8:12] != b"WEBP" or len(body) < 30:
        return Header("WEBP", 0, 0)
    kind = body[12:16]
    if kind == b"VP8 ":
        width, height = struct.unpack_from("<HH", body, 26)
        return Header("WEBP", width & 0x3FFF, height & 0x3FFF, 8, 3)
    if kind == b"VP8L":
        bits = int.from_bytes(body[21:25], "little")
        return Header("WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 8, 4)
    if kind == b"VP8X":
        flags = body[20]
        width = int.from_bytes(body[24:27], "little") + 1
        height = int.from_bytes(body[27:30], "little") + 1
        # EXIF flag: the chunk may sit after the image data; Pillow reads its orientation.
        return Header("WEBP", width, height, 8, 4 if flags & 0x10 else 3, 0 if flags & 0x08 else 1)
    return Header("WEBP", 0, 0)


def _bmp_info(data: bytes, at: int) -> tuple[int, int, int]:
    size = struct.unpack_from("<I", data, at)[0]
    if size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height, _, bits = struct.unpack_from("<HHHH", data, at + 4)
    else:
        width, height, _, bits = struct.unpack_from("<iiHH", data, at + 4)
    return abs(width), abs(height), bits  # a negative height is a top-down bitmap


def _bmp(body: bytes) -> Header:
    try:
        width, height, bits = _bmp_info(body, 14)
    except struct.error:
        return Header("BMP", 0, 0)
    return Header("BMP", width, height, 8, 4 if bits == 32 else 3)


def _ico(body: bytes) -> Header:
    # Decoders pick one entry (Pillow the largest); size them all, embedded PNGs by their IHDR.
    count, width, height = int.from_bytes(body[4:6], "little"), 0, 0
    for k in range(min(count, 256)):
        at = 6 + 16 * k
        if at + 16 > len(body):
            break
        w, h = body[at] or 256, body[at + 1] or 256
        offset = struct.unpack_from("<I", body, at + 12)[0]
        data = body[offset:offset + 64]
        if data.startswith(b"\x89PNG"):
            inner = _png(data)
            w, h = max(w, inner.width), max(h, inner.height)
        elif len(data) >= 16:
            iw, ih, _ = _bmp_info(data, 0)
            w, h = max(w, iw), max(h, ih // 2)  # the height counts the AND mask too
        if w * h > width * height:
            width, height = w, h
    return Header("ICO", width, height)


# --- OpenCV's float and netpbm formats ----------------------------------------------------------

_HDR_RESOLUTION = re.compile(rb"([-+])([XY]) +(\d+) +([-+])([XY]) +(\d+)")


def _hdr_magic(head: bytes) -> bool:
    return head.startswith((b"#?RADIANCE", b"#?RGBE", b"#?AUTOPANO"))


def _radiance(body: bytes) -> Header:
    # Header lines, an empty line, then the resolution line: "-Y 9000 +X 9000" (rows first).
    end = body.find(b"\n\n")  # however long the header: OpenCV's reader reads it all
    if end < 0:
        return Header("HDR", 0, 0, 32, 3)
    line = body[end + 2:end + 2 + 64].split(b"\n", 1)[0]
    match = _HDR_RESOLUTION.match(line.strip())
    if match is None:
        return Header("HDR", 0, 0, 32, 3)
    first, second = int(match.group(3)), int(match.group(6))
    width, height = (second, first) if match.group(2) == b"Y" else (first, second)
    return Header("HDR", width, height, 32, 3)


def _pnm_fields(body: bytes, start: int, count: int) -> list[int]:
    """The first ``count`` integers after ``start``, skipping whitespace and # comments of any
    length (netpbm readers do: a long comment must not hide the size)."""
    fields, i, n = [], start, len(body)
    while len(fields) < count and i < n:
        c = body[i]
        if c == 0x23:  # "#": to the end of the line
            j = body.find(b"\n", i)
            i = n if j < 0 else j + 1
        elif chr(c).isspace():
            i += 1
        else:
            match = _DIGITS.match(body, i)
            if match is None:
                break
            fields.append(int(match.group()))
            i = match.end()
    return fields


_DIGITS = re.compile(rb"\d{1,12}")


def _pnm(body: bytes) -> Header:
    kind = body[1:2]
    if kind == b"7":  # PAM: "WIDTH w" / "HEIGHT h" lines up to ENDHDR
        end = body.find(b"ENDHDR")
        head = body[:end if end >= 0 else len(body)]
        w, h = re.search(rb"(?m)^WIDTH\s+(\d+)", head), re.search(rb"(?m)^HEIGHT\s+(\d+)", head)
        return Header("PAM", int(w.group(1)) if w else 0, int(h.group(1)) if h and w else 0)
    fields = _pnm_fields(body, 2, 2)
    if len(fields) < 2:
        return Header("PNM", 0, 0)
    return Header("PNM", fields[0], fields[1], 8, 1 if kind in b"1254" else 3)


def _pfm(body: bytes) -> Header:
    fields = _pnm_fields(body, 2, 2)
    if len(fields) < 2:
        return Header("PFM", 0, 0, 32, 3)
    return Header("PFM", fields[0], fields[1], 32, 3 if body[1:2] == b"F" else 1)


# --- JPEG 2000, ISOBMFF (AVIF), and the simple ones ---------------------------------------------

def _boxes(data: bytes, start: int, end: int):
    """(type, payload start, payload end) of the ISOBMFF/JP2 boxes in data[start:end]."""
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        head = 8
        if size == 1 and start + 16 <= end:
            size, head = struct.unpack_from(">Q", data, start + 8)[0], 16
        elif size == 0:
            size = end - start
        if size < head:
            return
        yield kind, start + head, min(start + size, end)
        start += size


def _jp2(body: bytes) -> Header:
    for kind, a, b in _boxes(body, 0, len(body)):
        if kind == b"jp2h":
            for inner, c, _ in _boxes(body, a, b):
                if inner == b"ihdr" and c + 10 <= len(body):
                    height, width, channels = struct.unpack_from(">IIH", body, c)
                    return Header("JPEG2000", width, height, body[c + 10] + 1 if c + 10 < len(body) else 8, channels)
    return Header("JPEG2000", 0, 0)


def _j2k(body: bytes) -> Header:
    if len(body) < 24 or body[2:4] != b"\xff\x51":
        return Header("JPEG2000", 0, 0)
    xsiz, ysiz, x0, y0 = struct.unpack_from(">IIII", body, 8)
    return Header("JPEG2000", max(xsiz - x0, 0), max(ysiz - y0, 0))


def _isobmff(body: bytes) -> Header:
    brands = body[8:12] + body[16:min(int.from_bytes(body[:4], "big"), 64)]
    if not any(brands[i:i + 4] in _ISOBMFF_AVIF for i in range(0, len(brands) - 3, 4)):
        raise Unsized(f"ISOBMFF brand {bytes(body[8:12])!r}: only AVIF is decoded", known=brands[:4] in
                      (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"jxl "))
    width = height = 0
    stack = [(0, len(body))]
    while stack:  # ispe boxes in meta/iprp/ipco: the grid's and every item's size
        a, b = stack.pop()
        for kind, c, d in _boxes(body, a, b):
            if kind == b"meta":
                stack.append((c + 4, d))  # a full box: version and flags first
            elif kind in (b"iprp", b"ipco"):
                stack.append((c, d))
            elif kind == b"ispe" and c + 12 <= len(body):
                w, h = struct.unpack_from(">II", body, c + 4)
                if w * h > width * height:
                    width, height = w, h
    return Header("AVIF", width, height)


def _be_pair(fmt: str, at: int, name: str, swap: bool = False):
    def read(body: bytes) -> Header:
        try:
            a, b = struct.unpack_from(fmt, body, at)
        except struct.error:
            return Header(name, 0, 0)
        return Header(name, b, a) if swap else Header(name, a, b)
    return read


# Magic -> reader, by the body's first bytes.
_READERS = (
    (b"\xff\xd8", _jpeg), (b"\x89PNG\r\n\x1a\n", _png), (b"GIF87a", _gif), (b"GIF89a", _gif),
    (b"RIFF", _webp), (b"BM", _bmp), (b"II*\x00", _tiff), (b"MM\x00*", _tiff), (b"II+\x00", _tiff),
    (b"MM\x00+", _tiff), (b"PF", _pfm), (b"Pf", _pfm), (b"\x00\x00\x00\x0cjP  \r\n\x87\n", _jp2),
    (b"\xff\x4f\xff\x51", _j2k), (b"\x00\x00\x01\x00", _ico), (b"\x00\x00\x02\x00", _ico),
    (b"\x59\xa6\x6a\x95", _be_pair(">II", 4, "SUNRASTER")), (b"qoif", _be_pair(">II", 4, "QOI")),
    (b"8BPS", _be_pair(">II", 14, "PSD", swap=True)),
)
