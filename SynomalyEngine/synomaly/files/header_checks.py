"""What a volume file's header claims, checked against the file and the machine before anything is read into
memory, and what NIfTI readers disagree on (sform and qform) settled as the field's tools settle it."""
import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from synomaly.errors import InputError
from synomaly.files.geometry import Geometry
from synomaly.files.library_messages import library_messages, report


def nifti_image(path: Path):
    """A NIfTI file as nibabel (the field's NIfTI library) opens it: its header parsed, its data not read; once
    for the checks below. None for a header nibabel does not know (SimpleITK's reading then stands)."""
    import nibabel

    try:
        with library_messages([]):  # nibabel's header remarks: SimpleITK has read the file already
            return nibabel.load(str(path))
    except Exception:
        return None


def nifti_sform(path: Path, read: Geometry, notes: Optional[List[str]], image=None) -> Optional[Geometry]:
    """The geometry of the sform where a NIfTI header's sform and qform disagree: ITK (and so Slicer) reads the
    qform, nibabel, FSL and most NIfTI tools the sform; outputs written in one and read in the other would not
    overlay the input. The sform is followed, as the NIfTI readers of the field do, and the report says so.
    ``image``: ``nifti_image(path)``, when the caller has it."""
    image = image if image is not None else nifti_image(path)
    if image is None:
        return None
    header = image.header
    try:
        sform, s_code = header.get_sform(coded=True)
        _, q_code = header.get_qform(coded=True)
    except Exception:  # a header nibabel reads but cannot make an sform of: SimpleITK's reading stands
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


BLOCK_BYTES = 1 << 24  # NIfTI data blocks are read in pieces of this size, never whole


def nifti_blocks(path: Path, image, values_per_block: int) -> Iterator[np.ndarray]:
    """The raw data block of a NIfTI file in pieces of ``values_per_block`` values (the last one shorter), in
    its stored type and order (x fastest), without holding it whole. EOFError where it ends early; OSError or
    zlib.error where its compression is damaged."""
    dtype = image.dataobj.dtype
    left = int(np.prod(image.dataobj.shape, dtype=np.int64))
    with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
        f.seek(int(image.dataobj.offset))  # the image's header says 0: nibabel sets the offset anew on saving
        while left:
            n = min(values_per_block, left)
            data = f.read(n * dtype.itemsize)
            if len(data) < n * dtype.itemsize:
                raise EOFError(f"the data block ends {left - len(data) // dtype.itemsize} voxels early")
            left -= n
            yield np.frombuffer(data, dtype)


def _gzip_stored_size(path: Path) -> Optional[int]:
    """The uncompressed size (modulo 2^32) a gzip file's trailer states: its last four bytes."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return struct.unpack("<I", f.read(4))[0]
    except OSError:
        return None


def check_nifti_data(path: Path, image=None) -> None:
    """ITK's NIfTI reader turns NaN and infinite voxels into 0 and fills a truncated data block with 0,
    without a word. The raw block is checked for both, read in pieces (``nifti_blocks``). Integer voxels
    cannot be NaN: their block is whole where the file's size says so (for gzip, the size its trailer
    states, which a cut-off stream does not end with; ITK itself refuses a damaged stream), and then it is
    not decompressed a second time. ``image``: ``nifti_image(path)``, when the caller has it."""
    image = image if image is not None else nifti_image(path)
    if image is None:
        return
    dtype = image.dataobj.dtype
    end = int(image.dataobj.offset) + int(np.prod(image.dataobj.shape, dtype=np.int64)) * dtype.itemsize
    floating = dtype.kind in "fc"
    if not floating:
        gz = path.name.lower().endswith(".gz")
        if (gz and _gzip_stored_size(path) == end % 2 ** 32) or (not gz and path.stat().st_size >= end):
            return
    bad = 0
    try:
        for block in nifti_blocks(path, image, max(1, BLOCK_BYTES // dtype.itemsize)):
            if floating:
                bad += int(block.size - np.count_nonzero(np.isfinite(block)))
    except (OSError, EOFError, zlib.error) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: its data block is truncated or damaged ({detail}); "
                         "copy or export the file again.") from None
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

