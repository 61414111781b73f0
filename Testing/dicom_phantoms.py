"""Phantom DICOM series and BIDS datasets written by the tests: real files, as a scanner or a BIDS converter
leaves them, from the generated brain phantom."""
import json
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional

import numpy as np

PRIVATE_CREATOR = "ACME SCANNER"


def write_mr_series(volume: np.ndarray, geometry, folder: Path, series_uid: str, study_uid: str,
                    series_number: int = 3, description: str = "AX FLAIR", frame_uid: Optional[str] = None
                    ) -> Path:
    """``volume`` (z, y, x) as a single-frame MR Image Storage series, one file per slice, with patient and
    study attributes, an institution and a private tag (which no output may carry)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    d = geometry.direction_matrix
    frame_uid = frame_uid or generate_uid()
    pixels = np.clip(np.rint(volume), 0, 32767).astype(np.int16)
    for k in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Brain", "PH0001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study_uid, "1", "20260101", "120000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyDescription = "ACC1", "", "BRAIN"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
        ds.Modality, ds.Manufacturer, ds.InstitutionName = "MR", "ACME", "Phantom Hospital"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.InversionTime = 100, 9000, 1, 2500
        ds.SliceThickness = float(geometry.spacing[2])
        ds.ImageOrientationPatient = [float(v) for v in (*d[:, 0], *d[:, 1])]
        position = np.asarray(geometry.origin) + k * geometry.spacing[2] * d[:, 2]
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.PixelSpacing = [float(geometry.spacing[1]), float(geometry.spacing[0])]
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels[k].tobytes()
        block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
        block.add_new(0x10, "LO", "secret scanner setting")
        ds.save_as(folder / f"IM{series_number:02d}_{k:04d}.dcm", enforce_file_format=True)
    return folder


def phantom_volume(seed: int = 5, lesion: bool = True):
    """The generated brain phantom as (int16 volume, geometry), placed off the origin."""
    from synomaly.evaluation.phantom import make_phantom
    from synomaly.files.geometry import Geometry

    phantom = make_phantom(lesion=lesion, seed=seed)
    geometry = Geometry(phantom.geometry.spacing, (-48.0, -60.5, 12.0), phantom.geometry.direction)
    return np.rint(phantom.volume).astype(np.int16), geometry


def dciodvfy(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)


def dciodvfy_errors(result: subprocess.CompletedProcess) -> list:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def has_dciodvfy() -> bool:
    return shutil.which("dciodvfy") is not None


def write_bids_dataset(root: Path, subjects=("01", "02", "03"), sessions=("01", "02")) -> Dict[str, Path]:
    """A raw BIDS dataset of phantoms: sub-XX/ses-YY/anat/sub-XX_ses-YY_FLAIR.nii.gz with a JSON sidecar,
    and a T1w beside each (not a FLAIR: never an input). Returns the FLAIR images by name."""
    from synomaly.evaluation.phantom import make_phantom
    from synomaly.files.volume_io import write_volume

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "synomaly phantoms", "BIDSVersion": "1.9.0", "DatasetType": "raw"}), encoding="utf-8")
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    images = {}
    for i, subject in enumerate(subjects):
        for j, session in enumerate(sessions):
            anat = root / f"sub-{subject}" / f"ses-{session}" / "anat"
            anat.mkdir(parents=True)
            phantom = make_phantom(lesion=True, seed=10 * i + j)
            stem = f"sub-{subject}_ses-{session}"
            write_volume(anat / f"{stem}_FLAIR.nii.gz", phantom.volume, phantom.geometry)
            (anat / f"{stem}_FLAIR.json").write_text(json.dumps({"RepetitionTime": 9.0}), encoding="utf-8")
            write_volume(anat / f"{stem}_T1w.nii.gz", phantom.volume, phantom.geometry)
            images[stem] = anat / f"{stem}_FLAIR.nii.gz"
    return images
