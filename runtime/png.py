"""A streaming PNG encoder: rows are filtered and compressed as they are produced, so a picture
of a 24 MP map never exists whole, neither as an RGB array nor as an encoded buffer.

Kinds: ``rgb8`` (colour pictures), ``gray16`` (depth in millimetres, label ids beyond 256
classes), ``palette8`` (indexed label maps: one byte per pixel, the colours in PLTE). Every file
is a plain PNG (ISO/IEC 15948) that PIL, OpenCV and ROS image tools read.
"""
from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# kind -> (bit depth, colour type, channels, bytes per sample, PNG filter for every row)
_KINDS = {"rgb8": (8, 2, 3, 1, 1), "gray16": (16, 0, 1, 2, 1), "palette8": (8, 3, 1, 1, 0)}
_IDAT_BYTES = 1 << 16


class PngWriter:
    """``PngWriter(f, width, height, kind, palette=None)``; ``write_rows(rows)`` any number of
    times (rows [n, W, 3] uint8 for rgb8, [n, W] uint16 for gray16, [n, W] uint8 for palette8),
    then ``close()``, which checks that exactly ``height`` rows came."""

    def __init__(self, f: BinaryIO, width: int, height: int, kind: str,
                 palette: np.ndarray | None = None):
        if kind not in _KINDS:
            raise ValueError(f"PNG kind {kind!r} not in {tuple(_KINDS)}")
        if width < 1 or height < 1 or width >= 2**31 or height >= 2**31:
            raise ValueError(f"PNG size {width}x{height} out of range")
        self.f, self.width, self.height, self.kind = f, int(width), int(height), kind
        depth, ctype, self.channels, self.sample_bytes, self.filter = _KINDS[kind]
        self.rows = 0
        self._z = zlib.compressobj(6)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        f.write(_SIGNATURE)
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, depth, ctype, 0, 0, 0))
        if kind == "palette8":
            pal = np.asarray(palette, dtype=np.uint8)
            if pal.ndim != 2 or pal.shape[1] != 3 or not 1 <= pal.shape[0] <= 256:
                raise ValueError(f"a palette8 PNG needs 1..256 RGB colours, got shape {pal.shape}")
            self._chunk(b"PLTE", pal.tobytes())

    def _chunk(self, tag: bytes, data: bytes) -> None:
        self.f.write(struct.pack(">I", len(data)) + tag + data
                     + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    def _emit(self, data: bytes, flush: bool = False) -> None:
        if data:
            self._pending.append(data)
            self._pending_bytes += len(data)
        if self._pending_bytes >= _IDAT_BYTES or (flush and self._pending_bytes):
            self._chunk(b"IDAT", b"".join(self._pending))
            self._pending, self._pending_bytes = [], 0

    def write_rows(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        want = (self.width, self.channels) if self.channels > 1 else (self.width,)
        if rows.shape[1:] != want:
            raise ValueError(f"{self.kind} rows must be [n, {', '.join(map(str, want))}], got "
                             f"{rows.shape}")
        if self.rows + rows.shape[0] > self.height:
            raise ValueError(f"PNG is {self.height} rows high, got row {self.rows + rows.shape[0]}")
        n = rows.shape[0]
        if self.kind == "gray16":
            raw = rows.astype(">u2").view(np.uint8).reshape(n, -1)
        else:
            raw = np.ascontiguousarray(rows, dtype=np.uint8).reshape(n, -1)
        if self.filter == 1:  # Sub: each byte minus the byte one pixel to the left (mod 256)
            bpp = self.channels * self.sample_bytes
            raw = raw.copy()
            raw[:, bpp:] -= np.ascontiguousarray(raw[:, :-bpp])
        out = np.empty((n, raw.shape[1] + 1), dtype=np.uint8)
        out[:, 0] = self.filter
        out[:, 1:] = raw
        self._emit(self._z.compress(out.tobytes()))
        self.rows += n

    def close(self) -> None:
        if self.rows != self.height:
            raise ValueError(f"PNG is {self.height} rows high but {self.rows} rows were written")
        self._emit(self._z.flush(), flush=True)
        self._chunk(b"IEND", b"")


def write_png(f: BinaryIO, image: np.ndarray, kind: str, palette: np.ndarray | None = None,
              band_rows: int = 256) -> None:
    """A whole array through the streaming encoder (small pictures, tests)."""
    h, w = image.shape[:2]
    png = PngWriter(f, w, h, kind, palette)
    for r in range(0, h, band_rows):
        png.write_rows(image[r:r + band_rows])
    png.close()
