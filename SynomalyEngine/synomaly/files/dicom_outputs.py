"""DICOM outputs of a DICOM input, written with highdicom (not by hand): the anomaly segmentation as a DICOM
Segmentation (SEG), optionally the anomaly map and the counterfactual as Parametric Maps.

Each object is a new series of the input's study, on its Frame of Reference, with frame-by-frame references to
the source instances, so that a viewer (Slicer, OHIF) or an archive places it on the scan. New UIDs every run;
highdicom copies the patient and study attributes and nothing else of the source (no private tags). The
segment "Anomaly" is coded as SNOMED CT "Lesion" under "Morphologically Altered Structure" (the codes the
Slicer module gives its segment), and the algorithm (synomaly, engine version, model and model id) is named.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from synomaly.errors import InputError, OutputError
from synomaly.files.volume_io import library_messages

DICOM_KINDS = ("seg", "map", "counterfactual")
DEFAULT_DICOM_KINDS = ("seg",)
# Series numbers of the new series: far from the scanner's own (1, 2, ...), one per kind.
SERIES_NUMBERS = {"seg": 9901, "map": 9902, "counterfactual": 9903}
_FILE_KEYS = {"seg": "dicom_seg", "map": "dicom_map", "counterfactual": "dicom_counterfactual"}
_FILE_NAMES = {"seg": "anomaly_seg", "map": "anomaly_map", "counterfactual": "counterfactual"}
# An image position may differ this much (mm) from the grid's slice and still be that slice.
POSITION_TOLERANCE_MM = 0.01


def parse_dicom_kinds(text: Optional[str]) -> tuple:
    """``--dicom-outputs seg,map,counterfactual`` (or ``none``) -> the kinds, in a fixed order."""
    if text is None:
        return DEFAULT_DICOM_KINDS
    words = [w.strip().lower() for w in str(text).split(",") if w.strip()]
    if words == ["none"]:
        return ()
    unknown = [w for w in words if w not in DICOM_KINDS]
    if unknown or not words:
        raise InputError(f"--dicom-outputs {text}: give a comma-separated list of {', '.join(DICOM_KINDS)} "
                         "(or none).")
    return tuple(k for k in DICOM_KINDS if k in words)


def dicom_output_paths(out_dir: Path, name: str, kinds: Sequence[str]) -> Dict[str, Path]:
    """The DICOM files of a set, named as its other files (``NAME_anomaly_seg.dcm``), so the report lists them."""
    return {_FILE_KEYS[k]: Path(out_dir) / f"{name}_{_FILE_NAMES[k]}.dcm" for k in kinds}


def series_sources(folder: Path, series_uid: Optional[str] = None) -> List:
    """The headers (no pixel data) of a DICOM series' files, in the order the volume reader stacked them."""
    import pydicom
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    uid = series_uid if series_uid is not None else (uids[0] if len(uids) == 1 else None)
    if uid is None or uid not in uids:
        raise InputError(f"{folder}: the DICOM series to reference was not found.")
    files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def sources_problem(sources: Sequence, shape, geometry) -> Optional[str]:
    """Why DICOM outputs cannot reference the source images: no Frame of Reference (a secondary capture), or the
    volume's slices are not the source instances one by one (a resampled gap); else None."""
    if not getattr(sources[0], "FrameOfReferenceUID", None):
        return "the series has no Frame of Reference UID, which places a DICOM SEG on its images"
    if len(sources) != shape[0]:
        return f"the volume has {shape[0]} slices and the series {len(sources)} images"
    for k, ds in enumerate(sources):
        if (int(ds.Rows), int(ds.Columns)) != tuple(shape[1:]):
            return f"image {k + 1} of the series is {ds.Rows} x {ds.Columns}, the volume {shape[1]} x {shape[2]}"
        position = getattr(ds, "ImagePositionPatient", None)
        expected = np.asarray(geometry.origin) + k * geometry.spacing[2] * geometry.direction_matrix[:, 2]
        if position is None or np.abs(np.asarray(position, dtype=float) - expected).max() > POSITION_TOLERANCE_MM:
            return f"image {k + 1} of the series does not lie where the volume's slice {k + 1} lies"
    return None


def _algorithm(report: dict):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model = report.get("model") or {}
    return hd.AlgorithmIdentificationSequence(
        name="synomaly", family=codes.cid7162.ArtificialIntelligence,
        version=str((report.get("engine") or {}).get("version", "")), source="synomaly",
        parameters={"model": str(model.get("name", "")), "model_id": str(model.get("model_id", "")),
                    "threshold": f"{report.get('threshold', float('nan')):.6g}"})


