"""Input fit: inputs unlike a model's calibration volumes are scored, warned about, or refused (issue 22:
"inputs the model does not fit are answered anyway")."""
import json
import math

import pytest

from synomaly.errors import InputError, ModelFileError
from test_cli import assert_refused, run_cli, run_detect


def test_score_is_the_distance_outside_the_range_in_widths():
    from synomaly.inference.input_fit import REFUSE_SCORE, check_fit, fit_score, reference_from

    reference = reference_from([{"p05": -0.6, "p95": 0.2, "region_ml": 1000.0},
                                {"p05": -0.4, "p95": 0.4, "region_ml": 1500.0}]
                               + [{"p05": -0.5, "p95": 0.3, "region_ml": 1200.0}] * 3, "five volumes")
    inside = fit_score({"p05": -0.5, "p95": 0.3, "region_ml": 1200.0}, reference)
    assert inside["score"] == 0 and inside["verdict"] == "typical"
    # p95 one width (0.2) above the highest calibration value; the size twice the largest, on a log scale.
    beyond = fit_score({"p05": -0.5, "p95": 0.6, "region_ml": 3000.0}, reference)  # floor width 0.2
    assert beyond["distances"]["p95"] == pytest.approx(1.0)
    assert beyond["distances"]["region_ml"] == pytest.approx(math.log(2) / math.log(1.5), abs=1e-3)
    assert beyond["worst"] == "region_ml" and beyond["verdict"] == "unusual"
    assert check_fit(beyond, reference, "m", enforce=True)[0].startswith("input unlike the m model's")
    far = fit_score({"p05": -0.5, "p95": 0.4 + 0.2 * (REFUSE_SCORE + 1)}, reference)
    with pytest.raises(InputError, match=r"95th intensity percentile .* against 0.2 to 0.4"):
        check_fit(far, reference, "m", enforce=True)
    assert check_fit(far, reference, "m", enforce=False)
    # The size and the network's change vary with anatomy and disease: far off, they warn only.
    huge = fit_score({"p05": -0.5, "region_ml": 1500.0 * 1.5 ** (REFUSE_SCORE + 2)}, reference)
    assert huge["verdict"] == "outside" and check_fit(huge, reference, "m", enforce=True)
    # A reference of fewer volumes than MIN_VOLUMES_TO_REFUSE is too narrow to refuse on.
    few = reference_from([{"p05": -0.6, "p95": 0.2}], "one volume")
    assert check_fit(fit_score({"p05": -0.5, "p95": 3.0}, few), few, "m", enforce=True)
    assert fit_score({"p05": 0.0}, None)["score"] is None


def _with_reference(tmp_path, reference):
    from synomaly.files.model_file import load_model, save_model

    model = load_model("demo-phantom")
    model.metadata["calibration"]["input_reference"] = reference
    return save_model(tmp_path / "m.safetensors", model.network, model.metadata)


def test_a_damaged_reference_is_refused_by_name(tmp_path):
    from synomaly.files.model_file import load_model

    path = _with_reference(tmp_path, {"features": {"p95": {"low": 0.5, "median": 0.4, "high": 0.3}}})
    with pytest.raises(ModelFileError, match=r"calibration\.input_reference\.features\.p95"):
        load_model(path)


def test_the_reference_leaves_the_model_id_unchanged(tmp_path):
    from synomaly.files.model_file import load_model

    bundled = load_model("demo-phantom")
    path = _with_reference(tmp_path, {"features": {"p95": {"low": 0.1, "median": 0.2, "high": 0.3}}})
    assert load_model(path).model_id == bundled.model_id


def test_bundled_models_carry_a_reference():
    from synomaly.files.model_file import BUNDLED_DIR, read_metadata

    for path in sorted(BUNDLED_DIR.glob("*.safetensors")):
        reference = read_metadata(path)["calibration"]["input_reference"]
        assert reference["volumes"] >= 3 and {"p05", "p95", "change"} <= set(reference["features"]), path.name


def _fluid_bright(phantom_case, tmp_path):
    from synomaly.evaluation.altered_inputs import t2_like
    from synomaly.files.volume_io import read_volume, write_volume

    image, geometry = read_volume(phantom_case["flair"])
    path = tmp_path / "t2like.nii.gz"
    write_volume(path, t2_like(image, image > image.min()), geometry)
    return path


def test_the_demo_model_answers_its_phantom_as_typical(phantom_case):
    from synomaly.files.model_file import load_model
    from synomaly.files.volume_io import read_volume
    from synomaly.inference.detection import DetectionSettings, detect

    image, geometry = read_volume(phantom_case["flair"])
    result = detect(image, geometry, load_model("demo-phantom"), settings=DetectionSettings(stages=1))
    fit = result.report["input_fit"]
    assert fit["verdict"] in ("typical", "close") and not result.report["warnings"], fit


