"""Volume I/O: files to (array, geometry) and back, with the geometry kept exactly.

Arrays are numpy in (z, y, x) order, as SimpleITK and Slicer's ``arrayFromVolume`` give them.
Geometry is kept in ITK's LPS convention; ``ijk_to_ras`` converts for Slicer.

A 2D image (PNG, JPEG, a single-frame DICOM file, any one-slice file) is a volume of one slice:
(1, H, W) with spacing (sx, sy, 1). Grey stored as RGB(A) is converted to grey, for 2D images only; an
alpha channel only when it is opaque everywhere.
PNG files hold 2D images of 8- or 16-bit integers and their pixel spacing, but no origin or direction.
"""
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from synomaly.errors import InputError, OutputError
from synomaly.files.dicom_series import choose_series
from synomaly.files.geometry import Geometry, geometry_problem
from synomaly.files.header_checks import (check_claimed_size, check_nifti_data, header_remarks, nifti_blocks,
                                          nifti_image, nifti_sform)
from synomaly.files.library_messages import last_line, library_messages, report

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg")  # always 2D; single-frame DICOM files are read when named
IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd") + IMAGE_2D_SUFFIXES
MASK_WORDS = ("mask",)
LABEL_WORDS = ("seg", "label", "lesion")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Slice positions of a DICOM series may deviate this much (relative to their spacing) and still count as even.
SLICE_SPACING_TOLERANCE = 0.05
# Luma weights (ITU-R BT.601, as Pillow's "L" mode) for grey stored as RGB.
_LUMA = np.array([0.299, 0.587, 0.114])
# A 2D image counts as colour (a Doppler or annotation overlay, not RGB-encoded grey) when more than this
# fraction of its pixels have channels further apart than COLOUR_SPREAD grey levels of 255.
COLOUR_FRACTION, COLOUR_SPREAD = 0.01, 32.0
PNG_GREY_ALPHA = 4  # the PNG colour type of grey with an alpha channel, which ITK's reader cannot pass on


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def is_2d(shape) -> bool:
    """A volume of one slice along some axis: a 2D image."""
    return len(shape) == 3 and 1 in tuple(shape)


