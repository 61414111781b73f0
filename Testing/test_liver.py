"""The liver CT path: the preset's organ mask, end to end on real CT where ../shared/data/liver-ct exists.

A liver model (preset ``liver-ct``) needs a liver mask: detection and training refuse without one, on the
command line, in the Python API and in the Slicer logic (real MRML from slicer-core), each with words that
say where a mask comes from. Blobs are placed and the map is kept inside the mask; HU window 0-150; blobs
and map go both ways (darker and brighter), and so does the baseline. Real-data tests: the crop to the liver's bounding box on a 512 x 512
anisotropic CT, and a short training on ircad17 with detection on lits117 and the 3 mm TotalSegmentator CT,
every output in its input's geometry.
"""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from test_cli import OUTPUT_KINDS, ok, run_cli

from synomaly.inference.baseline import baseline_for, baseline_score_map, lesion_direction
from synomaly.errors import InputError
from synomaly.method.presets import PRESETS, get_preset, missing_mask_message
from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume
from synomaly.files.geometry import Geometry
from synomaly.files.volume_io import read_volume, write_volume

# An oblique, anisotropic grid (ITK/LPS): outputs must come back on exactly this grid.
_C, _S = float(np.cos(0.1)), float(np.sin(0.1))
OBLIQUE = Geometry((0.8, 0.7, 2.5), (-31.0, 12.5, 40.0), (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0))


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("synomaly: error:")]


def synthetic_ct(shape=(14, 64, 64), seed=0):
    """An abdomen-like CT in HU: fat body, a liver (about 100 HU) with a darker lesion (about 45 HU)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (y / 0.9) ** 2 + (x / 0.95) ** 2 < 1
    liver = ((y + 0.1) / 0.5) ** 2 + ((x + 0.3) / 0.45) ** 2 + (z / 1.2) ** 2 < 1
    lesion = ((y + 0.1) / 0.15) ** 2 + ((x + 0.3) / 0.15) ** 2 + (z / 0.5) ** 2 < 1
    ct = np.full(shape, -1000.0)
    ct[body] = -90.0
    ct[liver] = 100.0
    ct[lesion & liver] = 45.0
    ct = ct + rng.normal(0, 8, shape)
    return ct.astype(np.int16), liver.astype(np.uint8), (lesion & liver).astype(np.uint8)


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    ct, liver, lesion = synthetic_ct()
    paths = {"ct": folder / "ct.nii.gz", "liver": folder / "liver.nii.gz"}
    write_volume(paths["ct"], ct, OBLIQUE)
    write_volume(paths["liver"], liver, OBLIQUE)
    return paths, ct, liver.astype(bool), lesion.astype(bool)


def tiny_model_file(folder: Path, preset: str, name: str) -> Path:
    """An untrained, very small model in the real file format, with the preset's intensity handling."""
    torch = pytest.importorskip("torch")
    from synomaly.files.model_file import save_model
    from synomaly.method.network import UNet, UNetConfig
    from synomaly.method.schedule import DiffusionSchedule

    p = get_preset(preset)
    torch.manual_seed(0)
    network = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                              num_heads=1, image_size=32))
    metadata = {"name": name, "description": "untrained; for plumbing tests", "preset": preset,
                "preprocessing": PreprocessConfig(intensity=p.intensity, window=p.window, image_size=32).to_dict(),
                "schedule": DiffusionSchedule(1000).to_dict(),
                "inference": {"max_stages": 1, "direction": p.direction[0], "signed": True}, "threshold": 0.1}
    return save_model(folder / f"{name}.safetensors", network, metadata)


@pytest.fixture(scope="module")
def liver_model(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("liver-model"), "liver-ct", "tiny-liver")


def assert_same_geometry(output: Path, reference: Path):
    out, ref = sitk.ReadImage(str(output)), sitk.ReadImage(str(reference))
    assert out.GetSize() == ref.GetSize(), output.name
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(out, get)(), getattr(ref, get)(), atol=1e-6), f"{output.name}: {get}"


# the preset and its messages

