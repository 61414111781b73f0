"""Evaluation: case discovery, metric wiring, axial cropping, outputs end to end, and a real BraTS case."""
import contextlib
import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from synomaly.errors import InputError
from synomaly.evaluation.cases import EvalCase, find_eval_cases
from synomaly.evaluation.evaluate import case_metrics, crop_axial, evaluate
from synomaly.evaluation.report import ORACLE_LABEL, format_table, summarise
from synomaly.evaluation.phantom import write_phantom_case
from synomaly.files.geometry import Geometry

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PHANTOM_SHAPE = (32, 64, 64)
RATIOS = ("dice", "iou", "precision", "recall", "auprc", "auroc", "fpr_healthy", "slice_dice",
          "oracle_best_threshold_dice", "ssim_healthy_slices")


@contextlib.contextmanager
def _one_torch_thread():
    """On a busy shared CPU two spinning torch threads run several times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with _one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small model trained for a few seconds on healthy phantoms: wiring, not accuracy."""
    from synomaly.files.model_file import load_model
    from synomaly.training.loop import train
    from synomaly.training.settings import TrainingSettings

    root = tmp_path_factory.mktemp("healthy")
    for seed in range(3):
        write_phantom_case(root / f"h{seed}", seed=100 + seed, lesion=False, shape=PHANTOM_SHAPE)
    out = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    with _one_torch_thread():
        train([root], out, TrainingSettings(steps=40, batch_size=8, base_channels=16, num_res_blocks=1,
                                            image_size=64, checkpoint_every=20, preview_every=20, device="cpu"))
    return load_model(out)


@pytest.fixture(scope="session")
def lesion_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesion")
    for seed in (7, 8):
        write_phantom_case(root / f"case{seed}", seed=seed, lesion=True, shape=PHANTOM_SHAPE)
    return root


def _touch(folder: Path, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def _strict_json(path: Path):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


# Discovery ----------------------------------------------------------------------------------------

def test_case_folder_follows_training_naming(tmp_path):
    _touch(tmp_path / "pat1", "flair.nii.gz", "brainmask.nii.gz", "seg.nii.gz", "notes.txt")
    (case,) = find_eval_cases([tmp_path / "pat1"])
    assert case.name == "pat1"
    assert case.image_path.name == "flair.nii.gz"
    assert case.label_path.name == "seg.nii.gz"
    assert case.mask_path.name == "brainmask.nii.gz"


def test_folder_of_case_folders_skips_other_content(tmp_path):
    _touch(tmp_path / "b", "t2.nrrd", "lesion_label.nrrd")
    _touch(tmp_path / "a", "flair.nii", "seg.nii")
    _touch(tmp_path / "empty")
    _touch(tmp_path, "README.md")
    cases = find_eval_cases([tmp_path])
    assert [c.name for c in cases] == ["a", "b"]
    assert cases[0].mask_path is None
    assert cases[1].label_path.name == "lesion_label.nrrd"


def test_csv_with_relative_paths_and_unique_names(tmp_path):
    _touch(tmp_path / "data" / "p1", "flair.nii.gz", "seg.nii.gz", "mask.nii.gz")
    _touch(tmp_path / "data" / "p2", "flair.nii.gz", "seg.nii.gz")
    csv_path = tmp_path / "lists" / "cases.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("Image,Label,Mask\n"
                        "../data/p1/flair.nii.gz,../data/p1/seg.nii.gz,../data/p1/mask.nii.gz\n"
                        "../data/p2/flair.nii.gz,../data/p2/seg.nii.gz,\n"
                        ",,\n")
    cases = find_eval_cases([csv_path])
    assert [c.name for c in cases] == ["p1_flair", "p2_flair"]
    assert cases[0].image_path == csv_path.parent / "../data/p1/flair.nii.gz"
    assert cases[0].image_path.exists() and cases[0].mask_path.exists()
    assert cases[1].mask_path is None

    named = tmp_path / "named.csv"
    named.write_text(f"image,label,name\n{tmp_path}/data/p1/flair.nii.gz,data/p1/seg.nii.gz,first case\n")
    (case,) = find_eval_cases([named])
    assert case.name == "first_case"
    assert case.label_path == tmp_path / "data" / "p1" / "seg.nii.gz"


