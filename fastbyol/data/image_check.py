"""Cheap validity checks of encoded images, without decoding them.

DALI aborts a whole pipeline on one undecodable file, so its feeder checks every file first;
these checks read only headers and end markers.
"""
from __future__ import annotations

import io
from typing import Optional, Tuple

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame (not DHT, JPG, DAC)


def jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """``(height, width)`` from a JPEG's frame header, walking the marker segments; ``None`` when
    the segment structure is broken before the frame header. ~10x cheaper than PIL's parser."""
    pos, n = 2, len(data)
    while pos + 9 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
        if marker == 0xD9 or marker == 0xDA:  # end of image / scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def check_encoded(data: bytes) -> Optional[Tuple[int, int]]:
    """``(height, width)`` of an encoded image, or ``None`` when it is unreadable.

    Cheap, no decoding: the JPEG frame header or PNG ``IHDR`` (other formats: PIL's header
    parser); JPEGs must end their last scan with an end-of-image marker (a truncated file does
    not: an entropy-coded segment cannot hold ``FF D9``), PNGs must hold their ``IEND`` chunk.
    Grayscale, CMYK, palette and alpha images pass: DALI decodes them to RGB.
    """
    size = None
    if data[:3] == b"\xff\xd8\xff":
        size = jpeg_size(data)
        if data.rfind(b"\xff\xd9", max(0, len(data) - 64)) < 0:  # no end marker at the very end:
            sos = data.rfind(b"\xff\xda")  # then one must close the last scan (trailing junk is fine)
            if sos < 0 or data.rfind(b"\xff\xd9") < sos:
                return None
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if data[12:16] == b"IHDR":
            size = int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
        if data.rfind(b"IEND") < 0:
            return None
    if size is None:
        size = _pil_size(data)
    if size is None or size[0] < 1 or size[1] < 1:
        return None
    return size


def _pil_size(data: bytes) -> Optional[Tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # not an image, unknown format, decompression bomb
        return None
    return height, width
