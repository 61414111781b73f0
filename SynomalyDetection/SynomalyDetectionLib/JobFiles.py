"""Job volumes as NRRD files, written and read with numpy in Slicer's process.

The engine's own volume I/O goes through SimpleITK, compresses with gzip and redirects file descriptor
2 to catch library messages: right in its worker, wrong on Slicer's GUI thread (seconds of gzip per
volume, and Slicer's own stderr swallowed meanwhile). Job files are temporary, so they are written
uncompressed, here, without touching any file descriptor; results are read back the same way (the
worker's gzip-encoded NRRD included).
"""
import gzip
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

# numpy dtype -> NRRD type name (the NRRD 5 names ITK reads and writes)
NRRD_TYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.uint8): "unsigned char",
    np.dtype(np.int16): "short", np.dtype(np.uint16): "unsigned short",
    np.dtype(np.int32): "int", np.dtype(np.uint32): "unsigned int",
    np.dtype(np.int64): "long long", np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}
_TYPE_ALIASES = {
    "signed char": np.int8, "int8": np.int8, "int8_t": np.int8, "uchar": np.uint8, "unsigned char": np.uint8,
    "uint8": np.uint8, "uint8_t": np.uint8, "short": np.int16, "short int": np.int16, "signed short": np.int16,
    "int16": np.int16, "int16_t": np.int16, "ushort": np.uint16, "unsigned short": np.uint16,
    "unsigned short int": np.uint16, "uint16": np.uint16, "uint16_t": np.uint16, "int": np.int32,
    "signed int": np.int32, "int32": np.int32, "int32_t": np.int32, "uint": np.uint32, "unsigned int": np.uint32,
    "uint32": np.uint32, "uint32_t": np.uint32, "long long": np.int64, "longlong": np.int64, "int64": np.int64,
    "int64_t": np.int64, "unsigned long long": np.uint64, "ulonglong": np.uint64, "uint64": np.uint64,
    "uint64_t": np.uint64, "float": np.float32, "double": np.float64,
}


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def write_nrrd(path, array: np.ndarray, geometry) -> None:
    """A (z, y, x) array with the engine's Geometry (LPS) as an uncompressed NRRD, in one write."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"a job volume is 3D (z, y, x), not of shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype not in NRRD_TYPES:
        array = array.astype(np.float32)
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    axes = [direction[:, axis] * geometry.spacing[axis] for axis in range(3)]
    header = "\n".join([
        "NRRD0004", f"type: {NRRD_TYPES[array.dtype]}", "dimension: 3", "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in reversed(array.shape)),
        "space directions: " + " ".join(_vector(axis) for axis in axes),
        "kinds: domain domain domain", "endian: little", "encoding: raw",
        "space origin: " + _vector(geometry.origin), "", ""])
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(memoryview(data).cast("B"))  # no copy of the voxels


def _read_header(raw: bytes) -> Tuple[Dict[str, str], int]:
    end = raw.find(b"\n\n")
    if not raw.startswith(b"NRRD") or end < 0:
        raise ValueError("not an NRRD file with attached data")
    fields = {}
    for line in raw[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip()
    return fields, end + 2


def read_nrrd_array(path) -> np.ndarray:
    """The (z, y, x) voxels of a 3D NRRD with attached raw or gzip data (what the worker writes)."""
    raw = Path(path).read_bytes()
    fields, start = _read_header(raw)
    if "data file" in fields or "datafile" in fields:
        raise ValueError(f"{path}: detached NRRD data is not supported")
    sizes = [int(n) for n in fields["sizes"].split()]
    dtype = np.dtype(_TYPE_ALIASES[fields["type"].lower()])
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if fields.get("endian", "little") == "big" else "<")
    encoding = fields.get("encoding", "raw").lower()
    body = raw[start:]
    if encoding in ("gzip", "gz"):
        body = gzip.decompress(body)
    elif encoding != "raw":
        raise ValueError(f"{path}: NRRD encoding {encoding!r} is not supported")
    count = int(np.prod(sizes))
    array = np.frombuffer(body, dtype=dtype, count=count, offset=len(body) - count * dtype.itemsize)
    return array.reshape(tuple(reversed(sizes))).astype(dtype.newbyteorder("="), copy=True)
