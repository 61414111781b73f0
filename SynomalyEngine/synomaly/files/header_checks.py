"""What a volume file's header claims, checked against the file and the machine before anything is read into
memory, and what NIfTI readers disagree on (sform and qform) settled as the field's tools settle it."""
import os
import zlib
from pathlib import Path
from typing import List, Optional

import numpy as np

from synomaly.errors import InputError
from synomaly.files.geometry import Geometry
from synomaly.files.library_messages import library_messages, report


def nifti_sform(path: Path, read: Geometry, notes: Optional[List[str]]) -> Optional[Geometry]:
    """The geometry of the sform where a NIfTI header's sform and qform disagree: ITK (and so Slicer) reads the
    qform, nibabel, FSL and most NIfTI tools the sform; outputs written in one and read in the other would not
    overlay the input. The sform is followed, as the NIfTI readers of the field do, and the report says so."""
    import nibabel

    try:
        with library_messages([]):
            header = nibabel.load(str(path)).header
        sform, s_code = header.get_sform(coded=True)
        _, q_code = header.get_qform(coded=True)
    except Exception:  # a header nibabel does not know: SimpleITK's reading stands
        return None
    if not s_code or not q_code or sform is None:
        return None
    lps = np.diag([-1.0, -1.0, 1.0])
    matrix = lps @ np.asarray(sform[:3, :3], dtype=float)
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 0):
        return None
    origin = lps @ np.asarray(sform[:3, 3], dtype=float)
    geometry = Geometry(tuple(float(v) for v in spacing), tuple(float(v) for v in origin),
                        tuple(float(v) for v in (matrix / spacing).ravel()))
    moved = float(np.linalg.norm(origin - np.asarray(read.origin)))
    turned = float(np.abs(geometry.direction_matrix - read.direction_matrix).max())
    if moved <= 0.01 and turned <= 1e-4 and np.allclose(spacing, read.spacing, rtol=1e-4):
        return None
    report(notes, [f"{path.name}: its NIfTI header's sform and qform disagree (origins {moved:.1f} mm apart"
                    f"{', axes turned' if turned > 1e-4 else ''}); read by the sform, as nibabel and FSL do (ITK and "
                    "Slicer read the qform), and the outputs carry it in both"])
    return geometry


# deflate cannot shrink data more than about 1032 times: a .gz file claiming more is cut short or lies.
MAX_DEFLATE_RATIO = 1100


def check_claimed_size(path: Path) -> None:
    """Compare the size a file's header claims with the file and with the machine's memory before anything is
    allocated: a 360-byte NIfTI claiming 2000^3 voxels must not take 16 GB before its truncation is found."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # ReadImage says what is wrong with the file
    voxels = int(np.prod(reader.GetSize(), dtype=np.float64))
    claimed = voxels * reader.GetNumberOfComponents() * _bytes_per_component(reader.GetPixelID())
    on_disk = path.stat().st_size
    name = path.name.lower()
    short = (name.endswith(".nii") and claimed > on_disk) or \
        (name.endswith((".nii.gz", ".gz")) and claimed > on_disk * MAX_DEFLATE_RATIO)
    if short:
        raise InputError(f"{path}: its header claims {reader.GetSize()} voxels ({claimed / 1e6:.0f} MB), far more than "
                         f"the {on_disk} bytes of the file hold: it is truncated or damaged; copy or export it again.")
    memory = _memory_bytes()
    if memory and claimed > memory // 2:
        raise InputError(f"{path}: its header claims {reader.GetSize()} voxels ({claimed / 1e9:.1f} GB), more than "
                         f"half of this machine's memory ({memory / 1e9:.1f} GB); crop or resample it first.")


def _bytes_per_component(pixel_id: int) -> int:
    import SimpleITK as sitk

    sizes = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}
    return sizes.get(pixel_id, 8)


def _memory_bytes() -> int:
    """Physical memory, or 0 where the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_nifti_data(path: Path) -> None:
    """ITK's NIfTI reader turns NaN and infinite voxels into 0 and fills a truncated data block with 0,
    without a word. The raw block, read with nibabel (the field's NIfTI library), is checked for both."""
    import nibabel

    with library_messages([]):  # nibabel's header remarks: SimpleITK has read the file already
        try:
            image = nibabel.load(str(path))
        except Exception:  # a header nibabel does not know: SimpleITK's reading stands
            return
        try:
            raw = np.asanyarray(image.dataobj.get_unscaled())
        except (OSError, EOFError, zlib.error) as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # nibabel's first line says it
            raise InputError(f"{path}: its data block is truncated or damaged ({detail}); "
                             "copy or export the file again.") from None
    if raw.dtype.kind in "fc":
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise InputError(f"{path}: contains {bad} NaN or infinite voxels; fix or mask them before detection.")


# NRRD spaces with a patient orientation; ITK takes any other (scanner-xyz, 3D-right-handed) as LPS.
PATIENT_SPACES = ("left-posterior-superior", "lps", "right-anterior-superior", "ras", "left-anterior-superior",
                  "las")


def header_remarks(path: Path) -> List[str]:
    """What a reader should be told of a header that the reading passes over in silence: an NRRD space without
    a patient orientation (taken as LPS), a NIfTI voxel size of 0 or NaN (taken as 1 mm)."""
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        space = _nrrd_field(path, "space")
        if space is not None and space.strip().lower() not in PATIENT_SPACES:
            return [f"{path.name}: its NRRD space '{space.strip()}' names no patient orientation; it is read as "
                    "left-posterior-superior (LPS), so left and right may be swapped: check the overview"]
    if name.endswith((".nii", ".nii.gz")):
        pixdim = _nifti_pixdim(path)
        if pixdim is not None and (not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0)):
            return [f"{path.name}: its NIfTI header gives no voxel size ({pixdim.tolist()}), read as 1 mm: volumes in "
                    "mL and distances are right only if the voxels are 1 mm"]
    return []


def _nrrd_field(path: Path, field: str) -> Optional[str]:
    """A field of an NRRD header (the text lines before the first blank one)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("latin-1").rstrip("\r\n")
                if not line:
                    return None
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() == field:
                    return value
    except OSError:
        return None
    return None


def _nifti_pixdim(path: Path) -> Optional[np.ndarray]:
    """The voxel size a NIfTI-1 header stores, as stored (nibabel mends a 0 to 1 when it loads, ITK too)."""
    import gzip
    import struct

    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
            header = f.read(348)
    except (OSError, EOFError):
        return None
    if len(header) < 348:
        return None
    for order in "<>":
        if struct.unpack(order + "i", header[:4])[0] == 348:
            return np.asarray(struct.unpack(order + "3f", header[80:92]), dtype=float)
    return None  # NIfTI-2 or not NIfTI: its readers have said what they found