def test_liver_preset_is_the_published_one_both_ways_and_names_its_organ():
    liver = get_preset("liver-ct")
    # The published LiTS parameters, with blobs darker or brighter (liver tumours are either, by phase).
    assert (liver.sigma, liver.threshold, liver.offset, liver.direction) == (3.0, 175.0, 1.0, (-1, 1))
    assert liver.noise_params()["direction"] == [-1, 1]
    assert liver.intensity == "window" and liver.window == (0.0, 150.0) and liver.organ == "liver"
    assert missing_mask_message("brain-flair") is None
    cli = missing_mask_message("liver-ct")
    assert "liver mask" in cli and "--mask" in cli and "TotalSegmentator" in cli and "--roi_subset liver" in cli
    panel = missing_mask_message("liver-ct", "slicer")
    assert "the Mask" in panel and "'liver' segment" in panel and "TotalSegmentator extension" in panel
    assert "--" not in panel
    train = missing_mask_message("liver-ct", "train")
    assert "image,mask" in train and "--mask" not in train
    assert all(missing_mask_message(name) is None for name, p in PRESETS.items() if not p.organ and not p.disc_margin_px)


def test_detection_without_a_mask_is_refused_by_the_api(ct_case, liver_model):
    from synomaly.inference.detection import DetectionSettings, detect
    from synomaly.files.model_file import load_model

    paths, ct, liver, _ = ct_case
    before = ct.copy()
    with pytest.raises(InputError, match="needs a liver mask.*--mask"):
        detect(ct, OBLIQUE, load_model(liver_model), None, DetectionSettings(device="cpu"))
    assert np.array_equal(ct, before)


# the command line

def test_cli_detect_without_a_mask_says_where_to_get_one_and_writes_nothing(ct_case, liver_model, tmp_path):
    paths = ct_case[0]
    out = tmp_path / "out"
    result = run_cli("detect", paths["ct"], "--model", liver_model, "-o", out, "--device", "cpu", "-q")
    assert result.returncode == 2
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert "liver mask" in errors[0] and "--mask" in errors[0] and "TotalSegmentator" in errors[0]
    assert not out.exists(), "a refused run leaves no output folder"


def test_cli_detect_with_the_mask_keeps_the_map_inside_it_and_the_geometry(ct_case, liver_model, tmp_path):
    paths, ct, liver, _ = ct_case
    out = tmp_path / "out"
    ok(run_cli("detect", paths["ct"], "--mask", paths["liver"], "--model", liver_model, "-o", out, "--device", "cpu",
               "-q"))
    for kind in OUTPUT_KINDS:
        assert_same_geometry(out / f"ct_{kind}.nii.gz", paths["ct"])
    anomaly_map = read_volume(out / "ct_anomaly_map.nii.gz")[0]
    seg = read_volume(out / "ct_anomaly_seg.nii.gz")[0] > 0
    counterfactual = read_volume(out / "ct_counterfactual.nii.gz")[0]
    assert anomaly_map[liver].max() > 0, "the map lives inside the liver"
    assert not anomaly_map[~liver].any() and not seg[~liver].any()
    assert np.array_equal(counterfactual[~liver], ct[~liver].astype(np.float32)), "outside the liver: the input"


def test_cli_training_without_masks_is_refused_and_writes_nothing(ct_case, tmp_path):
    paths = ct_case[0]
    model = tmp_path / "models" / "liver.safetensors"
    result = run_cli("train", paths["ct"], "--preset", "liver-ct", "-o", model, "--steps", "1", "--device", "cpu",
                     "-q")
    assert result.returncode == 2
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert "1 of 1 training cases have no mask (ct)" in errors[0] and "image,mask" in errors[0]
    assert not model.exists() and not (tmp_path / "models" / "liver.run").exists()


# the baseline: darkness for the liver

