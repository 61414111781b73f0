"""The ``synomaly`` command end to end: real processes, real files, every bad input of the issue.

Each run is a fresh ``python -m synomaly`` process, so start-up, argument parsing, exit codes and
what lands on disk are tested as a user meets them. Inputs are phantoms (and a BraTS case where
the shared data exists); the bundled demo model keeps a run at a few seconds on one core.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly.evaluation.phantom import make_phantom, write_phantom_case

OUTPUT_KINDS = ("anomaly_seg", "anomaly_map", "counterfactual")
REPORT_KEYS = {"anomalous_volume_ml", "n_components", "components", "max_score", "mean_score", "threshold",
               "settings", "model", "timings_s", "map_level"}
HELP_OPTIONS = {
    None: ["detect", "train", "evaluate", "demo", "--version"],
    "detect": ["--output", "--mask", "--model", "--device", "--stages", "--noise-level", "--threshold",
               "--ensemble", "--format", "--overwrite"],
    "train": ["--output", "--preset", "--steps", "--device", "--resume", "--checkpoint-every", "--image-size"],
    "evaluate": ["--output", "--model", "--device", "--stages", "--target-fpr", "--max-slices"],
    "demo": ["--output", "--device", "--overwrite"],
}


def run_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the children must not oversubscribe a shared CPU
    # Python writes UTF-8 in a C locale (PEP 538), so read it as such whatever this process's locale.
    return subprocess.run([sys.executable, "-m", "synomaly", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", cwd=cwd, env=env, timeout=timeout)


def run_detect(*args, **kwargs) -> subprocess.CompletedProcess:
    """``detect`` on phantoms uses the phantom-trained demo model (the default model is for real FLAIR)."""
    return run_cli("detect", *args, "--model", "demo-phantom", **kwargs)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def snapshot(*paths) -> dict:
    """Content hash, size and mtime of every file (of a folder, recursively): to prove nothing changed."""
    files = []
    for p in map(Path, paths):
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return {str(f): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size, f.stat().st_mtime_ns)
            for f in files}


def geometry(image: sitk.Image):
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def check_outputs(out_dir: Path, name: str, reference: sitk.Image, ext: str = ".nii.gz", exact: bool = True,
                  ensemble: bool = False) -> dict:
    """All outputs of one input exist, lie on the input's grid, and the seg and report are well formed."""
    kinds = OUTPUT_KINDS + (("uncertainty",) if ensemble else ())
    images = {kind: sitk.ReadImage(str(out_dir / f"{name}_{kind}{ext}")) for kind in kinds}
    for kind, image in images.items():
        if exact:
            assert geometry(image) == geometry(reference), kind
        else:  # NIfTI keeps geometry in float32
            assert image.GetSize() == reference.GetSize()
            for got, want in zip(geometry(image)[1:], geometry(reference)[1:]):
                np.testing.assert_allclose(got, want, atol=1e-5, err_msg=kind)
    seg = sitk.GetArrayFromImage(images["anomaly_seg"])
    assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= {0, 1}
    assert np.isfinite(sitk.GetArrayFromImage(images["anomaly_map"])).all()
    report = json.loads((out_dir / f"{name}_report.json").read_text(encoding="utf-8"))
    assert REPORT_KEYS <= set(report), REPORT_KEYS - set(report)
    assert report["model"]["model_id"]
    assert report["anomalous_volume_ml"] == pytest.approx(seg.sum() * np.prod(reference.GetSpacing()) / 1000,
                                                          rel=1e-3, abs=1e-3)
    assert (out_dir / f"{name}_overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out_dir.glob(".tmp-*")) and not list(out_dir.glob(".probe-*"))
    return report


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> str:
    """A clean refusal: exit 2, exactly one ``synomaly: error:`` line naming the problem, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("synomaly: error: "), result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    return lines[0]


def write(path: Path, array: np.ndarray, is_vector: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=is_vector), str(path))
    return path


# --- help ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", list(HELP_OPTIONS))
def test_help(command):
    result = ok(run_cli(*([command] if command else []), "--help"))
    for option in HELP_OPTIONS[command]:
        assert option in result.stdout, f"{option} missing from `synomaly {command or ''} --help`"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "synomaly"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (engine not pip-installed here)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "detect" in result.stdout


def test_no_command_is_a_usage_error():
    result = run_cli()
    assert result.returncode == 2 and "usage" in result.stderr.lower()


# --- demo and detection on good inputs --------------------------------------------------------------

def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = ok(run_cli("demo", "-o", out))
    printed = re.search(r"Dice against the known lesion: ([0-9.]+)", result.stdout)
    assert printed, result.stdout
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "phantom_anomaly_seg.nii.gz")))
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "phantom_lesion.nii.gz")))
    measured = dice(seg, lesion)
    assert measured > 0.3
    assert float(printed.group(1)) == pytest.approx(measured, abs=1e-3)
    check_outputs(out, "phantom", sitk.ReadImage(str(out / "phantom_flair.nii.gz")))
    # A second run into the same folder refuses rather than overwriting.
    before = snapshot(out)
    assert_refused(run_cli("demo", "-o", out), "already exists", "--overwrite")
    assert snapshot(out) == before


def test_detect_nifti(phantom_case, tmp_path):
    flair = phantom_case["flair"]
    before = snapshot(flair)
    result = ok(run_detect(flair, "-o", tmp_path / "out"))
    report = check_outputs(tmp_path / "out", "flair", sitk.ReadImage(str(flair)))
    assert snapshot(flair) == before
    assert "mL anomalous" in result.stdout and result.stderr.strip() == ""
    assert report["slices_processed"] > 0 and report["settings"]["ensemble"] == 1
    # The phantom's lesion is found, by a model that has never seen it.
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "flair_anomaly_seg.nii.gz")))
    assert dice(seg, sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_case["seg"])))) > 0.3


@pytest.fixture(scope="module")
def oblique_nrrd(phantom_case, tmp_path_factory):
    """The phantom rotated 20 degrees about z, with anisotropic spacing and an odd origin, as NRRD."""
    image = sitk.ReadImage(str(phantom_case["flair"]))
    theta = np.deg2rad(20.0)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0, 0, 1]])
    image.SetDirection(tuple(rotation.ravel()))
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((10.5, -20.25, 3.1))
    path = tmp_path_factory.mktemp("oblique") / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def test_detect_oblique_anisotropic_nrrd_keeps_geometry_exactly(oblique_nrrd, tmp_path):
    before = snapshot(oblique_nrrd)
    ok(run_detect(oblique_nrrd, "-o", tmp_path, "--stages", "1", "-q"))
    # The default format follows the input's, so its full-precision geometry survives.
    check_outputs(tmp_path, "oblique", sitk.ReadImage(str(oblique_nrrd)), ext=".nrrd")
    assert snapshot(oblique_nrrd) == before


def test_detect_several_inputs_format_nrrd(phantom_case, oblique_nrrd, tmp_path):
    out = tmp_path / "out"
    result = ok(run_detect(phantom_case["flair"], oblique_nrrd, "-o", out, "--format", "nrrd",
                        "--stages", "1"))
    assert result.stdout.count("mL anomalous") == 2
    for name, source in (("flair", phantom_case["flair"]), ("oblique", oblique_nrrd)):
        check_outputs(out, name, sitk.ReadImage(str(source)), ext=".nrrd")
    assert not list(out.glob("*.nii.gz"))


def test_detect_ensemble_writes_uncertainty(oblique_nrrd, tmp_path):
    """Also NRRD in, NIfTI out: the geometry then survives to float32 precision (NIfTI's own)."""
    ok(run_detect(oblique_nrrd, "-o", tmp_path, "--ensemble", "2", "--stages", "1", "--format", "nii.gz",
               "-q"))
    report = check_outputs(tmp_path, "oblique", sitk.ReadImage(str(oblique_nrrd)), exact=False, ensemble=True)
    assert report["settings"]["ensemble"] == 2
    uncertainty = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "oblique_uncertainty.nii.gz")))
    assert uncertainty.min() >= 0 and uncertainty.max() > 0