def test_another_contrast_is_refused_and_answered_only_on_request(phantom_case, tmp_path):
    """A T2-like copy of the phantom (fluid bright), through the real command line: one line naming what is
    out of range, exit 2, nothing written; --no-fit-check answers, with the verdict on the result line and in
    the report."""
    foreign = _fluid_bright(phantom_case, tmp_path)
    out = tmp_path / "out"
    line = assert_refused(run_detect(foreign, "-o", out, "--stages", "1", "-q"), "far from", "--no-fit-check")
    assert "share of the region at the top of the intensity range" in line and "ranges away" in line
    assert not out.exists() or not any(out.iterdir())
    answered = run_detect(foreign, "-o", out, "--stages", "1", "-q", "--no-fit-check")
    assert answered.returncode == 0, answered.stderr
    assert "input fit outside" in answered.stdout
    assert "input unlike the demo-phantom model's" in answered.stderr
    report = json.loads(next(out.glob("*report.json")).read_text())
    assert report["input_fit"]["verdict"] == "outside" and report["input_fit"]["score"] > 3
    assert any("input unlike" in w for w in report["warnings"])


def _brain(fluid: float, tissue: float = 1.0, seed: int = 0):
    """A synthetic skull-stripped brain: tissue with noise, a 2 mm fluid layer along its border, two mirrored
    ventricles of fluid, and a lesion on one side twice as bright as the tissue."""
    import numpy as np

    from synomaly.files.geometry import Geometry

    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:40, :80, :80]
    ellipsoid = ((z - 20) / 18.0) ** 2 + ((y - 40) / 36.0) ** 2 + ((x - 40) / 30.0) ** 2
    brain = ellipsoid <= 1
    image = np.where(brain, tissue + 0.05 * rng.standard_normal(brain.shape), 0).astype(np.float32)
    image[brain & (ellipsoid > 0.9)] = fluid
    for side in (33, 47):
        image[16:24, 34:46, side - 2:side + 3] = fluid
    image[18:26, 20:28, 55:63] = 2 * tissue
    return image, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))


def test_fluid_order_tells_dark_fluid_from_bright_fluid():
    """Where a brain's extremes lie, not its histogram: dark fluid along the border and in mirrored ventricles
    (FLAIR) scores below 0; the same anatomy with bright fluid (an inverted or T2-like contrast) above it, and
    a reference of FLAIRs scores it in units of 0.05 from zero, refusing past REFUSE_SCORE."""
    from synomaly.inference.input_fit import REFUSE_SCORE, check_fit, fit_score, fluid_order, reference_from
    from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume

    config = PreprocessConfig()
    dark = fluid_order(prepare_volume(*_brain(fluid=0.3), config))["fluid_order"]
    bright = fluid_order(prepare_volume(*_brain(fluid=1.7), config))["fluid_order"]
    assert dark < -0.1 and bright > 0.1, (dark, bright)
    flairs = reference_from([{"fluid_order": v} for v in (-0.5, -0.2, -0.1, -0.07, -0.04)], "five FLAIRs")
    assert fit_score({"fluid_order": -0.01}, flairs)["score"] == 0  # less order than any FLAIR: the sign decides
    assert fit_score({"fluid_order": 0.1}, flairs)["distances"]["fluid_order"] == pytest.approx(2.0)
    with pytest.raises(InputError, match="brightness of fluid against tissue"):
        check_fit(fit_score({"fluid_order": 0.05 * (REFUSE_SCORE + 1)}, flairs), flairs, "m", enforce=True)
    either = reference_from([{"fluid_order": v} for v in (-0.2, 0.1)], "no shared sign")
    assert fit_score({"fluid_order": 0.4}, either)["score"] == 0


