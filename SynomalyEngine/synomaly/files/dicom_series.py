"""DICOM folders of several series: each series listed (UID, description, number of images) for a user to
choose one; a folder is never guessed."""
import contextlib
from pathlib import Path
from typing import List, Optional, Tuple

from synomaly.errors import InputError


def list_series(path: Path) -> List[Tuple[str, str, int]]:
    """(UID, description, number of images) of every DICOM series in a folder, for a user to choose one."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    found = []
    for uid in reader.GetGDCMSeriesIDs(str(path)):
        files = reader.GetGDCMSeriesFileNames(str(path), uid)
        header = sitk.ImageFileReader()
        header.SetFileName(files[0])
        description = ""
        with contextlib.suppress(RuntimeError):
            header.ReadImageInformation()
            parts = [header.GetMetaData(tag).strip() for tag in ("0020|0011", "0008|103e")
                     if header.HasMetaDataKey(tag) and header.GetMetaData(tag).strip()]
            description = " ".join(["series " + parts[0]] + parts[1:]) if len(parts) == 2 else " ".join(parts)
        found.append((uid, description, len(files)))
    return found


def choose_series(path: Path, series: List[str], chosen: Optional[str]) -> str:
    """The series to read: the only one, or the one ``--series`` names; several are listed, never guessed."""
    if chosen is not None:
        if chosen not in series:
            raise InputError(f"{path}: holds no DICOM series {chosen}; it holds "
                             + "; ".join(f"{uid} ({what or 'no description'}, {n} images)"
                                         for uid, what, n in list_series(path)) + ".")
        return chosen
    if len(series) > 1:
        listed = "; ".join(f"{uid} ({what or 'no description'}, {n} images)" for uid, what, n in list_series(path))
        raise InputError(f"{path}: folder holds {len(series)} DICOM series; choose one with --series UID: {listed}.")
    return series[0]