def test_detect_with_mask(phantom_case, tmp_path):
    ok(run_detect(phantom_case["flair"], "--mask", phantom_case["brainmask"], "-o", tmp_path,
               "--stages", "1", "--format", "mha", "-q"))
    check_outputs(tmp_path, "flair", sitk.ReadImage(str(phantom_case["flair"])), ext=".mha")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_case["brainmask"]))) > 0
    for kind in ("anomaly_seg", "anomaly_map"):
        values = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"flair_{kind}.mha")))
        assert not values[~mask].any(), f"{kind} is non-zero outside the mask"


def write_dicom_series(phantom_flair: Path, folder: Path, jitter_mm: float = 0.0) -> Path:
    """16 slices of the phantom as a DICOM series written slice by slice, with the tags a reader needs
    to stack it: ``slice000.dcm`` ... ``slice015.dcm``, 2 mm apart (every other one ``jitter_mm`` off)."""
    volume = sitk.Cast(sitk.ReadImage(str(phantom_flair)), sitk.sitkInt16)[:, :, 8:24]
    volume.SetOrigin((-40.0, -35.5, 12.0))
    folder.mkdir()
    d = volume.GetDirection()
    shared = {"0008|0060": "MR", "0008|0008": "DERIVED\\SECONDARY",
              "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
              "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(volume.GetDepth()):
        plane = volume[:, :, i]
        for tag, value in shared.items():
            plane.SetMetaData(tag, value)
        position = np.add(volume.TransformIndexToPhysicalPoint((0, 0, i)), (0.0, 0.0, jitter_mm * (i % 2)))
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in position))
        plane.SetMetaData("0020|0013", str(i + 1))
        writer.SetFileName(str(folder / f"slice{i:03d}.dcm"))
        writer.Execute(plane)
    return folder


def test_detect_dicom_series_folder(phantom_case, tmp_path):
    folder = write_dicom_series(phantom_case["flair"], tmp_path / "series")
    reference = read_dicom_series(folder)
    assert reference.GetSize() == (96, 96, 16) and reference.GetSpacing() == pytest.approx((1.0, 1.0, 2.0))
    before = snapshot(folder)
    ok(run_detect(folder, "-o", tmp_path / "out", "--stages", "1", "-q"))
    check_outputs(tmp_path / "out", "series", reference, ext=".nrrd")
    assert snapshot(folder) == before


def test_detect_small_volume_is_resampled(tmp_path):
    """20 x 20 x 3 voxels: smaller than the network's slices, which are resampled up to it."""
    volume = make_phantom(shape=(8, 64, 64), seed=4, lesion=False).volume[3:6, 2::3, 2::3][:, :20, :20]
    source = write(tmp_path / "small.nii.gz", np.ascontiguousarray(volume))
    ok(run_detect(source, "-o", tmp_path / "out", "--stages", "1", "-q"))
    check_outputs(tmp_path / "out", "small", sitk.ReadImage(str(source)))