def _equipment(report: dict) -> dict:
    """The arguments that name the software that made an object (the DICOM Enhanced General Equipment)."""
    model = report.get("model") or {}
    return {"manufacturer": "synomaly", "manufacturer_model_name": f"synomaly {model.get('name', '')}"[:64],
            "software_versions": str((report.get("engine") or {}).get("version", "")),
            "device_serial_number": str(model.get("model_id", ""))[:64] or "unknown"}


def segmentation_dataset(sources: Sequence, segmentation: np.ndarray, report: dict):
    """The anomaly segmentation as a binary DICOM SEG of one segment, empty frames left out."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Anomaly",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(report),
        tracking_uid=hd.UID(), tracking_id="Anomaly",
        display_color=hd.color.CIELabColor(60.0, 60.0, 60.0))
    labels = (np.asarray(segmentation) > 0).astype(np.uint8)
    # A SEG holds at least one frame: a scan without anomaly keeps its (empty) frames, said so here, not by highdicom.
    return hd.seg.Segmentation(
        source_images=list(sources), pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=SERIES_NUMBERS["seg"], sop_instance_uid=hd.UID(),
        instance_number=1, content_label="ANOMALY", content_description="synomaly anomaly segmentation",
        series_description="synomaly anomaly segmentation", omit_empty_frames=bool(labels.any()),
        **_equipment(report))


def parametric_map_dataset(sources: Sequence, values: np.ndarray, report: dict, kind: str):
    """The anomaly map (``map``) or the counterfactual (``counterfactual``) as a float Parametric Map."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if kind == "map":
        label, explanation = "ANOMALY", f"synomaly anomaly score (threshold {report.get('threshold', 0):.4g})"
        description = "synomaly anomaly map"
    else:
        label, explanation = "COUNTERFACTUAL", "synomaly counterfactual healthy image, in the input's units"
        description = "synomaly counterfactual"
    mapping = hd.pm.RealWorldValueMapping(lut_label=label, lut_explanation=explanation, unit=codes.UCUM.NoUnits,
                                          value_range=(low, high), slope=1.0, intercept=0.0)
    # LINEAR_EXACT: a window narrower than 1 (anomaly scores lie within [0, 2]) is only valid so.
    window = hd.VOILUTTransformation(window_center=(low + high) / 2, window_width=max(high - low, 1e-6),
                                     voi_lut_function="LINEAR_EXACT")
    dataset = hd.pm.ParametricMap(
        source_images=list(sources), pixel_array=values, series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS[kind], sop_instance_uid=hd.UID(), instance_number=1,
        contains_recognizable_visual_features=kind == "counterfactual", real_world_value_mappings=[mapping],
        voi_lut_transformations=[window], content_label=label, content_description=description,
        series_description=description, **_equipment(report))
    # Laterality (General Series, type 2C) is required empty, meaning unknown, where no frame states it, as
    # dciodvfy checks; the source's own value is kept where it has one.
    dataset.Laterality = getattr(sources[0], "Laterality", None) or None
    return dataset


def save_dataset(dataset, path: Path) -> None:
    """Write a DICOM file and read it back (its frames all there): a short write is never kept."""
    import pydicom

    path = Path(path)
    try:
        dataset.save_as(str(path), enforce_file_format=True)
        back = pydicom.dcmread(str(path))
        frames = int(getattr(back, "NumberOfFrames", 1) or 1)
        if back.SOPInstanceUID != dataset.SOPInstanceUID or frames != int(getattr(dataset, "NumberOfFrames", 1)):
            raise OSError("the file written reads back differently")
        _ = back.pixel_array
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot be written ({exc}).") from None


def write_dicom_outputs(output_set, paths: Dict[str, Path], sources: Sequence, result) -> None:
    """Stage the DICOM objects named in ``paths`` (see ``dicom_output_paths``) in ``output_set``; what the DICOM
    libraries warn about goes into the report's warnings, not to the terminal."""
    messages: List[str] = []
    with library_messages(messages):
        _write_each(output_set, paths, sources, result)
    result.report.setdefault("warnings", []).extend(f"DICOM outputs: {m}" for m in messages)


def _write_each(output_set, paths: Dict[str, Path], sources: Sequence, result) -> None:
    if "dicom_seg" in paths:
        save_dataset(segmentation_dataset(sources, result.segmentation, result.report),
                     output_set.stage(paths["dicom_seg"]))
    if "dicom_map" in paths:
        save_dataset(parametric_map_dataset(sources, result.anomaly_map, result.report, "map"),
                     output_set.stage(paths["dicom_map"]))
    if "dicom_counterfactual" in paths:
        save_dataset(parametric_map_dataset(sources, result.counterfactual, result.report, "counterfactual"),
                     output_set.stage(paths["dicom_counterfactual"]))