def test_baseline_of_a_darker_lesion_model_scores_darkness_and_not_the_organ_border(ct_case):
    _, ct, liver, lesion = ct_case
    prepared = prepare_volume(ct, OBLIQUE, PreprocessConfig(intensity="window", window=(0.0, 150.0)), liver)
    dark = baseline_for(prepared, 3, direction=-1)
    assert dark[lesion].mean() > dark[liver & ~lesion].mean() + 0.5
    inner = liver & ~lesion
    from scipy import ndimage

    border = liver & ~ndimage.binary_erosion(liver, iterations=1)
    assert dark[border & ~lesion].mean() <= dark[inner].mean() + 0.05, "the border must not look dark"
    bright = baseline_for(prepared, 3)  # +1: as before, the normalised volume itself
    orient = prepared.orientation
    assert np.array_equal(bright, baseline_score_map(orient.invert(prepared.normalised),
                                                     orient.invert(prepared.foreground), 3))
    assert lesion_direction({"inference": {"direction": -1, "signed": True}}) == -1
    assert lesion_direction({"inference": {"direction": 1, "signed": False}}) == 0  # both ways
    with pytest.raises(InputError):
        baseline_for(prepared, 3, direction=2)


# real CT

def test_a_512_slice_anisotropic_ct_is_cropped_to_the_liver_before_resizing(liver_data):
    ct, geometry = read_volume(liver_data / "ircad17" / "ct.nii.gz")
    liver = read_volume(liver_data / "ircad17" / "liver.nii.gz")[0] > 0
    assert ct.shape[1:] == (512, 512) and geometry.spacing[2] > 2 * geometry.spacing[0]
    config = PreprocessConfig(intensity="window", window=(0.0, 150.0), image_size=128)
    prepared = prepare_volume(ct, geometry, config, liver)
    fg = prepared.foreground
    ys, xs = np.flatnonzero(fg.any(axis=(0, 2))), np.flatnonzero(fg.any(axis=(0, 1)))
    margin = int(np.ceil(config.margin_mm / prepared.spacing_zyx[1]))
    frame = prepared.frame
    assert (frame.y0, frame.y1) == (max(0, ys[0] - margin), min(512, ys[-1] + 1 + margin))
    assert (frame.x0, frame.x1) == (max(0, xs[0] - margin), min(512, xs[-1] + 1 + margin))
    assert max(frame.resized) == 128 and frame.y1 - frame.y0 < 512
    images, masks = prepared.network_slices(prepared.slices[:4])
    assert images.shape[-2:] == (128, 128)
    import torch.nn.functional as F

    near = F.max_pool2d(masks.float(), 5, stride=1, padding=2) > 0  # resizing blends the liver's edge
    assert float(images[~near].max()) < -0.999, "outside the liver the network sees nothing"
    inside = prepared.normalised[fg]
    assert inside.min() >= -1.0 and inside.max() <= 1.0 and np.median(inside) > 0, "0-150 HU window"


@pytest.mark.slow
def test_short_liver_training_on_ircad17_then_detection_in_each_input_geometry(liver_data, tmp_path):
    """Train through the command line on ircad17's tumour-free slices (CSV image,mask,label), then detect on
    lits117 (1 mm, 128^3) and the 3 mm TotalSegmentator CT (flipped axes) with their liver masks."""
    from synomaly.files.model_file import read_metadata

    listing = tmp_path / "train.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "label", "name"])
        case = liver_data / "ircad17"
        writer.writerow([case / "ct.nii.gz", case / "liver.nii.gz", case / "tumour.nii.gz", "ircad17"])
    model = tmp_path / "liver.safetensors"
    ok(run_cli("train", listing, "--preset", "liver-ct", "-o", model, "--steps", "4", "--batch-size", "4",
               "--image-size", "32", "--base-channels", "8", "--res-blocks", "1", "--checkpoint-every", "2",
               "--intensity-shift", "0.2", "--device", "cpu", "-q"))
    meta = read_metadata(model)
    assert meta["training"]["settings"]["intensity_shift"] == 0.2
    assert meta["preset"] == "liver-ct" and meta["preprocessing"]["window"] == [0.0, 150.0]
    assert meta["inference"]["signed"] is False and meta["calibration"]["baseline_direction"] == 0
    assert meta["noise"]["direction"] == [-1, 1] and meta["noise"]["offset"] == 1.0
    tumour = read_volume(case / "tumour.nii.gz")[0] > 0
    trained = {c["case"]: c for c in meta["training"]["data"]["cases"]}["ircad17"]
    assert 0 < trained["train_slices"] + trained["validation_slices"] <= 119 - int(tumour.any(axis=(1, 2)).sum())

    inputs = [liver_data / "lits117", liver_data / "totalseg-example"]
    out = tmp_path / "out"
    cts = [tmp_path / f"{folder.name}.nii.gz" for folder in inputs]  # outputs are named after the input file
    masks = []
    for folder, ct in zip(inputs, cts):
        shutil.copy(folder / "ct.nii.gz", ct)
        masks += ["--mask", folder / "liver.nii.gz"]
    ok(run_cli("detect", *cts, *masks, "--model", model, "-o", out, "--device", "cpu", "-q"))
    for folder in inputs:
        ct = tmp_path / f"{folder.name}.nii.gz"
        for kind in OUTPUT_KINDS:
            assert_same_geometry(out / f"{folder.name}_{kind}.nii.gz", ct)
        liver = read_volume(folder / "liver.nii.gz")[0] > 0
        anomaly_map = read_volume(out / f"{folder.name}_anomaly_map.nii.gz")[0]
        assert not anomaly_map[~liver].any() and anomaly_map[liver].max() > 0
        assert not (read_volume(out / f"{folder.name}_anomaly_seg.nii.gz")[0][~liver]).any()


