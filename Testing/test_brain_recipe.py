"""The brain model's recipe: a seeded split by patient, and the packed copies a GPU machine trains on."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SynomalyEngine" / "scripts"))

import brain_flair_recipe as recipe  # noqa: E402


def test_the_split_is_by_patient_seeded_and_never_touches_development_cases(shared_data):
    rows = recipe.training_rows(shared_data / "cases.csv")
    fitting, selection = recipe.split_patients(rows)
    assert len(rows) == 28 and len(selection) == recipe.N_SELECTION == 6 and len(fitting) == 22
    assert not {r["case"] for r in fitting} & {r["case"] for r in selection}
    assert all(r["use"] == "training" for r in rows)
    again = recipe.split_patients(list(reversed(rows)))[1]  # the order of the list does not matter
    assert [r["case"] for r in again] == [r["case"] for r in selection]


def test_a_packed_case_comes_back_within_the_quantisation_step():
    from synomaly.evaluation.phantom import make_phantom
    from synomaly.training.cases import TrainingCase
    from synomaly.files.geometry import Geometry

    ph = make_phantom(shape=(20, 48, 48), seed=2, lesion=True)
    geometry = Geometry((0.9, 1.1, 2.0), (-10.0, 5.0, 3.0), (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    mask = ph.volume > 0
    case = TrainingCase("p", ph.volume, geometry, mask, ph.lesion_mask > 0)
    back = recipe.unpack_case("p", recipe.pack_case(case))
    box = tuple(slice(int(a), int(a) + n) for a, n in zip(np.argwhere(mask | case.labels).min(0) - 8, back.image.shape))
    box = tuple(slice(max(s.start, 0), max(s.start, 0) + (s.stop - s.start)) for s in box)
    step = (ph.volume.max() - ph.volume.min()) / 255
    assert np.abs(back.image - case.image[box]).max() <= step / 2 + 1e-5
    assert np.array_equal(back.mask, mask[box]) and np.array_equal(back.labels, case.labels[box])
    # The crop's corner sits where it sat in the whole volume.
    corner = np.array([b.start for b in box])[::-1] * np.array(geometry.spacing)
    expected = np.array(geometry.origin) + np.array(geometry.direction).reshape(3, 3) @ corner
    np.testing.assert_allclose(back.geometry.origin, expected)
    assert back.geometry.spacing == geometry.spacing and back.geometry.direction == geometry.direction


def test_less_work_variants_change_the_work_and_leave_the_model_as_it_was():
    import do_less_work
    from synomaly.files.model_file import load_model
    from synomaly.evaluation.phantom import make_phantom
    from synomaly.training.cases import TrainingCase
    from synomaly.files.geometry import Geometry

    ph = make_phantom(shape=(24, 64, 64), seed=4, lesion=True)
    case = TrainingCase("p", ph.volume, Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                        ph.volume > 0, ph.lesion_mask > 0)
    model = load_model("demo-phantom")
    before = (dict(model.metadata["inference"]), dict(model.metadata["preprocessing"]))
    figures = {name: do_less_work.run_variant(model, [case], do_less_work.VARIANTS[name], "cpu")[0]
               for name in ("default", "one-stage", "foreground-0.10")}
    assert (dict(model.metadata["inference"]), dict(model.metadata["preprocessing"])) == before
    assert figures["one-stage"]["evaluations"] == figures["one-stage"]["slices"] < figures["default"]["evaluations"]
    assert figures["foreground-0.10"]["slices"] < figures["default"]["slices"]
    assert 0.0 <= figures["default"]["auprc"] <= 1.0 and 0.0 <= figures["default"]["fpr"] <= 1.0


def test_small_lesion_scoring_counts_spheres_found_and_false_components():
    from small_lesions import score_segmentation

    labels = np.zeros((20, 40, 40), dtype=bool)
    labels[2:6, 30:36, 30:36] = True  # the tumour
    found, missed = np.zeros_like(labels), np.zeros_like(labels)
    found[8:11, 5:8, 5:8] = True
    missed[8:11, 20:23, 5:8] = True
    seg = np.zeros_like(labels)
    seg[9, 6, 6] = True  # touches the first sphere
    seg[15:17, 15:17, 30:32] = True  # far from everything: false
    seg[5:8, 34:37, 34:37] = True  # touches the tumour: not false
    hits, false = score_segmentation(seg, [(5.0, found), (3.0, missed)], labels)
    assert hits == [5.0] and false == 1


def test_a_fine_map_variant_leaves_the_model_as_it_was():
    from calibrate_fine_map import variant
    from synomaly.files.model_file import load_model

    model = load_model("demo-phantom")
    before = dict(model.metadata["inference"])
    other = variant(model, blur_mm=1.0, fine_gain=0.0)
    assert model.metadata["inference"] == before
    assert other.metadata["inference"] == {**before, "blur_mm": 1.0, "fine_gain": 0.0}
    assert other.network is model.network  # the same weights, no copy