def test_missing_label_is_a_clear_error(tmp_path):
    _touch(tmp_path / "nolabel", "flair.nii.gz", "brainmask.nii.gz")
    with pytest.raises(InputError, match="no label"):
        find_eval_cases([tmp_path / "nolabel"])
    with pytest.raises(InputError, match="no label"):
        find_eval_cases([tmp_path])
    _touch(tmp_path / "ok", "flair.nii.gz", "seg.nii.gz")
    bad_csv = tmp_path / "cases.csv"
    bad_csv.write_text("image,label\nok/flair.nii.gz,\n")
    with pytest.raises(InputError, match="no label"):
        find_eval_cases([bad_csv])
    with pytest.raises(InputError, match="columns 'image' and 'label'"):
        (tmp_path / "cols.csv").write_text("image\nok/flair.nii.gz\n")
        find_eval_cases([tmp_path / "cols.csv"])
    with pytest.raises(InputError, match="does not exist"):
        (tmp_path / "gone.csv").write_text("image,label\nok/flair.nii.gz,ok/missing.nii.gz\n")
        find_eval_cases([tmp_path / "gone.csv"])
    with pytest.raises(InputError, match="no ground truth"):
        find_eval_cases([tmp_path / "ok" / "flair.nii.gz"])


# Metric wiring ------------------------------------------------------------------------------------

def _block_case():
    """Foreground box, a 4x4x4 lesion (64 voxels) with one more lesion voxel outside the foreground."""
    shape = (10, 20, 20)
    fg = np.zeros(shape, bool)
    fg[1:9, 2:18, 2:18] = True
    gt = np.zeros(shape, np.uint8)
    gt[3:7, 6:10, 6:10] = 1
    return shape, fg, gt


def test_perfect_prediction_scores_perfectly():
    shape, fg, gt = _block_case()
    vol = np.where(fg, 100.0, 0.0).astype(np.float32) + 50.0 * gt
    m = case_metrics(gt.astype(np.float32), gt, gt, fg, (1.0, 1.0, 2.0), vol, vol)
    for key in ("dice", "iou", "precision", "recall", "auprc", "auroc", "slice_dice",
                "oracle_best_threshold_dice", "ssim_healthy_slices"):
        assert m[key] == pytest.approx(1.0), key
    assert m["hd95_mm"] == 0.0
    assert m["fpr_healthy"] == 0.0
    assert m["counts"]["tp"] == 64 and m["counts"]["fp"] == 0


def test_metrics_match_hand_computation():
    shape, fg, gt = _block_case()
    gt[0, 0, 0] = 1                      # lesion outside the foreground: a miss that still counts
    seg = np.zeros(shape, np.uint8)
    seg[3:7, 6:10, 6:8] = 1              # half the in-foreground lesion: 32 TP
    seg[3:7, 12:14, 12:14] = 1           # 16 FP in healthy foreground
    scores = seg.astype(np.float32)
    m = case_metrics(scores, seg, gt, fg, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 32 / (48 + 65))
    assert m["iou"] == pytest.approx(32 / (48 + 65 - 32))
    assert m["precision"] == pytest.approx(32 / 48)
    assert m["recall"] == pytest.approx(32 / 65)
    assert m["fpr_healthy"] == pytest.approx(16 / (fg.sum() - 64))
    assert m["counts"] == {"tp": 32, "fp": 16, "fn": 33, "tn": gt.size - 32 - 16 - 33,
                           "fp_foreground": 16, "healthy_foreground": int(fg.sum() - 64)}
    # 4 slices with 8 TP, 12 predicted, 16 lesion; slice 0 holds only the missed outside voxel (Dice 0).
    assert m["slice_dice"] == pytest.approx(np.mean([2 * 8 / (12 + 16)] * 4 + [0.0]))
    assert m["ssim_healthy_slices"] is None
    assert 0 < m["hd95_mm"] < math.inf
    # AUPRC: in the foreground 32 lesion voxels score 1 with 16 healthy ones; 32 lesion voxels score 0.
    n_neg = int(fg.sum()) - 64 - 16
    assert m["auprc"] == pytest.approx(0.5 * 32 / 48 + 0.5 * 64 / (64 + 16 + n_neg))
    no_threshold = case_metrics(scores, None, gt, fg, (1.0, 1.0, 1.0))
    assert no_threshold["dice"] is None and no_threshold["hd95_mm"] is None
    assert no_threshold["auprc"] == m["auprc"]