# the Slicer logic, on real MRML nodes

@pytest.fixture
def mrml():
    """The slicer-core scene of the other Slicer tests; skipped where slicer-core is missing."""
    pytest.importorskip("slicer", reason="needs slicer-core for real MRML")
    import test_slicer_scene as scene_helpers

    scene_helpers.new_scene()
    return scene_helpers


def test_slicer_logic_asks_a_liver_model_for_a_mask_in_the_panels_words(mrml, ct_case, liver_model, tmp_path):
    from SynomalyDetectionLib import Parameters, SynomalyLogic

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(liver_model, models / "tiny-liver.safetensors")
    tiny_model_file(models, "brain-flair", "tiny-brain")
    logic = SynomalyLogic(user_models_dir=models)
    entries = {entry.name: entry for entry in logic.models()}
    assert entries["tiny-liver"].preset == "liver-ct" and entries["tiny-brain"].preset == "brain-flair"
    liver_id, brain_id = entries["tiny-liver"].identifier, entries["tiny-brain"].identifier

    _, ct, liver, _ = ct_case
    node = mrml.add_volume(ct.astype(np.float32), OBLIQUE.ijk_to_ras(), name="CT")
    scene = mrml.slicer.mrmlScene
    count = scene.GetNumberOfNodes()
    blocker = logic.detection_blocker(Parameters(input_volume=node, model=liver_id))
    assert "needs a liver mask" in blocker and "the Mask" in blocker and "TotalSegmentator extension" in blocker
    assert "--mask" not in blocker
    with pytest.raises(InputError) as refused:
        logic.prepare_detection(node, None, liver_id)
    assert str(refused.value) == blocker
    assert scene.GetNumberOfNodes() == count, "a refusal adds no node"
    assert logic.detection_blocker(Parameters(input_volume=node, model=brain_id)) == ""
    assert logic.detection_blocker(Parameters(input_volume=None, model=liver_id)) == "Choose an input volume."
    several = Parameters(several_inputs=True, input_volumes=[node], model=liver_id)
    assert logic.detection_blocker(several) == blocker, "several volumes: the same mask is needed"
    with pytest.raises(InputError, match="needs a liver mask"):
        logic.start_detection(several)

    spleen = np.zeros_like(liver)
    spleen[:, 5:15, 40:55] = True
    body = mrml.add_segmentation(node, [("spleen", spleen), ("Liver", liver)])
    assert logic.detection_blocker(Parameters(input_volume=node, model=liver_id, mask=body)) == ""
    request = logic.prepare_detection(node, body, liver_id)
    assert np.array_equal(request.mask, liver), "of a whole-body segmentation, the liver segment alone"
    assert np.array_equal(logic.prepare_detection(node, body, brain_id).mask, liver | spleen)
    unnamed = mrml.add_segmentation(node, [("Segment_1", liver), ("Segment_2", spleen)])
    with pytest.raises(InputError, match="none is named 'liver'"):
        logic.prepare_detection(node, unnamed, liver_id)
    single = mrml.add_segmentation(node, [("Segment_1", liver)])
    assert np.array_equal(logic.prepare_detection(node, single, liver_id).mask, liver)