def test_detect_large_volume_memory_is_bounded(tmp_path):
    """512 x 512 x 40 voxels (4x a BraTS slice area) goes through in batches, well under a few GB."""
    from scipy import ndimage

    phantom = make_phantom(shape=(20, 64, 64), seed=7, lesion=True)
    large = ndimage.zoom(phantom.volume, (2, 8, 8), order=1).astype(np.int16)
    assert large.shape == (40, 512, 512)
    image = sitk.GetImageFromArray(large)
    image.SetSpacing((0.45, 0.45, 3.0))
    source = tmp_path / "large.nii.gz"
    sitk.WriteImage(image, str(source))
    # A wrapper process reports the peak RSS of exactly the one CLI child it waited for.
    wrapper = ("import resource, subprocess, sys\n"
               "rc = subprocess.call([sys.executable, '-m', 'synomaly'] + sys.argv[1:])\n"
               "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "sys.exit(rc)\n")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    result = ok(subprocess.run([sys.executable, "-c", wrapper, "detect", str(source), "-o", str(tmp_path / "out"),
                                "--stages", "1", "-q"], capture_output=True, text=True, env=env, timeout=300))
    peak_gb = int(re.search(r"peak_rss_kb (\d+)", result.stdout).group(1)) / 1024 ** 2
    assert peak_gb < 3.0, f"peak RSS {peak_gb:.2f} GB"
    check_outputs(tmp_path / "out", "large", sitk.ReadImage(str(source)))


def test_detect_real_brats_case(shared_data, tmp_path):
    flair = shared_data / "brats2015" / "pat0001" / "flair.nii.gz"
    if not flair.exists():
        pytest.skip(f"BraTS case not found at {flair}; CI provides it")
    before = snapshot(flair)
    ok(run_cli("detect", flair, "-o", tmp_path, "--stages", "1", "-q"))
    report = check_outputs(tmp_path, "flair", sitk.ReadImage(str(flair)))
    assert report["slices_processed"] > 50
    assert snapshot(flair) == before


# --- bad input: one clear line, exit 2, nothing changed ---------------------------------------------

