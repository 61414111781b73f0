"""Volume I/O: files to (array, geometry) and back, with the geometry kept exactly.

Arrays are numpy in (z, y, x) order, as SimpleITK and Slicer's ``arrayFromVolume`` give them.
Geometry is kept in ITK's LPS convention; ``ijk_to_ras`` converts for Slicer.
"""
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np

from .errors import InputError, OutputError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MASK_WORDS = ("mask",)
LABEL_WORDS = ("seg", "label", "lesion")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def file_role(path: Path) -> str:
    """How a case folder names its files: ``*mask*`` is an organ mask (``brainmask`` too),
    ``*seg*``/``*label*``/``*lesion*`` are lesion labels, anything else is the image."""
    name = path.name.lower()
    if any(w in name for w in MASK_WORDS):
        return "mask"
    if any(w in name for w in LABEL_WORDS):
        return "labels"
    return "image"


def image_stem(path: Path) -> str:
    """The name without its image suffix: ``pat1_flair.nii.gz`` -> ``pat1_flair``."""
    name = path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), None)
    return name[:-len(suffix)] if suffix else path.stem


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file the usual permissions (mkstemp makes it owner-only), then rename it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def last_line(exc: BaseException) -> str:
    """ITK errors span several lines (source file, object address, ...); the last one says what failed."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _discard(tmp) -> None:
    """Remove an unpublished temporary file, also after Ctrl-C (a KeyboardInterrupt is no Exception)."""
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


@dataclass(frozen=True)
class Geometry:
    """Voxel-to-physical mapping of a 3D volume (ITK/LPS convention)."""

    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]  # 3x3 row-major; columns are the i, j, k axis directions

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK-to-RAS matrix, as Slicer's volume nodes use."""
        m = np.eye(4)
        m[:3, :3] = _LPS_TO_RAS @ self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin, dtype=float)
        return m

    @classmethod
    def from_ijk_to_ras(cls, matrix) -> "Geometry":
        m = np.asarray(matrix, dtype=float).reshape(4, 4)
        lps = _LPS_TO_RAS @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        if np.any(spacing <= 0):
            raise InputError("The IJK-to-RAS matrix has a zero-length axis: the volume geometry is invalid.")
        direction = lps / spacing
        origin = _LPS_TO_RAS @ m[:3, 3]
        return cls(tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                   tuple(float(d) for d in direction.ravel()))

    @classmethod
    def from_sitk(cls, image) -> "Geometry":
        return cls(tuple(float(s) for s in image.GetSpacing()), tuple(float(o) for o in image.GetOrigin()),
                   tuple(float(d) for d in image.GetDirection()))

    def apply_to_sitk(self, image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    @classmethod
    def identity(cls, spacing=(1.0, 1.0, 1.0)) -> "Geometry":
        return cls(tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _read_sitk(path):
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder.")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"{path}: folder holds no DICOM series; give an image file or a DICOM folder.")
            if len(series) > 1:
                raise InputError(f"{path}: folder holds {len(series)} DICOM series; put one series per folder.")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot be read as an image ({last_line(exc)}).") from None


def read_volume(path) -> Tuple[np.ndarray, Geometry]:
    """Read a 3D scalar volume (anything SimpleITK reads, or a DICOM series folder)."""
    import SimpleITK as sitk

    image = _read_sitk(path)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(vector/RGB image); give a single-channel (scalar) volume.")
    if image.GetDimension() == 4:
        if image.GetSize()[3] != 1:
            raise InputError(f"{path}: is a 4D image with {image.GetSize()[3]} time points/channels; "
                             "extract one 3D volume first.")
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(f"{path}: is a {image.GetDimension()}D image; a 3D volume is needed.")
    array = sitk.GetArrayFromImage(image)
    return array, Geometry.from_sitk(image)


def _write_atomically(path: Path, suffix: str, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename: never half a file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=str(path.parent))
        os.close(fd)
        write(tmp)
        _publish(tmp, path)
        tmp = None
    except Exception as exc:
        raise OutputError(f"{path}: cannot be written ({last_line(exc)}).") from None
    finally:
        _discard(tmp)


def write_volume(path, array: np.ndarray, geometry: Geometry) -> None:
    """Write atomically, in the format the file name says."""
    import SimpleITK as sitk

    path = Path(path)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to_sitk(image)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    _write_atomically(path, suffix, lambda tmp: sitk.WriteImage(image, tmp, True))


def atomic_write_bytes(path, data: bytes) -> None:
    """Write bytes atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    _write_atomically(path, path.suffix, lambda tmp: Path(tmp).write_bytes(data))