def test_slicer_logic_detects_inside_the_liver_segment_on_the_input_grid(mrml, ct_case, liver_model, tmp_path):
    from SynomalyDetectionLib import MrmlBridge, SynomalyLogic

    _, ct, liver, _ = ct_case
    slicer = mrml.slicer
    node = mrml.add_volume(ct.astype(np.float32), OBLIQUE.ijk_to_ras(), name="CT")
    before = slicer.util.arrayFromVolume(node).copy()
    spleen = np.zeros_like(liver)
    spleen[:, 5:15, 40:55] = True
    body = mrml.add_segmentation(node, [("liver", liver), ("spleen", spleen)])
    outputs = SynomalyLogic(user_models_dir=tmp_path).detect(node, body, model=str(liver_model), device="cpu")
    assert np.array_equal(slicer.util.arrayFromVolume(node), before)
    for output in (outputs.counterfactual, outputs.anomaly_map):
        assert np.allclose(MrmlBridge.ijk_to_ras(output), MrmlBridge.ijk_to_ras(node))
        assert output.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    anomaly_map = slicer.util.arrayFromVolume(outputs.anomaly_map)
    assert anomaly_map[liver].max() > 0 and not anomaly_map[~liver].any()


def test_bundled_liver_model_finds_lits117_tumours_on_a_block_of_slices(liver_data):
    """The shipped model (see models/liver-ct.md) on a block of tumour slices of the patient it never saw;
    measured on the block's inner slices (the map is blurred in 3D, so a block's edge slices are weaker)."""
    from synomaly.inference.detection import DetectionSettings, detect
    from synomaly.evaluation.metrics import auprc, dice
    from synomaly.files.model_file import BUNDLED_DIR, load_model

    if not (BUNDLED_DIR / "liver-ct.safetensors").exists():
        pytest.skip("the liver-ct model is not bundled")
    model = load_model("liver-ct")
    assert model.preset == "liver-ct" and model.metadata["calibration"]["baseline_direction"] == 0
    ct, geometry = read_volume(liver_data / "lits117" / "ct.nii.gz")
    liver = read_volume(liver_data / "lits117" / "liver.nii.gz")[0] > 0
    tumour = read_volume(liver_data / "lits117" / "tumour.nii.gz")[0] > 0
    result = detect(ct, geometry, model, liver, DetectionSettings(device="cpu"), slices=range(56, 76))
    region = np.zeros_like(liver)
    region[60:72] = True
    region &= liver
    assert not result.anomaly_map[~liver].any()
    assert auprc(result.anomaly_map, tumour & region, region) > 0.85
    assert dice((result.segmentation > 0) & region, tumour & region) > 0.7


@pytest.mark.parametrize("contrast", [(-35.0, -25.0), (25.0, 35.0)], ids=["darker", "brighter"])
def test_bundled_liver_model_finds_a_lesion_of_either_kind_in_the_unenhanced_ct(liver_data, contrast):
    """A 20 mm lesion, darker or brighter than the liver by 25-35 HU, inserted into the healthy liver of the
    3 mm TotalSegmentator CT (``liver_phantoms.insert_lesions``, as in scripts/liver_ct_benchmark.py): found,
    with few healthy voxels flagged. The v1 model missed every brighter lesion."""
    from synomaly.evaluation.liver_phantoms import insert_lesions
    from synomaly.files.model_file import BUNDLED_DIR, load_model
    from synomaly.inference.detection import DetectionSettings, detect

    if not (BUNDLED_DIR / "liver-ct.safetensors").exists():
        pytest.skip("the liver-ct model is not bundled")
    ct, geometry = read_volume(liver_data / "totalseg-example" / "ct.nii.gz")
    liver = read_volume(liver_data / "totalseg-example" / "liver.nii.gz")[0] > 0
    inserted = insert_lesions(ct, liver, geometry, (20.0,), contrast, seed=11)
    lesion = inserted.lesions > 0
    result = detect(inserted.image, geometry, load_model("liver-ct"), liver, DetectionSettings(device="cpu"))
    flagged = result.segmentation > 0
    assert flagged[lesion].mean() > 0.3
    assert flagged[liver & ~lesion].mean() < 0.02
