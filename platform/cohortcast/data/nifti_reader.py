"""NIfTI (.nii, .nii.gz) -> Volume via nibabel, with the affine kept (RAS -> LPS).

The header (first 348/540 bytes, decompressed alone for .nii.gz) is parsed and
checked against the ReadLimits before any data is read: a header that declares
8 GiB is refused from the header. The data is then read with a bound: exactly what
the header declares from a .nii, and for a .nii.gz a gzip stream decompressed
chunk by chunk that may not run more than _GZIP_SLACK past what the header declares
(a gzip bomb: small file, huge output). nibabel then parses those bytes in memory.
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from cohortcast.data.errors import (
    CorruptFileError,
    EmptyFileError,
    MissingPathError,
    SliceGeometryError,
    TooLargeError,
    from_os_error,
)
from cohortcast.data.limits import ReadLimits, format_size
from cohortcast.io.volume import RAS_TO_LPS, Volume

_HEADER_BYTES = 540  # NIfTI-2; NIfTI-1 is 348
_CHUNK = 1 << 20
# Trailing bytes tolerated after the declared data of a .nii.gz (some writers pad);
# past this the stream is not the image its header describes.
_GZIP_SLACK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_FORMATS = {348: (nib.Nifti1Image, b"n+1"), 540: (nib.Nifti2Image, b"n+2")}


def is_nifti(path: str | Path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _gunzip(path: Path, cap: int) -> bytes:
    """At most cap + 1 decompressed bytes (one more than allowed tells the caller the
    stream goes on), across concatenated gzip members, never the whole stream."""
    chunks: list[bytes] = []
    total = 0
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as fh:
        pending = b""
        while total <= cap:
            if len(pending) < len(_GZIP_MAGIC):
                more = fh.read(_CHUNK)
                if not more and not pending:
                    break
                pending += more
            if decomp.eof:  # one member done: another may follow (concatenated gzip)
                if not pending.startswith(_GZIP_MAGIC):
                    break  # trailing padding or garbage is ignored, as gzip tools do
                decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
            piece = decomp.decompress(pending, cap + 1 - total)  # max_length >= 1: never unbounded
            chunks.append(piece)
            total += len(piece)
            pending = decomp.unused_data if decomp.eof else decomp.unconsumed_tail
    return b"".join(chunks)


def _read_bytes(path: Path, gz: bool, cap: int) -> bytes:
    try:
        if gz:
            return _gunzip(path, cap)
        with open(path, "rb") as fh:
            return fh.read(cap)
    except OSError as exc:
        raise from_os_error(path, exc) from None
    except zlib.error as exc:
        raise CorruptFileError(path, f"gzip stream is corrupt ({exc})") from None


def _parse_header(head: bytes, path: Path):
    """(image class, header) from the first bytes; CorruptFileError if not NIfTI."""
    if len(head) < 348:
        raise CorruptFileError(path, f"too short for a NIfTI header ({len(head)} bytes)")
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    size = next((s for s in _FORMATS if s in sizes), None)
    if size is None or len(head) < size:
        raise CorruptFileError(path, "not a NIfTI-1 or NIfTI-2 file (sizeof_hdr is neither 348 nor 540)")
    klass, magic = _FORMATS[size]
    try:
        header = klass.header_class(head[:size], check=False)
        found = bytes(header["magic"].item())
    except Exception as exc:  # nibabel raises many types for damaged headers
        raise CorruptFileError(path, f"NIfTI header cannot be parsed ({type(exc).__name__}: {exc})") from None
    if found[:3] != magic:
        raise CorruptFileError(path, f"header magic {found[:3]!r} is not {magic!r} (a single-file NIfTI)")
    return klass, header


def _declared(header, path: Path) -> tuple[tuple[int, ...], int, int]:
    """(shape, bytes per voxel, data offset) as the header declares them."""
    try:
        shape = tuple(int(d) for d in header.get_data_shape())
        itemsize = int(header.get_data_dtype().itemsize)
        offset = int(header.get_data_offset())
    except Exception as exc:
        raise CorruptFileError(path, f"NIfTI header cannot be parsed ({type(exc).__name__}: {exc})") from None
    if not shape or min(shape) < 1:
        raise SliceGeometryError(path, f"image shape {shape} has an empty or negative dimension")
    if offset < 348 or itemsize < 1:
        raise CorruptFileError(path, f"header declares data offset {offset} inside the header")
    return shape, itemsize, offset


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """(x, y, z): trailing singleton dimensions dropped, a 2D image given one slice."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) not in (2, 3):
        raise SliceGeometryError(
            path, f"expected a 2D or 3D image, got shape {shape} (split 4D series into one file per volume)"
        )
    return tuple(dims + [1] * (3 - len(dims)))  # type: ignore[return-value]


def _read_data(path: Path, gz: bool, need: int) -> bytes:
    raw = _read_bytes(path, gz, need + _GZIP_SLACK if gz else need)
    if len(raw) < need:
        raise CorruptFileError(path, f"truncated: holds {len(raw)} of the {need} bytes its header declares")
    if len(raw) > need + _GZIP_SLACK:
        raise TooLargeError(
            path,
            f"gzip stream decompresses to more than the {format_size(need)} its header "
            f"declares (stopped reading at {format_size(len(raw))}): a decompression bomb or "
            "not the image the header describes",
        )
    return raw


def read_nifti(path: str | Path, modality: str = "CT", limits: ReadLimits | None = None) -> Volume:
    """Read a 2D or 3D NIfTI image (a 4D one with a single volume is accepted)."""
    path = Path(path)
    limits = limits or ReadLimits()
    if not path.is_file():
        raise MissingPathError(path, "NIfTI file does not exist")
    gz = str(path).lower().endswith(".gz")
    head = _read_bytes(path, gz, _HEADER_BYTES)
    if not head:
        raise EmptyFileError(path, "is empty (0 bytes)" if path.stat().st_size == 0 else "decompresses to nothing")
    klass, header = _parse_header(head, path)
    shape, itemsize, offset = _declared(header, path)
    voxels = math.prod(shape)
    limits.check(path, voxels, offset + voxels * itemsize, f"header declares shape {shape}:")
    raw = _read_data(path, gz, offset + voxels * itemsize)
    spatial = _spatial_shape(shape, path)
    try:
        img = klass.from_stream(io.BytesIO(raw))
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> Inf, refused by require_finite
            data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(spatial)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CorruptFileError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise SliceGeometryError(path, "affine is singular or not finite")
    # nibabel arrays are indexed (i, j, k); ours are (k, j, i).
    array = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    return Volume(array, RAS_TO_LPS @ affine, modality=modality, metadata={"source": "nifti"})
