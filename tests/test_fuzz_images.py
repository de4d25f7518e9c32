"""Image decoding on mutated real JPEG and PNG files, and decompression bombs: a decoded image within the
pixel limit, run through the inference transform, or a one-line ``UserError``.

The files are the example images. JPEG carries no checksum, so a mutated JPEG may decode to other pixels: the
property is that decoding (``preprocess.decode_image``, what ``vitreg_jax.data.loader`` calls) and the
transform either succeed on an image no larger than the limit given or refuse in one line, with no other
exception and no hang. Mutations: bit flips, bytes set, truncation, insertion and deletion anywhere; the width
and height in the header (PNG ``IHDR``, with its CRC fixed so the decoder believes it; JPEG ``SOF``) and PNG's
bit depth and colour type set to hostile values. Tiny PNG and GIF files claiming 20000x20000 and 50000x50000
pixels are refused before any pixel is decoded.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image

from tests.support.fuzz_support import fuzz_settings, load_or_refuse
from vitreg_jax.data.preprocess import MAX_IMAGE_PIXELS, classification_transform, decode_image
from vitreg_jax.data.rgb_stats import RGB_STATS
from vitreg_jax.errors import UserError

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
FILES = ["cat.jpg", "clock_gray.jpg", "coffee_palette.png", "horse_rgba.png"]
ORIGINALS = {name: (IMAGES / name).read_bytes() for name in FILES}
LIMIT = 1 << 20  # max_pixels given to the decoder: about 8 times the largest original
SIZE = (32, 32)


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start of the chunk's length field, end of its CRC) of each PNG chunk."""
    out, at = [], 8
    while at + 8 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        out.append((data[at + 4 : at + 8], at, at + 12 + length))
        at += 12 + length
    return out


def _set_png_field(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``IHDR``'s field at ``offset`` (in its data) set to ``value``, and the chunk's CRC fixed."""
    _, start, end = next(c for c in _png_chunks(data) if c[0] == b"IHDR")
    body = bytearray(data[start + 8 : end - 4])
    size = struct.calcsize(fmt)
    body[offset : offset + size] = struct.pack(fmt, value % (1 << (8 * size)))
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)))
    return data[: start + 8] + bytes(body) + crc + data[end:]


def _set_jpeg_size(data: bytes, height: int, width: int) -> bytes:
    """The first start-of-frame marker's height and width set (JPEG has no checksum to fix)."""
    at = min(i for i in (data.find(m) for m in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2")) if i >= 0)
    return data[: at + 5] + struct.pack(">HH", height % 65536, width % 65536) + data[at + 9 :]


HOSTILE = [0, 1, 2, 7, 255, 256, 1023, 4096, 20000, 50000, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1]
KINDS = ["flip", "byte", "truncate", "insert", "delete", "size", "size", "png_field"]
recipes = st.tuples(
    st.sampled_from(FILES),
    st.sampled_from(KINDS),
    st.integers(0, 1 << 30),
    st.sampled_from(HOSTILE) | st.integers(0, 2**32 - 1),
    st.sampled_from(HOSTILE) | st.integers(0, 2**32 - 1),
    st.binary(min_size=1, max_size=32),
)


def apply(recipe: tuple[str, str, int, int, int, bytes]) -> bytes:
    name, kind, where, a, b, junk = recipe
    data = ORIGINALS[name]
    pos = where % len(data)
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ (1 << a % 8)]) + data[pos + 1 :]
    if kind == "byte":
        return data[:pos] + bytes([a % 256]) + data[pos + 1 :]
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + junk + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + 1 + a % 64 :]
    if name.endswith(".jpg"):  # size and png_field: the frame's height and width
        return _set_jpeg_size(data, a, b)
    if kind == "size":
        return _set_png_field(_set_png_field(data, 0, ">I", a), 4, ">I", b)
    return _set_png_field(
        data, 8 + where % 5, ">B", a
    )  # bit depth, colour type, compression, filter, interlace


@fuzz_settings()
@given(recipe=recipes)
@example(recipe=("coffee_palette.png", "size", 0, 50000, 50000, b"\x00"))  # a bomb: refused at the header
@example(recipe=("cat.jpg", "size", 0, 65535, 65535, b"\x00"))
def test_mutated_images_decode_within_the_limit_or_are_refused(
    recipe: tuple[str, str, int, int, int, bytes],
) -> None:
    mutated = apply(recipe)
    transform = classification_transform(SIZE, RGB_STATS["birder"])

    def load() -> tuple[Image.Image, Any]:
        img = decode_image(mutated, recipe[0], max_pixels=LIMIT)
        return img, transform(img)

    # PIL's pixel buffers are not Python allocations: the decoded image's own size is checked below instead
    got = load_or_refuse(load, len(mutated))
    if got is not None:
        img, x = got
        assert img.width * img.height <= LIMIT
        assert x.shape == (*SIZE, 3) and x.dtype == "float32"


# decompression bombs: tiny files claiming huge images
# --------------------------------------------------------
def tiny_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"\x00" * 4096, 9)  # the start of the first rows of an all-black grey image
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def tiny_gif(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + frame + b";"


@pytest.mark.parametrize("make", [tiny_png, tiny_gif])
@pytest.mark.parametrize("side", [20000, 50000])  # above our limit; also above twice it (PIL's own error)
def test_decompression_bombs_are_refused_before_decoding(make: Any, side: int) -> None:
    data = make(side, side)
    assert len(data) < 200 and side * side > MAX_IMAGE_PIXELS
    assert load_or_refuse(lambda: decode_image(data, "bomb"), len(data)) is None  # one line, fast, small
    with pytest.raises(UserError, match="image too large"):
        decode_image(data, "bomb")
