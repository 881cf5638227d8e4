"""Label Studio BitmaskLabels: a mask as a PNG data URL, and back.

What the editor expects (web/libs/editor/src/regions/BitmaskRegion.jsx in Label Studio's source):
it decodes `value.imageDataURL` into an image, sizes its canvas to the PNG's own width and height
and draws it over the image's natural size, so the PNG must be exactly the image's original size.
A pixel belongs to the mask when its alpha is above 0 (the colour shown is the label's, whatever
the PNG's colour); what the editor writes itself, after an edit, is black on transparent RGBA.

We write the smallest PNG with those pixels: 1 bit per pixel, a two-entry palette (both black),
index 0 fully transparent and index 1 opaque (tRNS). Written by hand, since neither cv2 (no tRNS)
nor PIL (an 8-bit copy of the mask first) writes it directly; rows are np.packbits of the mask.
Reading accepts any PNG Label Studio may hand back (ours unchanged, or its RGBA after an edit) but
is bounded first: the data URL's length, then the size declared in the PNG's header against the
region's original size, before a single pixel is decompressed.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
import zlib

import numpy as np

from backend.errors import InvalidRegion

DATA_URL_PREFIX = "data:image/png;base64,"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# deflate level of the mask rows, measured at 5472 x 3648 here: a smooth object 23 KB in 6 ms at
# level 1, 14 KB in 22 ms at 6, 9.6 KB in 47 ms at 9; a ragged mask (random-weight SAM) 0.69 MB in
# 40 ms at 1, 0.51 MB in 230 ms at 6, 0.44 MB in 3.2 s at 9. A click waits for it: level 1. (The
# PNG "Up" filter was no smaller on smooth masks, and only 7-16 % smaller on ragged ones.)
COMPRESS_LEVEL = 1
# the largest image the backend serves by default (MAX_IMAGE_PIXELS): a region claims its own size,
# so this is what one hostile region can make a reader allocate (one byte per pixel, twice)
MAX_MASK_PIXELS = 120_000_000
_SLACK_BYTES = 1 << 20  # chunks besides the pixels (text, colour profile) a real PNG may carry


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def mask_to_png(mask: np.ndarray) -> bytes:
    """A 1-bit palette PNG of a 2-D boolean mask: mask pixels opaque black, the rest transparent."""
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError("mask must be 2-D and not empty")
    height, width = mask.shape
    rows = np.packbits(np.ascontiguousarray(mask, dtype=bool), axis=1)  # MSB first, as PNG packs bits
    scanlines = np.empty((height, rows.shape[1] + 1), np.uint8)
    scanlines[:, 0] = 0  # filter type None: with 1-bit rows, deflate's back-references do the work
    scanlines[:, 1:] = rows
    header = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)  # 1 bit, palette, deflate, no interlace
    return b"".join((
        PNG_SIGNATURE,
        _chunk(b"IHDR", header),
        _chunk(b"PLTE", bytes(6)),  # two palette entries, both black: the label colours the mask
        _chunk(b"tRNS", b"\x00\xff"),  # index 0 transparent, index 1 opaque
        _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), COMPRESS_LEVEL)),
        _chunk(b"IEND", b""),
    ))


def mask_to_data_url(mask: np.ndarray) -> str:
    return DATA_URL_PREFIX + base64.b64encode(mask_to_png(mask)).decode("ascii")


def max_png_bytes(height: int, width: int) -> int:
    """The most a PNG of this size may honestly take: 8-bit RGBA rows stored uncompressed (what a
    canvas's worst case comes to), their filter bytes, deflate's few bytes per block, and slack."""
    raw = height * (4 * width + 1)
    return raw + raw // 16_000 * 5 + _SLACK_BYTES


def png_size(png: bytes) -> tuple[int, int]:
    """(height, width) declared by a PNG's header; InvalidRegion when it is not a PNG."""
    if len(png) < 33 or png[:8] != PNG_SIGNATURE or png[12:16] != b"IHDR" or png[8:12] != b"\x00\x00\x00\x0d":
        raise InvalidRegion("a bitmask region's imageDataURL is not a PNG")
    width, height = struct.unpack(">II", png[16:24])
    return height, width


def data_url_to_mask(data_url: object, height: int, width: int, max_pixels: int = MAX_MASK_PIXELS) -> np.ndarray:
    """The boolean (height, width) mask of a bitmask region's imageDataURL (alpha > 0, as the
    editor reads it). InvalidRegion for anything else: not a PNG data URL, larger than a PNG of
    that size can be, a size other than the image's, or undecodable."""
    if height <= 0 or width <= 0 or height * width > max_pixels:
        raise InvalidRegion(f"a bitmask region claims an image of {width} x {height} pixels; at most "
                            f"{max_pixels} pixels are read")
    if not isinstance(data_url, str) or not data_url.startswith(DATA_URL_PREFIX):
        shown = data_url[:40] if isinstance(data_url, str) else type(data_url).__name__
        raise InvalidRegion(f"a bitmask region's imageDataURL must start with {DATA_URL_PREFIX!r}, not {shown!r}")
    limit = max_png_bytes(height, width)
    encoded = len(data_url) - len(DATA_URL_PREFIX)
    if encoded > (limit + 2) // 3 * 4:  # checked on the text: nothing is decoded yet
        raise InvalidRegion(f"a bitmask region's PNG takes {encoded} base64 characters; one of {width} x {height} "
                            f"pixels takes at most {(limit + 2) // 3 * 4}")
    try:
        png = base64.b64decode(data_url[len(DATA_URL_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRegion(f"a bitmask region's imageDataURL is not valid base64: {exc}") from None
    declared = png_size(png)
    if declared != (height, width):
        raise InvalidRegion(f"a bitmask region's PNG is {declared[1]} x {declared[0]}; the image is {width} x {height} "
                            "(Label Studio draws the PNG over the image's natural size)")
    return _alpha_mask(png, height, width)


def _alpha_mask(png: bytes, height: int, width: int) -> np.ndarray:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # the size was checked against the region and MAX_MASK_PIXELS above: PIL's own bomb
            # warning (at 89 MP) would only be noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
                if image.size != (width, height):  # the header PIL read must be the one checked above
                    raise InvalidRegion(f"a bitmask region's PNG is {image.size[0]} x {image.size[1]}; the image is "
                                        f"{width} x {height}")
                image.load()
                if image.mode == "P":
                    # the palette's alpha per index (tRNS), looked up on the indices: no RGBA copy
                    alpha = np.full(256, 255, np.uint8)
                    transparency = image.info.get("transparency")
                    if isinstance(transparency, bytes):
                        alpha[:len(transparency)] = np.frombuffer(transparency, np.uint8)
                    elif isinstance(transparency, int):
                        alpha[transparency] = 0
                    return alpha[np.asarray(image)] > 0
                if image.mode in ("RGBA", "LA", "PA"):
                    return np.asarray(image.getchannel("A")) > 0
                # greyscale or RGB, perhaps with one transparent colour (tRNS): PIL applies it
                return np.asarray(image.convert("RGBA").getchannel("A")) > 0
    except InvalidRegion:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as exc:
        raise InvalidRegion(f"a bitmask region's PNG cannot be decoded: {exc}") from None