def volume_sample(array: np.ndarray, size: int = 1_000_000) -> np.ndarray:
    """About ``size`` voxels of the volume, evenly spaced in memory order: enough for its levels and
    histogram, and taken from a view (a reoriented volume) without a copy of the whole of it."""
    step = max(1, array.size // size)
    if array.flags.c_contiguous or step == 1:
        return array.ravel()[::step]
    return array[np.unravel_index(np.arange(0, array.size, step), array.shape)]


def background_level(array: np.ndarray) -> float:
    """The volume's background value, robustly: its 1st percentile, not its minimum.

    A skull-stripped or masked volume fills well over 1 % of its voxels with one constant, which this
    returns exactly; one extreme voxel (-1000 in a z-scored volume, -32768 in a raw one) cannot move it.
    """
    sample = volume_sample(array)
    k = int(0.01 * (sample.size - 1))
    low = sample.min()
    if np.count_nonzero(sample == low) > k:  # the constant fills the lowest percent: no partial sort needed
        return float(low)
    return float(np.partition(sample, k)[k])


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


def csv_row_files(csv_path: Path, line: int, row: dict, columns) -> Dict[str, Path]:
    """The files one row of a CSV list names in ``columns`` (empty cells left out), relative paths taken
    from the CSV's folder; a missing file is refused naming the line (training and evaluation lists)."""
    files = {}
    for column in columns:
        if row.get(column):
            p = Path(row[column]).expanduser()
            p = p if p.is_absolute() else csv_path.parent / p
            if not p.exists():
                raise InputError(f"{csv_path}, line {line}: {column} file {p} does not exist.")
            files[column] = p
    return files


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file the usual permissions (mkstemp makes it owner-only), then rename it."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def _discard(tmp) -> None:
    """Remove an unpublished temporary file, also after Ctrl-C (a KeyboardInterrupt is no Exception)."""
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def _slice_positions(reader, image) -> np.ndarray:
    """Position of each slice along the slice normal, in mm, from its Image Position (Patient)."""
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    positions = []
    for i in range(image.GetSize()[2]):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return np.zeros(0)
        try:
            point = [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
        except ValueError:
            return np.zeros(0)
        positions.append(float(np.dot(point, normal)))
    return np.asarray(positions)


def _uneven_slices(positions: np.ndarray, files: List[str]) -> Optional[str]:
    """None for evenly spaced slices, else what is wrong, naming the files on both sides of the gap."""
    if positions.size < 3:
        return None
    steps = np.diff(positions)
    spacing = float(np.median(steps))
    if spacing <= 0 or np.any(steps <= 0):
        i = int(np.argmin(steps))
        return (f"two slices lie at the same position or out of order ({Path(files[i]).name} and "
                f"{Path(files[i + 1]).name}, {positions[i]:.2f} and {positions[i + 1]:.2f} mm)")
    deviation = np.abs(steps - spacing)
    if deviation.max() <= SLICE_SPACING_TOLERANCE * spacing:
        return None
    i = int(np.argmax(deviation))
    missing = int(round(steps[i] / spacing)) - 1
    what = (f"{missing} slice{'s' if missing != 1 else ''} missing" if missing >= 1 and
            abs(steps[i] - (missing + 1) * spacing) <= SLICE_SPACING_TOLERANCE * spacing else "uneven spacing")
    return (f"a gap in the DICOM series ({what}): slice positions jump by {steps[i]:.2f} mm from "
            f"{positions[i]:.2f} to {positions[i + 1]:.2f} mm between {Path(files[i]).name} and "
            f"{Path(files[i + 1]).name}, where the other slices are {spacing:.2f} mm apart")


def _resample_slices(image, positions: np.ndarray):
    """The stack on an even grid at the series' usual spacing, by linear interpolation between slices."""
    import SimpleITK as sitk

    spacing = float(np.median(np.diff(positions)))
    count = int(np.floor((positions[-1] - positions[0]) / spacing + 1e-6)) + 1
    targets = positions[0] + spacing * np.arange(count)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    upper = np.clip(np.searchsorted(positions, targets, side="right"), 1, len(positions) - 1)
    weight = ((targets - positions[upper - 1]) / (positions[upper] - positions[upper - 1])).astype(np.float32)
    weight = weight[:, None, None]
    resampled = (1 - weight) * array[upper - 1] + weight * array[upper]
    out = sitk.GetImageFromArray(resampled)
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    out.SetSpacing(image.GetSpacing()[:2] + (spacing,))
    return out


def _read_series(path: Path, notes: Optional[List[str]], resample_gaps: bool, chosen: Optional[str] = None):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InputError(f"{path}: folder holds no DICOM series; give an image file or a DICOM folder.")
    uid = choose_series(path, list(series), chosen)
    files = list(reader.GetGDCMSeriesFileNames(str(path), uid))
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    if image.GetDimension() != 3:
        return image
    positions = _slice_positions(reader, image)
    problem = _uneven_slices(positions, files)
    if problem is None:
        return image
    if not resample_gaps:
        raise InputError(f"{path}: {problem}. Add the missing files, or pass --resample-slice-gaps to "
                         "interpolate onto an even grid.")
    resampled = _resample_slices(image, positions)
    report(notes, [f"{problem}; resampled by linear interpolation onto an even grid of "
                    f"{resampled.GetSize()[2]} slices, {resampled.GetSpacing()[2]:.2f} mm apart "
                    "(outputs are on that grid)"])
    return resampled


def _png_colour_type(path: Path) -> Optional[int]:
    """The colour type in a PNG file's header (0 grey, 2 RGB, 4 grey + alpha, 6 RGBA); None for other files."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[25]


def _read_sitk(path, notes: Optional[List[str]] = None, resample_gaps: bool = False, series: Optional[str] = None):
    """Read with SimpleITK; what its libraries print becomes our error or a warning in ``notes``."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise InputError(f"{path}: a symbolic link that leads nowhere (its target is missing, or it loops).")
        raise InputError(f"{path}: no such file or folder.")
    messages: List[str] = []
    try:
        with library_messages(messages):
            if not path.is_dir():
                check_claimed_size(path)
            image = _read_series(path, notes, resample_gaps, series) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        if _png_colour_type(path) == PNG_GREY_ALPHA:
            raise InputError(f"{path}: a grey PNG with an alpha channel (transparency), which the image library "
                             "cannot read; export it again without transparency (as grey or RGB).") from None
        raise InputError(f"{path}: cannot be read as an image ({last_line(exc)}).") from None
    # The series check above replaces ITK's own vague "non uniform sampling" warning.
    report(notes, [f"{path.name}: {m}" for m in messages if "Non uniform sampling" not in m])
    return image


def check_opaque(channels: np.ndarray, name: str) -> None:
    """Refuse an alpha channel (the last of C = 2 or 4) that makes any pixel see-through: the grey values stored
    under it are arbitrary (left from editing, or zero) and not what a viewer shows, which blends them with a
    background of its own choice. An alpha opaque everywhere, as many programs write one, changes nothing."""
    alpha = channels[..., -1]
    if np.issubdtype(alpha.dtype, np.integer):
        opaque = np.iinfo(alpha.dtype).max
    else:  # a float alpha runs to 1.0 or to 255
        opaque = 1.0 if alpha.max() <= 1.0 else 255.0
    hidden = int(np.count_nonzero(alpha < opaque))
    if hidden:
        raise InputError(f"{name}: {hidden} of its {alpha.size} pixels are transparent or partly so (an alpha "
                         "channel), so the grey values stored there are not what a viewer shows; export it again "
                         "without transparency (flattened onto its background, as grey or RGB).")


def rgb_to_grey(channels: np.ndarray, name: str) -> Tuple[np.ndarray, float]:
    """Grey levels of an (..., C) array with C = 2 (grey, alpha), 3 (RGB) or 4 (RGBA) channels, in its own
    type (luma, rounded for integers; an opaque alpha dropped, any other refused naming ``name``), and the
    fraction of its pixels that hold colour (channels more than COLOUR_SPREAD of 255 apart): near 0 for grey
    stored as RGB."""
    channels = np.asarray(channels)
    if channels.shape[-1] in (2, 4):
        check_opaque(channels, name)
    if channels.shape[-1] == 2:
        return np.array(channels[..., 0]), 0.0
    rgb = channels[..., :3].astype(np.float64)
    top = float(np.iinfo(channels.dtype).max) if np.issubdtype(channels.dtype, np.integer) else 255.0
    coloured = float(np.mean(rgb.max(axis=-1) - rgb.min(axis=-1) > COLOUR_SPREAD * top / 255.0))
    grey = rgb @ _LUMA
    if np.issubdtype(channels.dtype, np.integer):
        grey = np.clip(np.rint(grey), 0, top)
    return grey.astype(channels.dtype), coloured


def colour_warning(name: str, coloured: float) -> Optional[str]:
    """What to tell the user when an image converted to grey held real colour, else None."""
    if coloured <= COLOUR_FRACTION:
        return None
    return (f"{name}: {coloured:.0%} of its pixels are coloured (an overlay such as Doppler or annotations?); "
            "converted to grey, where coloured marks may look like tissue")


def _grey(image, path, notes: Optional[List[str]]):
    """A one-slice colour image (RGB or RGBA; grey + alpha) as grey (``rgb_to_grey``); volumes of
    several slices keep their components (and are refused)."""
    import SimpleITK as sitk

    components = image.GetNumberOfComponentsPerPixel()
    size = image.GetSize()
    one_slice = image.GetDimension() == 2 or (image.GetDimension() == 3 and size[2] == 1)
    if components == 1 or not one_slice or components not in (2, 3, 4):
        return image
    grey, coloured = rgb_to_grey(sitk.GetArrayViewFromImage(image), str(path))
    warning = colour_warning(Path(path).name, coloured)
    if warning:
        report(notes, [warning])
    out = sitk.GetImageFromArray(grey)
    out.CopyInformation(image)
    return out


def _as_volume(image):
    """A 2D image as a volume of one slice: spacing 1 and origin 0 across it, its direction embedded."""
    import SimpleITK as sitk

    if image.GetDimension() != 2:
        return image
    volume = sitk.JoinSeries(image)
    d = np.asarray(image.GetDirection(), dtype=float).reshape(2, 2)
    direction = np.eye(3)
    direction[:2, :2] = d
    volume.SetSpacing(tuple(image.GetSpacing()) + (1.0,))
    volume.SetOrigin(tuple(image.GetOrigin()) + (0.0,))
    volume.SetDirection(tuple(direction.ravel()))
    return volume


def read_volume(path, notes: Optional[List[str]] = None, resample_gaps: bool = False, series: Optional[str] = None
                ) -> Tuple[np.ndarray, Geometry]:
    """Read a scalar volume (anything SimpleITK reads, or a DICOM series folder), or a 2D image as a
    volume of one slice (see the module's docstring; ``is_2d`` tells them apart).

    Warnings (a library's, a resampled DICOM gap, colour converted to grey) are appended to ``notes``,
    or logged when it is None. A DICOM series with missing or unevenly spaced slices is refused unless
    ``resample_gaps``; NaN or infinite voxels are refused, and so is a truncated NIfTI data block. A folder of
    several series is refused with their list unless ``series`` names one (its Series Instance UID).
    """
    import SimpleITK as sitk

    image = _grey(_read_sitk(path, notes, resample_gaps, series), path, notes)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(vector/RGB image); give a single-channel (scalar) volume.")
    if image.GetDimension() == 4:
        if image.GetSize()[3] != 1:
            raise InputError(f"{path}: is a 4D image with {image.GetSize()[3]} time points/channels; "
                             "extract one 3D volume first.")
        image = image[:, :, :, 0]
    image = _as_volume(image)
    if image.GetDimension() == 3 and sorted(image.GetSize())[1] == 1:
        raise InputError(f"{path}: is a line of {max(image.GetSize())} voxels (size {image.GetSize()}), not an image; "
                         "give a 2D image or a 3D volume.")
    if image.GetDimension() != 3:
        raise InputError(f"{path}: is a {image.GetDimension()}D image; a 2D image or a 3D volume is needed.")
    nifti = nifti_image(Path(path)) if Path(path).name.lower().endswith(NIFTI_SUFFIXES) else None
    if nifti is not None:
        check_nifti_data(Path(path), nifti)
    report(notes, header_remarks(Path(path)) if not Path(path).is_dir() else [])
    geometry = Geometry.from_sitk(image)
    if nifti is not None:
        geometry = nifti_sform(Path(path), geometry, notes, nifti) or geometry
    problem = geometry_problem(tuple(reversed(image.GetSize())), geometry)
    if problem:
        raise InputError(f"{path}: {problem}.")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(f"{path}: contains {bad} NaN or infinite voxels; fix or mask them before detection.")
    return array, geometry


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


def is_2d_format(path) -> bool:
    """Whether the file name asks for a 2D image format (PNG, JPEG)."""
    return Path(path).name.lower().endswith(IMAGE_2D_SUFFIXES)


def _as_2d_image(path: Path, array: np.ndarray, geometry: Geometry):
    """A one-slice volume as the 2D image a PNG or JPEG file holds; refused where the file would lose
    voxels, values or geometry (those formats keep the pixel spacing only)."""
    import SimpleITK as sitk

    if array.ndim != 3 or array.shape[0] != 1:
        raise OutputError(f"{path}: {path.suffix} files hold 2D images, not a volume of size "
                          f"{tuple(reversed(array.shape))}; write NRRD or NIfTI.")
    if array.dtype not in (np.uint8, np.uint16):
        raise OutputError(f"{path}: {path.suffix} files hold 8- or 16-bit integers, not {array.dtype}; "
                          "write NRRD for other values.")
    if not np.allclose(geometry.origin, 0.0) or not np.allclose(geometry.direction_matrix, np.eye(3)):
        raise OutputError(f"{path}: {path.suffix} files keep no origin or direction, and this image has them; "
                          "write NRRD to keep its geometry.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array[0]))
    image.SetSpacing(tuple(geometry.spacing[:2]))
    return image


def write_volume(path, array: np.ndarray, geometry: Geometry, notes: Optional[List[str]] = None) -> None:
    """Write atomically, in the format the file name says; library warnings go to ``notes`` (or the log).
    PNG and JPEG take a one-slice volume of 8- or 16-bit integers without origin or direction.

    What was written is read back and compared (``_check_written``) once the library's copy of the volume is
    gone: one copy of a large volume at a time, besides the caller's array."""
    import SimpleITK as sitk

    path = Path(path)
    if is_2d_format(path):
        image = _as_2d_image(path, array, geometry)
        meant = array[0]
    else:
        meant = np.asarray(array)
        image = sitk.GetImageFromArray(np.ascontiguousarray(meant))
        geometry.apply_to_sitk(image)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    messages: List[str] = []
    held = [image]  # handed to the writer, which lets it go before the file is read back
    del image

    def write_and_read_back(tmp: str) -> None:
        written = held.pop()
        sitk.WriteImage(written, tmp, True)
        del written
        _check_written(Path(tmp), meant, lossy=path.name.lower().endswith((".jpg", ".jpeg")))

    with library_messages(messages):
        _write_atomically(path, suffix, write_and_read_back)
    report(notes, [f"{path.name}: {m}" for m in messages])


SLAB_VOXELS = 1 << 22  # written volumes are compared with what was meant in slabs of about this many voxels


def _slab_rows(meant: np.ndarray) -> int:
    """How many planes along the first axis make a slab of about SLAB_VOXELS."""
    return max(1, SLAB_VOXELS // max(1, int(np.prod(meant.shape[1:], dtype=np.int64))))


def _slabs(meant: np.ndarray):
    """``meant`` in slabs along its first axis, each flattened in C order (the order files store voxels in)."""
    step = _slab_rows(meant)
    for start in range(0, meant.shape[0], step):
        yield np.ascontiguousarray(meant[start:start + step]).reshape(-1)


def _check_written(tmp: Path, meant: np.ndarray, lossy: bool) -> None:
    """Read the file just written back and compare it with what was meant: ITK's writers report no error when
    the disk is full or a file-size limit cuts the file short, and a short file must never be published.
    A NIfTI file's data block is read in pieces (``nifti_blocks``: ITK's NIfTI reader would hold it twice)."""
    import SimpleITK as sitk

    if tmp.name.lower().endswith(NIFTI_SUFFIXES) and not lossy:
        same = _same_nifti_data(tmp, meant)
    else:
        try:
            back = sitk.ReadImage(str(tmp))
        except RuntimeError:
            same = None
        else:
            view = sitk.GetArrayViewFromImage(back)
            same = view.shape == meant.shape and (lossy or all(
                np.array_equal(a, b) for a, b in zip(_slabs(view), _slabs(meant))))
    if same is None:
        raise OSError(f"the file written cannot be read back, {os.path.getsize(tmp)} bytes: the disk may be full "
                      "or a file-size limit reached")
    if not same:
        raise OSError("the file written holds other values than were written: the disk may be full or a "
                      "file-size limit reached")


def _same_nifti_data(tmp: Path, meant: np.ndarray) -> Optional[bool]:
    """Whether a NIfTI file holds ``meant`` (its voxel count and values, in storage order); None where it cannot
    be read."""
    import zlib

    image = nifti_image(tmp)
    if image is None:
        return None
    if int(np.prod(image.dataobj.shape, dtype=np.int64)) != meant.size:
        return False
    step = _slab_rows(meant) * int(np.prod(meant.shape[1:], dtype=np.int64))  # the slabs' sizes, in file order
    try:
        return all(np.array_equal(a, b) for a, b in zip(nifti_blocks(tmp, image, step), _slabs(meant)))
    except (OSError, EOFError, zlib.error):
        return None


def atomic_write_bytes(path, data: bytes) -> None:
    """Write bytes atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    _write_atomically(path, path.suffix, lambda tmp: Path(tmp).write_bytes(data))