def test_brain_model_refuses_an_inverted_real_flair(shared_data, tmp_path):
    """A real FLAIR with its contrast inverted (T1-like; it used to flag healthy brain with a confident answer)
    is refused through the command line before the network runs; a weaker case is warned about; the FLAIR
    itself and a copy under a strong bias field keep fluid dark."""
    from synomaly.evaluation.altered_inputs import bias_field, invert
    from synomaly.files.model_file import load_model
    from synomaly.files.volume_io import read_volume, write_volume
    from synomaly.inference.input_fit import fit_score, intensity_profile
    from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume

    image, geometry = read_volume(shared_data / "brats2015" / "pat0001" / "flair.nii.gz")
    brain = read_volume(shared_data / "brats2015" / "pat0001" / "brainmask.nii.gz")[0] > 0
    write_volume(tmp_path / "inverted.nii.gz", invert(image, brain), geometry)
    write_volume(tmp_path / "brain.nii.gz", brain.astype("uint8"), geometry)
    out = tmp_path / "out"
    line = assert_refused(run_cli("detect", tmp_path / "inverted.nii.gz", "--mask", tmp_path / "brain.nii.gz",
                                  "-o", out, "-q"), "far from", "--no-fit-check")
    assert "brightness of fluid against tissue" in line
    assert not out.exists() or not any(out.iterdir())

    model = load_model("brain-flair")
    reference = model.metadata["calibration"]["input_reference"]
    config = PreprocessConfig.from_dict(model.metadata["preprocessing"])
    image, geometry = read_volume(shared_data / "brats2018" / "Brats18_2013_23_1" / "flair.nii.gz")
    fg = image > image.min()
    for kept in (image, bias_field(image, fg, 0.6)):
        profile = intensity_profile(prepare_volume(kept, geometry, config), brain=True)
        assert profile["fluid_order"] < -0.05 and fit_score(profile, reference)["score"] <= 1, profile
    profile = intensity_profile(prepare_volume(invert(image, fg), geometry, config), brain=True)
    assert fit_score(profile, reference)["distances"]["fluid_order"] > 1, profile


def test_brain_model_refuses_a_fluid_bright_copy_of_a_real_flair(shared_data):
    """A real BraTS FLAIR made T2-like (fluid bright) is refused before the network runs (the intensity
    profile alone is far enough); the FLAIR itself is not."""
    from synomaly.evaluation.altered_inputs import t2_like
    from synomaly.files.model_file import load_model
    from synomaly.files.volume_io import read_volume
    from synomaly.inference.input_fit import fit_score, intensity_profile
    from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume

    model = load_model("brain-flair")
    reference = model.metadata["calibration"]["input_reference"]
    config = PreprocessConfig.from_dict(model.metadata["preprocessing"])
    image, geometry = read_volume(shared_data / "brats2018" / "Brats18_2013_23_1" / "flair.nii.gz")
    fg = image > image.min()
    assert fit_score(intensity_profile(prepare_volume(image, geometry, config)), reference)["score"] <= 1
    profile = intensity_profile(prepare_volume(t2_like(image, fg), geometry, config))
    assert fit_score(profile, reference)["score"] > 3


def test_pipelines_alterations_are_answered_alike(phantom_case):
    """What another pipeline makes of the same phantom (a bias field, winsorised, scanner units, z-scored
    with the background set to 0) is not refused; a change of scale or winsorising leaves the anomalous volume
    near the original's (a bias field does not: the demo model never saw one, and says nothing of it)."""
    from synomaly.evaluation.altered_inputs import ACCEPTABLE
    from synomaly.files.model_file import load_model
    from synomaly.files.volume_io import read_volume
    from synomaly.inference.detection import DetectionSettings, detect

    model = load_model("demo-phantom")
    image, geometry = read_volume(phantom_case["flair"])
    brain = read_volume(phantom_case["brainmask"])[0] > 0
    settings = DetectionSettings(stages=1)
    original = detect(image, geometry, model, settings=settings).report["anomalous_volume_ml"]
    for name, alter in ACCEPTABLE.items():
        report = detect(alter(image, brain), geometry, model, settings=settings).report
        assert report["input_fit"]["score"] <= 1.0, (name, report["input_fit"])
        if not name.startswith("bias"):
            assert report["anomalous_volume_ml"] == pytest.approx(original, rel=0.2, abs=0.2), name


def test_liver_model_refuses_a_brain_flair_and_answers_another_phase(shared_data, liver_data):
    """The liver model given a brain FLAIR with its brain as the mask (it used to answer "0 mL") is refused on
    its intensity profile; a liver CT 30 HU brighter (another contrast phase, inside the training
    augmentation) is not."""
    from synomaly.evaluation.liver_phantoms import shift_phase
    from synomaly.files.model_file import load_model
    from synomaly.files.volume_io import read_volume
    from synomaly.inference.input_fit import fit_score, intensity_profile
    from synomaly.inference.preprocessing import PreprocessConfig, foreground_mask, prepare_volume

    model = load_model("liver-ct")
    reference = model.metadata["calibration"]["input_reference"]
    config = PreprocessConfig.from_dict(model.metadata["preprocessing"])
    flair, geometry = read_volume(shared_data / "brats2018" / "Brats18_2013_23_1" / "flair.nii.gz")
    profile = intensity_profile(prepare_volume(flair, geometry, config, foreground_mask(flair)))
    assert fit_score(profile, reference)["distances"]["saturated"] > 3
    ct, geometry = read_volume(liver_data / "ircad17" / "ct.nii.gz")
    liver = read_volume(liver_data / "ircad17" / "liver.nii.gz")[0] > 0
    profile = intensity_profile(prepare_volume(shift_phase(ct, liver, 30.0), geometry, config, liver))
    assert fit_score(profile, reference)["score"] <= 1