@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """name -> (path, words the error must contain). NaN/Inf go in NRRD: ITK's NIfTI reader zeroes them."""
    folder = tmp_path_factory.mktemp("bad")
    p = make_phantom(shape=(16, 64, 64), seed=1)
    v = p.volume
    cases = {
        "2d": (write(folder / "slice2d.nii.gz", v[8]), ["2D", "3D"]),
        "4d": (write(folder / "series4d.nii.gz", np.stack([v, v])), ["4D", "2 "]),
        "rgb": (write(folder / "rgb.nii.gz", np.stack([v, v, v], -1).astype(np.uint8), True), ["RGB", "scalar"]),
        "constant": (write(folder / "constant.nii.gz", np.full_like(v, 7.0)), ["constant"]),
        "label_map": (write(folder / "labels.nii.gz", (p.brain_mask + p.lesion_mask).astype(np.uint8)),
                      ["label map", "--mask"]),
        "too_small": (write(folder / "tiny.nii.gz", np.ascontiguousarray(v[7:9, 4::8, 4::8])), ["too small"]),
    }
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        a = v.astype(np.float32)
        a[5, 30, 30] = value
        cases[name] = (write(folder / f"{name}.nrrd", a), ["NaN or infinite"])
        # ITK's NIfTI reader reads them as 0: only the raw data block shows them.
        cases[f"{name}_nifti"] = (write(folder / f"{name}.nii.gz", a), ["1 NaN or infinite"])
    # ITK fills a truncated NIfTI data block with zeros, silently.
    full = write(folder / "full.nii", v.astype(np.float32)).read_bytes()
    truncated = folder / "truncated.nii"
    truncated.write_bytes(full[: len(full) // 2])
    (folder / "full.nii").unlink()
    cases["truncated_nifti"] = (truncated, ["truncated"])
    # SimpleITK will not write a 0-size image, but MetaImage can describe one.
    empty = folder / "empty.mha"
    empty.write_text("ObjectType = Image\nNDims = 3\nDimSize = 64 64 0\nElementType = MET_FLOAT\n"
                     "ElementDataFile = LOCAL\n")
    cases["empty"] = (empty, ["empty"])
    zero_bytes = folder / "zero.nii.gz"
    zero_bytes.write_bytes(b"")
    cases["zero_bytes"] = (zero_bytes, ["cannot be read"])
    cases["missing"] = (folder / "missing.nii.gz", ["no such file"])
    return cases


@pytest.mark.parametrize("name", ["2d", "4d", "rgb", "empty", "zero_bytes", "missing", "constant", "nan", "inf",
                                  "nan_nifti", "inf_nifti", "truncated_nifti", "too_small", "label_map"])
def test_bad_input_is_refused_and_changes_nothing(bad_inputs, tmp_path, name):
    path, words = bad_inputs[name]
    before = snapshot(path) if path.exists() else None
    out = tmp_path / "out"
    line = assert_refused(run_detect(path, "-o", out), *words)
    assert path.name in line, "the error names the file"
    assert not out.exists(), "a refused run leaves no output folder"
    if before is not None:
        assert snapshot(path) == before


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("models")
    corrupt = folder / "corrupt.safetensors"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    foreign = folder / "foreign.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(foreign))
    return {"missing": (folder / "missing.safetensors", ["does not exist"]),
            "corrupt": (corrupt, ["not a readable model file"]),
            "foreign": (foreign, ["not a Synomaly model"]),
            "unknown_name": ("no-such-model", ["no-such-model", "demo-phantom"])}


@pytest.mark.parametrize("kind", ["missing", "corrupt", "foreign", "unknown_name"])
def test_bad_model_is_refused(bad_models, phantom_case, tmp_path, kind):
    model, words = bad_models[kind]
    before = snapshot(model) if isinstance(model, Path) and model.exists() else None
    assert_refused(run_cli("detect", phantom_case["flair"], "--model", model, "-o", tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()
    if before is not None:
        assert snapshot(model) == before


def test_cuda_without_cuda_is_refused(phantom_case, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_refused(run_detect(phantom_case["flair"], "--device", "cuda", "-o", tmp_path / "out"),
                   "CUDA", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_mps_without_mps_is_refused_by_detect_and_train(phantom_case, tmp_path):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("Apple's mps is available here")
    words = ("mps", "not available", "--device cpu or auto")
    assert_refused(run_detect(phantom_case["flair"], "--device", "mps", "-o", tmp_path / "out"), *words)
    model = tmp_path / "models" / "m.safetensors"
    assert_refused(run_cli("train", phantom_case["flair"].parent.parent, "-o", model, "--device", "mps",
                           *TRAIN_ARGS), *words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()


def test_unwritable_output_folder_is_refused(phantom_case, tmp_path):
    """Tests run as root, whom chmod does not stop: a folder below a regular file cannot exist for anyone."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker / "out", blocker):
        assert_refused(run_detect(phantom_case["flair"], "-o", out), str(blocker), "-o")
    assert blocker.read_text(encoding="utf-8") == "not a folder"


def test_mask_of_wrong_size_is_refused(phantom_case, tmp_path):
    mask = write(tmp_path / "mask.nii.gz", np.ones((10, 10, 10), np.uint8))
    line = assert_refused(run_detect(phantom_case["flair"], "--mask", mask, "-o", tmp_path / "out"),
                          "mask.nii.gz", "(10, 10, 10)", "(96, 96, 32)")
    assert "resample" in line
    assert not (tmp_path / "out").exists()


def test_existing_outputs_need_overwrite(phantom_case, tmp_path):
    """An earlier run's outputs (ours: files of another name are never replaced, see test_reliability)."""
    out = tmp_path / "out"
    ok(run_detect(phantom_case["flair"], "-o", out, "--stages", "1", "-q", "--seed", "1"))
    before = snapshot(out)
    assert_refused(run_detect(phantom_case["flair"], "-o", out), "already exists", "--overwrite")
    assert snapshot(out) == before
    ok(run_detect(phantom_case["flair"], "-o", out, "--overwrite", "--stages", "1", "-q"))
    check_outputs(out, "flair", sitk.ReadImage(str(phantom_case["flair"])))


def test_failed_input_leaves_no_temporary_files(phantom_case, bad_inputs, tmp_path):
    """The good input's outputs are complete, the bad one's are absent, and no temporary file remains."""
    out = tmp_path / "out"
    constant = bad_inputs["constant"][0]
    result = run_detect(phantom_case["flair"], constant, "-o", out, "--stages", "1")
    assert_refused(result, "constant.nii.gz", "constant")
    assert "flair" in result.stdout
    check_outputs(out, "flair", sitk.ReadImage(str(phantom_case["flair"])))
    assert not list(out.glob("constant_*"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_failed_write_is_atomic(phantom_case, tmp_path):
    """An output that cannot be replaced (a folder is in its way) fails cleanly: no half or temporary file."""
    out = tmp_path / "out"
    (out / "flair_anomaly_map.nii.gz").mkdir(parents=True)
    assert_refused(run_detect(phantom_case["flair"], "-o", out, "--overwrite", "--stages", "1"),
                   "flair_anomaly_map.nii.gz", "cannot be written")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert (out / "flair_anomaly_map.nii.gz").is_dir()


def test_dicom_series_with_a_missing_slice_is_refused(phantom_case, tmp_path):
    """ITK stacks such a series at an averaged spacing, with a raw warning on stderr; we name the gap."""
    folder = write_dicom_series(phantom_case["flair"], tmp_path / "series")
    (folder / "slice007.dcm").unlink()
    before = snapshot(folder)
    out = tmp_path / "out"
    line = assert_refused(run_detect(folder, "-o", out, "--stages", "1"), "series", "1 slice missing",
                          "slice006.dcm", "slice008.dcm", "--resample-slice-gaps")
    assert "4.00 mm" in line and "2.00 mm apart" in line
    assert not out.exists()
    # Asked for, the gap is interpolated over: an even 2 mm grid of 16 slices, and the report says so.
    result = ok(run_detect(folder, "-o", out, "--stages", "1", "-q", "--resample-slice-gaps"))
    warnings = result.stderr.strip().splitlines()
    assert warnings and all(w.startswith("synomaly: warning: ") for w in warnings), result.stderr
    reference = read_dicom_series(folder)
    seg = sitk.ReadImage(str(out / "series_anomaly_seg.nrrd"))
    assert seg.GetSize() == (96, 96, 16) and seg.GetSpacing() == pytest.approx((1.0, 1.0, 2.0))
    assert seg.GetOrigin() == pytest.approx(reference.GetOrigin())
    report = json.loads((out / "series_report.json").read_text(encoding="utf-8"))
    assert any("resampled" in w and "1 slice missing" in w for w in report["warnings"]), report["warnings"]
    assert snapshot(folder) == before


def test_no_library_message_reaches_the_terminal(phantom_case, tmp_path):
    """Slice positions off by 1 % of their spacing (rounding in a scanner's export): ITK prints a raw
    warning on stderr, we read the series as even and say nothing; a stray file is ignored quietly."""
    folder = write_dicom_series(phantom_case["flair"], tmp_path / "series", jitter_mm=0.02)
    (folder / "notes.dcm").write_text("not a DICOM file", encoding="utf-8")
    result = ok(run_detect(folder, "-o", tmp_path / "out", "--stages", "1", "-q"))
    stray = [line for line in result.stderr.splitlines() if not line.startswith("synomaly: ")]
    assert not stray, result.stderr
    check_outputs(tmp_path / "out", "series", read_dicom_series(folder), ext=".nrrd")


@pytest.mark.parametrize("option, value, words", [
    ("--threshold", "nan", ["threshold", "finite"]),
    ("--threshold", "inf", ["threshold", "finite"]),
    ("--threshold", "-0.1", ["threshold", "at least 0"]),
    ("--min-component-mm3", "-5", ["minimum component size", "at least 0"]),
    ("--min-component-mm3", "nan", ["minimum component size", "finite"]),
    ("--blur-mm", "-1", ["blur (mm)", "at least 0"]),
    ("--batch-size", "0", ["batch size", "at least 1"]),
    ("--seed", "-1", ["seed", "0 to"]),
    ("--seed", str(2 ** 64), ["seed", "0 to"]),
    ("--stages", "0", ["stages", "at least 1"]),
    ("--ensemble", "0", ["ensemble", "at least 1"]),
])
def test_bad_detect_options_are_refused_before_any_work(phantom_case, tmp_path, option, value, words):
    result = run_detect(phantom_case["flair"], "-o", tmp_path / "out", option, value)
    assert_refused(result, value if value[0] != "-" else value[1:], *words)
    assert result.stdout == "", "refused before the model is even loaded"
    assert not (tmp_path / "out").exists()


def test_detection_settings_check_themselves():
    """The Slicer logic builds the same settings object, so it meets the same checks."""
    from synomaly.inference.detection import DetectionSettings
    from synomaly.errors import InputError

    for bad in ({"batch_size": 0}, {"threshold": float("nan")}, {"min_component_mm3": -1.0}, {"seed": -3},
                {"blur_mm": float("inf")},
                {"stages": 1.5}, {"ensemble": True}, {"mode": "triple"}):
        with pytest.raises(InputError):
            DetectionSettings(**bad)
    DetectionSettings(threshold=0.0, min_component_mm3=0.0, batch_size=1, seed=2 ** 63 - 1)


def test_first_line_shows_the_threshold_in_use(phantom_case, tmp_path):
    result = ok(run_detect(phantom_case["flair"], "-o", tmp_path, "--threshold", "0.25", "--stages", "1", "-q"))
    first = result.stdout.splitlines()[0]
    assert "threshold 0.2500 (yours" in first, first
    report = check_outputs(tmp_path, "flair", sitk.ReadImage(str(phantom_case["flair"])))
    assert report["threshold"] == 0.25 and report["threshold_source"] == "user"


def test_a_blur_of_ones_own_says_the_threshold_was_set_for_the_models(phantom_case, tmp_path):
    """Less blur (for small lesions) keeps the model's threshold, calibrated for its own blur: the run says so."""
    result = ok(run_detect(phantom_case["flair"], "-o", tmp_path, "--blur-mm", "0.5", "--stages", "1", "-q"))
    first = result.stdout.splitlines()[0]
    assert "at 0.5 mm expect more false positives" in first and "the model's calibrated one" in first, first
    report = check_outputs(tmp_path, "flair", sitk.ReadImage(str(phantom_case["flair"])))
    assert report["settings"]["blur_mm"] == 0.5 and report["threshold_source"] == "model calibration"


# --- outputs as a set: interrupted and concurrent runs ---------------------------------------------

# Runs the CLI in a real process whose first finished volume write is followed by ACTION: a signal it
# sends itself (SIGKILL, SIGINT), or "pause" (it writes FLAG, then waits for FLAG.go).
AT_FIRST_WRITE = """
import os, signal, sys, time
from pathlib import Path
from synomaly.commands import cli
from synomaly.files import outputs
action, flag = sys.argv[1], Path(sys.argv[2])
real_write = outputs.write_volume
def write_volume(path, *args, **kwargs):
    real_write(path, *args, **kwargs)
    if action == "pause":
        flag.write_text(str(os.getpid()))
        while not flag.with_suffix(".go").exists():
            time.sleep(0.05)
    else:
        os.kill(os.getpid(), getattr(signal, action))
        time.sleep(60)
outputs.write_volume = write_volume
sys.exit(cli.main(sys.argv[3:]))
"""


def cli_with_hook(action: str, flag: Path, *args) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.Popen([sys.executable, "-c", AT_FIRST_WRITE, action, str(flag), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def visible(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_killed_run_leaves_nothing_that_blocks_the_next(phantom_case, tmp_path):
    out = tmp_path / "out"
    killed = cli_with_hook("SIGKILL", tmp_path / "flag", "detect", phantom_case["flair"], "-o", out,
                           "--model", "demo-phantom", "--stages", "1", "-q")
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    assert visible(out) == [], "a killed run shows no partial set"
    # The next run, without --overwrite, finds the dead run's lock, clears what it left and goes ahead.
    ok(run_detect(phantom_case["flair"], "-o", out, "--stages", "1", "-q"))
    check_outputs(out, "flair", sitk.ReadImage(str(phantom_case["flair"])))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_interrupted_run_leaves_nothing(phantom_case, tmp_path):
    out = tmp_path / "new" / "out"
    interrupted = cli_with_hook("SIGINT", tmp_path / "flag", "detect", phantom_case["flair"], "-o", out,
                                "--model", "demo-phantom", "--stages", "1", "-q")
    _, stderr = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 130 and stderr.strip() == "synomaly: interrupted", stderr
    assert not (tmp_path / "new").exists(), "the folders the run created are gone with it"


def test_concurrent_run_into_the_same_folder_is_refused(phantom_case, tmp_path):
    out = tmp_path / "out"
    flag = tmp_path / "writing"
    first = cli_with_hook("pause", flag, "detect", phantom_case["flair"], "-o", out, "--model", "demo-phantom",
                          "--stages", "1", "-q")
    try:
        for _ in range(6000):
            if flag.exists() or first.poll() is not None:
                break
            time.sleep(0.05)
        assert flag.exists(), first.communicate()
        for extra in ((), ("--overwrite",)):
            line = assert_refused(run_detect(phantom_case["flair"], "-o", out, "--stages", "1", *extra),
                                  "another synomaly run", f"process {first.pid}", "flair")
            assert str(out) in line
        flag.with_suffix(".go").write_text("go")
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    check_outputs(out, "flair", sitk.ReadImage(str(phantom_case["flair"])))
    # Run after run: the second one no longer races, it finds the outputs and asks for --overwrite.
    assert_refused(run_detect(phantom_case["flair"], "-o", out, "--stages", "1"), "already exists")


def test_failed_evaluate_leaves_nothing(phantom_case, tmp_path):
    cases = tmp_path / "cases"
    good = cases / "a_good"
    good.mkdir(parents=True)
    for key in ("flair", "seg"):
        (good / phantom_case[key].name).write_bytes(phantom_case[key].read_bytes())
    bad = cases / "b_bad"
    bad.mkdir()
    (bad / "flair.nii.gz").write_bytes(phantom_case["flair"].read_bytes())
    write(bad / "seg.nii.gz", np.zeros((4, 8, 8), np.uint8))
    out = tmp_path / "evaluation"
    assert_refused(run_cli("evaluate", cases, "-o", out, "--model", "demo-phantom", "--max-slices", "4",
                           "--stages", "1", "-q"), "b_bad", "resample the label")
    assert not out.exists(), "no folder, no panel of the case that went through"


def test_failed_demo_leaves_nothing(tmp_path):
    import torch

    out = tmp_path / "demo"
    assert_refused(run_cli("demo", "-o", out, "--device", "abacus"), "abacus")
    if not torch.cuda.is_available():  # fails inside detection, after the phantom files were made
        assert_refused(run_cli("demo", "-o", out, "--device", "cuda"), "CUDA")
    assert not out.exists()


# --- progress and report ---------------------------------------------------------------------------

def run_in_terminal(*args, timeout=300):
    """The CLI with stderr on a pseudo-terminal (where bars are drawn), stdout on a pipe."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = dict(os.environ, COLUMNS="160")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen([sys.executable, "-m", "synomaly", *map(str, args)], stdin=slave, stderr=slave,
                            stdout=subprocess.PIPE, env=env)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=timeout)
    return proc.returncode, stdout, b"".join(chunks).decode("utf-8", "replace")


BAR = re.compile(r"(\d+)%\|[^|]*\| (\d\d:\d\d)<(\d\d:\d\d|\?)(.*)$")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
@pytest.mark.parametrize("command", ["detect", "evaluate"])
def test_progress_bar_moves_forward_with_time_left(phantom_case, tmp_path, command):
    if command == "detect":
        args = ("detect", phantom_case["flair"], "--model", "demo-phantom", "-o", tmp_path / "out")
    else:
        args = ("evaluate", phantom_case["flair"].parent, "--model", "demo-phantom", "-o", tmp_path / "out",
                "--max-slices", "16")
    code, stdout, terminal = run_in_terminal(*args)
    assert code == 0, terminal
    frames = [f.strip() for f in re.split(r"[\r\n]", terminal) if "%|" in f]
    parsed = [BAR.search(f) for f in frames]
    assert all(parsed), [f for f, m in zip(frames, parsed) if not m]
    percent = [int(m.group(1)) for m in parsed]
    assert len(percent) >= 5 and percent[-1] >= 90, percent
    steps = np.diff([0] + percent)
    assert steps.min() >= 0, f"the bar went back: {percent}"
    assert steps.max() <= 25, f"the bar jumped: {percent}"
    for m in parsed:
        message = m.group(4)
        assert message == "" or (message.startswith(", ") and message[2:3].strip()), m.group(0)
        assert ", ," not in message and not message.rstrip().endswith(",")


def test_report_names_input_engine_and_model(phantom_case, tmp_path):
    import synomaly
    from synomaly.files.model_file import load_model

    ok(run_detect(phantom_case["flair"], "--mask", phantom_case["brainmask"], "-o", tmp_path, "--stages", "1",
                  "-q"))
    report = check_outputs(tmp_path, "flair", sitk.ReadImage(str(phantom_case["flair"])))
    assert report["input"] == str(phantom_case["flair"].resolve())
    assert report["mask"] == str(phantom_case["brainmask"].resolve())
    assert report["engine"] == {"name": "synomaly", "version": synomaly.__version__}
    assert report["model"]["model_id"] == load_model("demo-phantom").model_id
    assert report["warnings"] == []


# --- training -----------------------------------------------------------------------------------------

TRAIN_ARGS = ("--steps", "6", "--image-size", "32", "--base-channels", "8", "--checkpoint-every", "3",
              "--bias-field", "0.5", "-q")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run on 4 healthy phantoms (32 slices each: enough 8-slice blocks for a validation split)."""
    root = tmp_path_factory.mktemp("train")
    for seed in range(4):
        write_phantom_case(root / "healthy" / f"h{seed}", seed=200 + seed, lesion=False, shape=(32, 48, 48))
    model = root / "models" / "tiny.safetensors"
    model.parent.mkdir()
    result = ok(run_cli("train", root / "healthy", "-o", model, *TRAIN_ARGS))
    return {"healthy": root / "healthy", "model": model, "stdout": result.stdout}


def test_train_writes_a_model_detect_uses(trained, phantom_case, tmp_path):
    from synomaly.files.model_file import read_metadata

    model = trained["model"]
    meta = read_metadata(model)
    assert meta["model_id"] in trained["stdout"] and meta["training"]["steps"] == 6
    assert meta["training"]["settings"]["bias_field"] == 0.5
    assert (model.parent / "tiny.run" / "checkpoint.pt").exists()
    ok(run_cli("detect", phantom_case["flair"], "--model", model, "-o", tmp_path, "--stages", "1", "-q"))
    report = check_outputs(tmp_path, "flair", sitk.ReadImage(str(phantom_case["flair"])))
    assert report["model"]["model_id"] == meta["model_id"]
    assert report["threshold"] == pytest.approx(meta["threshold"])


def test_train_takes_the_cpu_share_a_slurm_task_gives_it(tmp_path):
    """Without --threads, training uses the CPUs its Slurm task was given, not every core of the node."""
    from synomaly.files.model_file import read_metadata

    write_phantom_case(tmp_path / "healthy" / "h0", seed=300, lesion=False, shape=(32, 48, 48))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["SLURM_CPUS_PER_TASK"] = "1"
    model = tmp_path / "one.safetensors"
    result = subprocess.run([sys.executable, "-m", "synomaly", "train", str(tmp_path / "healthy"), "-o", str(model),
                             *TRAIN_ARGS], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert read_metadata(model)["training"]["threads"] == 1


def test_train_refuses_existing_run_without_resume(trained):
    model = trained["model"]
    before = snapshot(model.parent)
    assert_refused(run_cli("train", trained["healthy"], "-o", model, *TRAIN_ARGS), "already exists", "--resume")
    assert snapshot(model.parent) == before


def test_train_resume_continues_a_finished_run(trained):
    """The 6-step run is finished; resuming it with a larger budget trains on from its checkpoint."""
    model = trained["model"]
    run_dir = model.parent / "tiny.run"
    args = list(TRAIN_ARGS)
    args[args.index("--steps") + 1] = "9"
    ok(run_cli("train", trained["healthy"], "-o", model, "--resume", *args))
    losses = (run_dir / "loss.csv").read_text(encoding="utf-8").strip().splitlines()
    assert len(losses) == 1 + 9, "the resumed run trained steps 7-9 after the saved 6"
    from synomaly.files.model_file import read_metadata

    assert read_metadata(model)["training"]["steps"] == 9


def test_train_compile_trains_as_the_eager_run_and_resumes_without_it(trained, tmp_path):
    """--compile changes how the step runs, not what it computes: the same draws and, up to rounding,
    the same losses as the fixture's eager run; its checkpoint resumes without compiling."""
    from synomaly.files.model_file import read_metadata

    model = tmp_path / "compiled.safetensors"
    result = ok(run_cli("train", trained["healthy"], "-o", model, "--compile", *[a for a in TRAIN_ARGS if a != "-q"]))
    assert "compiling the network" in result.stdout + result.stderr
    assert read_metadata(model)["training"]["settings"]["compile"] is True

    def losses(run_dir):
        rows = (run_dir / "loss.csv").read_text(encoding="utf-8").strip().splitlines()[1:]
        return [float(row.split(",")[1]) for row in rows]

    eager = losses(trained["model"].parent / "tiny.run")[:6]
    np.testing.assert_allclose(losses(tmp_path / "compiled.run"), eager, rtol=1e-3)
    args = list(TRAIN_ARGS)
    args[args.index("--steps") + 1] = "8"
    ok(run_cli("train", trained["healthy"], "-o", model, "--resume", *args))
    assert len(losses(tmp_path / "compiled.run")) == 8


def test_train_compile_without_a_working_compiler_is_refused_before_writing(trained, tmp_path, monkeypatch):
    """A real failure: inductor needs a C++ compiler on a CPU; a fresh cache keeps it from reusing earlier work."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    out = tmp_path / "models"
    out.mkdir()
    result = run_cli("train", trained["healthy"], "-o", out / "m.safetensors", "--compile", *TRAIN_ARGS)
    line = assert_refused(result, "torch.compile could not build the network", "No working C++ compiler",
                          "leave out --compile")
    assert "TORCHDYNAMO_VERBOSE" not in line
    assert not any(out.iterdir()), "no run folder, no model"


@pytest.fixture(scope="module")
def flat_healthy(tmp_path_factory):
    """Two healthy phantoms as one flat folder of image files: pat<i>_flair with pat<i>_brainmask and pat<i>_seg."""
    folder = tmp_path_factory.mktemp("flat") / "healthy"
    for seed in range(2):
        for role, path in write_phantom_case(folder / "tmp", seed=300 + seed, lesion=False, shape=(16, 48, 48)).items():
            path.rename(folder / f"pat{seed}_{role}.nii.gz")
    (folder / "tmp").rmdir()
    return folder


def test_train_on_a_folder_of_image_files_into_a_new_folder(flat_healthy, tmp_path):
    from synomaly.files.model_file import load_model

    before = snapshot(flat_healthy)
    model = tmp_path / "new" / "deeper" / "flat.safetensors"
    result = ok(run_cli("train", flat_healthy, "-o", model, *TRAIN_ARGS))
    assert str(model) in result.stdout
    loaded = load_model(model)
    cases = loaded.metadata["training"]["data"]["cases"]
    assert [c["case"] for c in cases] == ["pat0_flair", "pat1_flair"]
    assert snapshot(flat_healthy) == before


def _train_process(healthy, model, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "synomaly", "train", healthy, "-o", model, "--image-size", "32",
                             "--base-channels", "8", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_a_checkpoint_that_resume_continues(flat_healthy, tmp_path, signal_name):
    """SIGINT with a checkpoint every 4 steps, sent after the log line of step 8; SIGTERM before the first
    checkpoint (every 1000 steps), sent after the log line of the first step. Both save the step reached."""
    import signal
    import threading

    import torch

    from synomaly.files.model_file import load_model

    model = tmp_path / "m.safetensors"
    run_dir = tmp_path / "m.run"
    every = 4 if signal_name == "SIGINT" else 1000
    proc = _train_process(flat_healthy, model, "--steps", "100000", "--checkpoint-every", every)
    watchdog = threading.Timer(240, proc.kill)  # a regression fails the test instead of hanging it
    watchdog.start()
    try:
        for line in proc.stderr:
            if f"step {8 if signal_name == 'SIGINT' else 1}/100000" in line:
                break
        proc.send_signal(getattr(signal, signal_name))
        _, stderr = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    lines = stderr.strip().splitlines()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and lines[-1].startswith("synomaly: training stopped at step "), stderr
    assert "--resume" in lines[-1] and str(run_dir) in lines[-1]
    reached = int(re.search(r"at step (\d+) of", lines[-1]).group(1))
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["step"] == reached and len(saved["losses"]) == reached
    assert reached >= 8 if signal_name == "SIGINT" else 1 <= reached < every
    assert not model.exists()
    resumed = _train_process(flat_healthy, model, "--steps", reached + 2, "--checkpoint-every", every, "--resume", "-q")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert final["step"] == reached + 2 and final["losses"][:reached] == saved["losses"]
    assert load_model(model).metadata["training"]["steps"] == reached + 2


@pytest.mark.parametrize("option, value, words", [
    ("--steps", "0", ["steps", "at least 1"]),
    ("--batch-size", "0", ["batch size", "at least 1"]),
    ("--lr", "nan", ["learning rate"]),
    ("--image-size", "36", ["image size 36", "multiple of 8"]),
    ("--base-channels", "24", ["base channels 24"]),
    ("--checkpoint-every", "0", ["checkpoint interval"]),
    ("--target-fpr", "2", ["target false-positive rate"]),
])
def test_bad_training_settings_are_refused_before_any_work(flat_healthy, tmp_path, option, value, words):
    args = list(TRAIN_ARGS)
    if option in args:
        del args[args.index(option):args.index(option) + 2]
    model = tmp_path / "out" / "m.safetensors"
    assert_refused(run_cli("train", flat_healthy, "-o", model, *args, option, value), *words)
    assert not (tmp_path / "out").exists(), "no model, no run folder, no output folder"


def test_train_overwrite_replaces_the_run_and_a_corrupt_checkpoint_is_refused(flat_healthy, tmp_path):
    """Resume's other refusals (changed settings, foreign files) are tested on the engine in test_training."""
    from synomaly.training.loop import train
    from synomaly.training.settings import TrainingSettings

    model = tmp_path / "m.safetensors"
    run_dir = tmp_path / "m.run"
    train([flat_healthy], model, TrainingSettings(steps=3, image_size=32, base_channels=8, device="cpu"))
    (run_dir / "previews" / "step_999999.png").write_bytes(b"from an earlier run")
    args = list(TRAIN_ARGS)
    args[args.index("--steps") + 1] = "4"
    ok(run_cli("train", flat_healthy, "-o", model, "--overwrite", *args))
    assert sorted(p.name for p in (run_dir / "previews").iterdir()) == ["step_000004.png"]
    assert len((run_dir / "loss.csv").read_text(encoding="utf-8").splitlines()) == 1 + 4
    (run_dir / "checkpoint.pt").write_bytes(b"\x00not a checkpoint")
    before = snapshot(tmp_path)
    assert_refused(run_cli("train", flat_healthy, "-o", model, "--resume", *args), "checkpoint.pt",
                   "not a readable training checkpoint", "--overwrite")
    assert snapshot(tmp_path) == before


def test_evaluate_reads_a_case_list_by_use(phantom_case, tmp_path):
    folder = phantom_case["flair"].parent
    listing = tmp_path / "cases.csv"
    listing.write_text(f"case,folder,use\ndev1,{folder},development\ntrain1,{folder},training\n")
    out = tmp_path / "evaluation"
    ok(run_cli("evaluate", "--cases-csv", listing, "-o", out, "--model", "demo-phantom", "--max-slices", "4",
               "--stages", "1", "-q"))
    saved = json.loads((out / "evaluation.json").read_text())
    assert [case["name"] for case in saved["cases"]] == ["dev1"]
    assert_refused(run_cli("evaluate", "-o", tmp_path / "none", "--model", "demo-phantom"), "--cases-csv")
    assert_refused(run_cli("evaluate", "--cases-csv", listing, "--use", "test", "-o", tmp_path / "none2",
                           "--model", "demo-phantom"), "no case with use 'test'")


def test_evaluate_takes_the_small_lesion_settings(phantom_case, tmp_path):
    """The settings that find small lesions (less blur, smaller components) can be evaluated on one's own cases."""
    out = tmp_path / "evaluation"
    ok(run_cli("evaluate", phantom_case["flair"].parent, "-o", out, "--model", "demo-phantom", "--max-slices", "4",
               "--stages", "1", "--blur-mm", "0.5", "--min-component-mm3", "5", "-q"))
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["settings"]["inference"]["blur_mm"] == 0.5
    assert saved["settings"]["inference"]["min_component_mm3"] == 5.0