def test_summary_pools_counts_and_means_cases():
    shape, fg, gt = _block_case()
    good = case_metrics(gt.astype(np.float32), gt, gt, fg, (1.0, 1.0, 1.0))
    empty = case_metrics(np.zeros(shape, np.float32), np.zeros(shape, np.uint8), gt, fg, (1.0, 1.0, 1.0))
    records = [{"ours": good, "baseline": good}, {"ours": empty, "baseline": good}]
    s = summarise(records)
    assert s["ours"]["mean"]["dice"] == pytest.approx(0.5)
    assert s["ours"]["pooled"]["dice"] == pytest.approx(2 * 64 / (64 + 128))
    assert s["ours"]["mean"]["hd95_mm"] == 0.0 and s["ours"]["infinite_cases"] == {"hd95_mm": 1}
    assert s["ours"]["defined_cases"]["precision"] == 1
    assert s["baseline"]["pooled"]["dice"] == pytest.approx(1.0)
    assert "(1 inf)" in format_table({"cases": [], "summary": s})


# Axial cropping -----------------------------------------------------------------------------------

def _sitk_origin_of_block(array, geometry, axis, start, stop):
    """Reference: SimpleITK's own slicing computes the origin of a sub-image."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    geometry.apply_to_sitk(image)
    index = [slice(None)] * 3
    index[2 - axis] = slice(start, stop)
    return np.asarray(image[tuple(index)].GetOrigin())


@pytest.mark.parametrize("direction, axial_axis", [
    ((1, 0, 0, 0, 1, 0, 0, 0, 1), 0),
    ((1, 0, 0, 0, -1, 0, 0, 0, -1), 0),
    ((0, 0, 1, 1, 0, 0, 0, 1, 0), 1),     # ITK axis j runs along z (S): numpy axis 1 is axial
    ((0, 1, 0, 0, 0, 1, 1, 0, 0), 2),     # ITK axis i runs along z (S): numpy axis 2 is axial
])
def test_crop_keeps_geometry_and_lesion(direction, axial_axis):
    shape = (30, 24, 28)
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    lesion = [slice(10, 14), slice(8, 12), slice(9, 13)]
    lesion[axial_axis] = slice(17, 23)
    label[tuple(lesion)] = 1
    mask = np.ones(shape, np.uint8)
    geometry = Geometry((0.9, 1.1, 2.5), (10.0, -20.0, 30.0), tuple(float(d) for d in direction))
    img_c, geo_c, lab_c, mask_c, block = crop_axial(image, geometry, label, mask, 4)
    assert block == {"axis": axial_axis, "start": 18, "stop": 22}
    assert img_c.shape[axial_axis] == 4 and lab_c.shape == img_c.shape == mask_c.shape
    assert lab_c.sum() > 0 and np.all(lab_c.any(axis=tuple(a for a in range(3) if a != axial_axis)))
    np.testing.assert_allclose(geo_c.origin, _sitk_origin_of_block(image, geometry, axial_axis, 18, 22), atol=1e-9)
    assert geo_c.spacing == geometry.spacing and geo_c.direction == geometry.direction
    index = [slice(None)] * 3
    index[axial_axis] = slice(18, 22)
    np.testing.assert_array_equal(img_c, image[tuple(index)])

    whole = crop_axial(image, geometry, label, None, 100)
    assert whole[1] == geometry and whole[3] is None and whole[0].shape == shape
    with pytest.raises(InputError, match="max_slices"):
        crop_axial(image, geometry, label, mask, 0)


# End to end ---------------------------------------------------------------------------------------

def _check_ranges(method: dict, ours: bool):
    for key in RATIOS:
        value = method[key]
        if key == "ssim_healthy_slices" and not ours:
            assert value is None
            continue
        assert value is None or -1.0 <= value <= 1.0 + 1e-9, (key, value)
    assert method["hd95_mm"] == "inf" or method["hd95_mm"] >= 0.0


def test_evaluate_writes_json_markdown_and_panels(tiny_model, lesion_cases, tmp_path):
    from skimage.io import imread

    from synomaly.inference.detection import DetectionSettings

    calls = []
    out = tmp_path / "eval"
    result = evaluate([lesion_cases], tiny_model, DetectionSettings(device="cpu", batch_size=32), out,
                      progress=lambda f, m: calls.append((f, m)))
    saved = _strict_json(out / "evaluation.json")
    assert saved == result
    assert {"model", "threshold", "baseline", "target_fpr", "settings", "cases", "summary", "notes",
            "oracle_label"} <= set(saved)
    assert saved["oracle_label"] == ORACLE_LABEL
    assert saved["model"]["model_id"] == tiny_model.model_id
    assert saved["threshold"]["value"] == pytest.approx(tiny_model.threshold)
    calibration = tiny_model.metadata["calibration"]
    assert saved["baseline"]["threshold"] == pytest.approx(calibration["baseline_threshold"])
    assert "same healthy voxels" in saved["baseline"]["threshold_source"]
    assert [c["name"] for c in saved["cases"]] == ["case7", "case8"]
    for case in saved["cases"]:
        assert case["lesion_voxels"] > 0 and case["axial_block"] is None
        _check_ranges(case["ours"], ours=True)
        _check_ranges(case["baseline"], ours=False)
        # Next to each of our figures, the baseline's, computed (the model carries its threshold).
        for key in ("dice", "auprc", "auroc", "hd95_mm", "fpr_healthy", "slice_dice"):
            assert key in case["baseline"] and case["baseline"][key] is not None, key
        # The phantom lesion is mostly bright (mixed, with parts as bright as healthy caps and cortex):
        # the baseline ranks it well, not perfectly.
        assert case["baseline"]["auroc"] > 0.8
        assert 0.0 <= case["ours"]["ssim_healthy_slices"] <= 1.0   # the lesion leaves tumour-free slices
        image = imread(str(out / case["panel"]))
        assert image.ndim == 3 and image.shape[2] == 3 and image.shape[1] > 4 * 64  # four labelled columns
        # Ground-truth contour (green) is visible: the rows go through the lesion.
        assert np.all(image == (0, 255, 0), axis=-1).sum() > 10
    for method in ("ours", "baseline"):
        assert set(saved["summary"][method]) >= {"mean", "pooled", "defined_cases", "pooled_fpr_within_target"}
        assert 0.0 <= saved["summary"][method]["pooled"]["auprc"] <= 1.0
    table = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "| case | Dice ours | Dice base | AUPRC ours | AUPRC base" in table
    assert "| case7 |" in table and "| **mean** |" in table and ORACLE_LABEL in table
    assert format_table(saved) in table
    assert len(format_table(saved).splitlines()) == 2 + 2 + 2
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0.0 <= fractions[0]
    assert not list(out.glob(".tmp-*"))


def test_baseline_without_calibrated_threshold_reports_only_threshold_free(tiny_model, lesion_cases, tmp_path):
    from synomaly.inference.detection import DetectionSettings
    from synomaly.files.model_file import SynomalyModel

    metadata = copy.deepcopy(tiny_model.metadata)
    del metadata["calibration"]["baseline_threshold"]
    model = SynomalyModel(tiny_model.network, metadata, tiny_model.path)
    case = EvalCase("only", lesion_cases / "case7" / "flair.nii.gz", lesion_cases / "case7" / "seg.nii.gz",
                    lesion_cases / "case7" / "brainmask.nii.gz")
    result = evaluate([case], model, DetectionSettings(device="cpu", batch_size=32), tmp_path, max_slices=6)
    base = result["cases"][0]["baseline"]
    assert base["dice"] is None and base["fpr_healthy"] is None and base["hd95_mm"] is None
    assert 0.5 < base["auprc"] <= 1.0 and 0.5 < base["auroc"] <= 1.0
    assert result["baseline"]["threshold"] is None and "absent" in result["baseline"]["threshold_source"]
    assert any("no baseline threshold" in n for n in result["notes"])
    assert result["cases"][0]["axial_block"]["stop"] - result["cases"][0]["axial_block"]["start"] == 6
    assert result["cases"][0]["shape_zyx"][0] == 6


def test_real_brats_case_on_a_few_slices(tiny_model, tmp_path):
    from synomaly.inference.detection import DetectionSettings
    from synomaly.files.model_file import BUNDLED_DIR, load_model

    case_dir = DATA / "brats2015" / "pat0001"
    if not (case_dir / "flair.nii.gz").exists():
        pytest.skip(f"BraTS data not found at {case_dir}; CI provides it")
    bundled = BUNDLED_DIR / "brain-flair.safetensors"
    model = load_model(bundled) if bundled.exists() else tiny_model
    result = evaluate([case_dir], model, DetectionSettings(device="cpu", batch_size=16), tmp_path, max_slices=8)
    (case,) = result["cases"]
    assert case["name"] == "pat0001"
    assert case["shape_zyx"] == [8, 240, 240]
    assert case["lesion_voxels"] > 1000 and case["lesion_voxels_outside_foreground"] >= 0
    for method in ("ours", "baseline"):
        for key in ("dice", "auprc", "auroc", "fpr_healthy", "slice_dice", "oracle_best_threshold_dice"):
            value = case[method][key]
            assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, (method, key, value)
    # A FLAIR tumour is bright: the intensity baseline must rank it far above chance.
    assert case["baseline"]["auroc"] > 0.8
    assert (tmp_path / "pat0001_panel.png").stat().st_size > 1000
    assert "pat0001" in (tmp_path / "evaluation.md").read_text(encoding="utf-8")


def test_cases_csv_lists_pick_their_use(lesion_cases, tmp_path):
    from synomaly.evaluation.cases import cases_from_list

    listing = tmp_path / "cases.csv"
    rel = os.path.relpath(lesion_cases, tmp_path)
    listing.write_text(f"case,folder,use,label\nA7,{rel}/case7,development,seg>0\nB8,{rel}/case8,training,seg>0\n")
    cases = cases_from_list(listing)
    assert [(c.name, c.image_path.parent.name) for c in cases] == [("A7", "case7")]
    assert [c.name for c in cases_from_list(listing, use="training")] == ["B8"]
    with pytest.raises(InputError, match="no case with use 'test'.*development, training"):
        cases_from_list(listing, use="test")
    (tmp_path / "bad.csv").write_text("image,label\na.nii.gz,b.nii.gz\n")
    with pytest.raises(InputError, match="case, folder and use"):
        cases_from_list(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("case,folder,use\nX,nowhere,development\n")
    with pytest.raises(InputError, match="line 2: case X: folder .*nowhere does not exist"):
        cases_from_list(tmp_path / "gone.csv")
