"""Damaged and hostile image files, written byte by byte (no encoder library involved).

PNG (ISO/IEC 15948, the W3C PNG specification): an 8-byte signature, then chunks of
`length (4, big-endian) | type (4) | data | CRC-32 of type + data (4)`; IHDR holds width, height,
bit depth, colour type (2 = RGB), compression, filter and interlace methods; IDAT the zlib stream of
the filtered scanlines (one filter byte, 0 = none, before each row).
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
  """One PNG chunk; `crc` overrides the correct CRC-32."""
  crc = zlib.crc32(kind + data) if crc is None else crc
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def png(pixels: np.ndarray | None = None, *, width: int | None = None, height: int | None = None,
        idat_crc: int | None = None) -> bytes:
  """An RGB PNG of uint8 `pixels` [H, W, 3]; `width`/`height` override the header's size (the data
  stays that of `pixels`: a header claiming 100000 x 100000 over a few bytes is a decompression
  bomb); `idat_crc` writes a wrong checksum on the image data."""
  if pixels is None:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  h, w = pixels.shape[:2]
  ihdr = struct.pack(">IIBBBBB", width or w, height or h, 8, 2, 0, 0, 0)
  rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
  return (SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows), idat_crc)
          + chunk(b"IEND", b""))


def bad_images() -> dict[str, bytes]:
  """{name: file bytes} of the bad images every image reader must refuse with one line."""
  pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
  good = png(pixels)
  return {
      "bomb": png(pixels, width=100_000, height=100_000),  # 10^10 pixels claimed
      "truncated": good[:len(good) * 2 // 3],  # cut inside IDAT
      "not-an-image": b"this is a text file with a .png name\n",
      "bad-crc": png(pixels, idat_crc=0),  # the data is intact, its checksum is not
  }


def truncated_jpeg() -> bytes:
  """A 48 x 48 baseline JPEG (PIL's encoder) cut inside its entropy-coded data."""
  pixels = np.random.default_rng(2).integers(0, 256, (48, 48, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()[:len(buf.getvalue()) // 2]
