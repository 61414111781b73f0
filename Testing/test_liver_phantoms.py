"""Liver CT v2's ingredients: altered copies of CTs (thicker slices, another phase, inserted lesions), the
two-sided HU baseline, the phase-shift augmentation, and thicker training copies holding out the same stretch
of the body as their scan. Synthetic volumes here; one real CT (lits117) where ../shared/data exists."""
import numpy as np
import pytest

from synomaly.errors import InputError
from synomaly.evaluation.liver_phantoms import insert_lesions, shift_phase, thicker_slices
from synomaly.files.geometry import Geometry

LIVER_HU = 100.0


def abdomen(shape=(60, 80, 80), spacing=(0.8, 0.8, 1.0), seed=0):
    """A CT-like volume in HU: fat body, an ellipsoidal liver at about 100 HU with noise; its liver mask."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    body = ((yy - 40) / 38) ** 2 + ((xx - 40) / 38) ** 2 < 1
    liver = ((zz - 30) / 26) ** 2 + ((yy - 40) / 30) ** 2 + ((xx - 40) / 30) ** 2 < 1
    image = np.where(body, -80.0, -1000.0) + np.where(liver, LIVER_HU + 80.0, 0.0)
    image = (image + rng.normal(0, 8, shape)).astype(np.float32)
    geometry = Geometry(spacing, (10.0, -5.0, 3.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return image, geometry, liver


def test_thicker_slices_average_the_thin_ones_and_keep_the_body_where_it_was():
    image, geometry, liver = abdomen()
    slab = np.zeros_like(liver)
    slab[20:30] = True  # 10 mm of the 1 mm slices
    thick, g5, (liver5, slab5) = thicker_slices(image, geometry, 5.0, [liver, slab])
    assert thick.shape == (12, 80, 80) and liver5.shape == thick.shape and g5.spacing == (0.8, 0.8, 5.0)
    # The first new slice's centre lies 2 mm (2.5 mm from the first thin slice's edge) along k.
    assert np.allclose(g5.origin, (10.0, -5.0, 5.0)) and g5.direction == geometry.direction
    assert slab5.sum(axis=(1, 2)).astype(bool).sum() == 2  # 10 mm of tissue: two 5 mm slices
    # Averaging keeps the liver's level and lowers its noise (about sqrt(5) for 5 slices).
    inside = thick[6, 30:50, 30:50]  # deep inside the liver
    assert abs(np.median(inside) - LIVER_HU) < 3 and inside.std() < 8 / 1.8
    assert image.dtype == np.float32 and abs(float(image[liver].mean()) - LIVER_HU) < 1  # input untouched
    with pytest.raises(InputError, match="makes slices thicker"):
        thicker_slices(image, geometry, 1.0)


def test_shift_phase_moves_the_liver_only():
    image, _, liver = abdomen()
    shifted = shift_phase(image, liver, -30)
    assert np.allclose(shifted[liver], image[liver] - 30) and np.array_equal(shifted[~liver], image[~liver])


@pytest.mark.parametrize("contrast", [(-40.0, -20.0), (20.0, 40.0)])
def test_inserted_lesions_are_spheres_of_the_asked_size_and_contrast_inside_healthy_liver(contrast):
    image, geometry, liver = abdomen()
    tumour = np.zeros_like(liver)
    tumour[25:35, 35:45, 20:30] = True
    before = image.copy()
    out = insert_lesions(image, liver, geometry, (20.0, 10.0), contrast, seed=3, avoid=tumour)
    assert np.array_equal(image, before)
    assert out.diameters_mm == [20.0, 10.0] and len(out.centres_zyx) == 2
    voxel = float(np.prod(geometry.spacing))
    for k, d in ((1, 20.0), (2, 10.0)):
        lesion = out.lesions == k
        assert abs(lesion.sum() * voxel / (np.pi / 6 * d ** 3) - 1) < 0.15
        assert liver[lesion].all() and not (lesion & tumour).any()
        step = float(np.median(out.image[lesion] - image[lesion]))  # the edge fades over EDGE_MM
        assert contrast[0] - 1 < step < contrast[1] + 1 and abs(step - out.contrasts_hu[k - 1]) < 1
    assert np.array_equal(out.image[~liver], image[~liver])  # nothing changes outside the liver
    again = insert_lesions(image, liver, geometry, (20.0, 10.0), contrast, seed=3, avoid=tumour)
    assert np.array_equal(again.lesions, out.lesions)


def test_a_lesion_too_big_for_the_liver_is_refused():
    image, geometry, liver = abdomen()
    with pytest.raises(InputError, match="no room for a 80 mm lesion"):
        insert_lesions(image, liver, geometry, (80.0,), (-30.0, -20.0), seed=0)


def test_two_sided_baseline_scores_darker_and_brighter_lesions_whatever_the_phase():
    from synomaly.inference.baseline import baseline_for
    from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume

    image, geometry, liver = abdomen()
    dark = insert_lesions(image, liver, geometry, (15.0,), (-40.0, -40.0), seed=1)
    both = insert_lesions(dark.image, liver, geometry, (15.0,), (40.0, 40.0), seed=2, avoid=dark.lesions > 0)
    config = PreprocessConfig(intensity="window", window=(0.0, 150.0), image_size=64)

    def scores(volume):
        return baseline_for(prepare_volume(volume, geometry, config, liver), 5, 0)

    plain = scores(both.image)
    healthy = liver & (dark.lesions == 0) & (both.lesions == 0)
    level = np.percentile(plain[healthy], 99)
    assert np.median(plain[dark.lesions > 0]) > level and np.median(plain[both.lesions > 0]) > level
    # Another phase moves the liver's own median with it: the scores stay where they were.
    assert np.allclose(scores(shift_phase(both.image, liver, -25)), plain, atol=0.02)
    with pytest.raises(InputError, match="direction"):
        baseline_for(prepare_volume(image, geometry, config, liver), 5, 2)


def test_intensity_shift_moves_each_image_inside_the_mask_by_one_amount():
    import torch

    from synomaly.training.settings import TrainingSettings
    from synomaly.training.slices import augment

    x = torch.full((16, 1, 8, 8), -0.2)
    m = torch.zeros(16, 1, 8, 8, dtype=torch.bool)
    m[:, :, 2:6, 2:6] = True
    settings = TrainingSettings(intensity_augment=0.0, flips="none", intensity_shift=0.2)
    y, _, _ = augment(x.clone(), m, settings, torch.Generator().manual_seed(0))
    shifts = (y - x)[m.expand_as(y)].view(16, -1)
    assert torch.allclose(shifts, shifts[:, :1].expand_as(shifts))  # one shift per image
    assert shifts.abs().max() <= 0.4 + 1e-6 and shifts[:, 0].std() > 0.1  # up to 0.2 of the 2-wide window
    assert torch.equal(y[~m.expand_as(y)], x[~m.expand_as(x)])
    with pytest.raises(InputError, match="intensity shift"):
        TrainingSettings(intensity_shift=1.5).validate()


def test_a_thicker_copy_in_its_scans_group_holds_out_the_same_stretch_and_calibrates_on_none():
    from synomaly.inference.preprocessing import PreprocessConfig
    from synomaly.training.cases import TrainingCase
    from synomaly.training.settings import TrainingSettings
    from synomaly.training.slices import extract_slices

    image, geometry, liver = abdomen(shape=(64, 48, 48))
    thick, g2, (liver2,) = thicker_slices(image, geometry, 2.0, [liver])
    cases = [TrainingCase("scan", image, geometry, liver, None, "p1"),
             TrainingCase("scan-2mm", thick, g2, liver2, None, "p1")]
    config = PreprocessConfig(intensity="window", window=(0.0, 150.0), image_size=32)
    settings = TrainingSettings(preset="liver-ct", min_slice_foreground=0.01, validation_fraction=0.2)
    data = extract_slices(cases, settings, config)
    held = data.validation[0]
    assert held and data.validation[1] == []
    lo, hi = min(held) / 64, (max(held) + 1) / 64
    per_case = {c["case"]: c["train_slices"] for c in data.summary["cases"]}
    # The copy trains on none of its slices that overlap the held-out stretch, and on all the others.
    overlapping = [z for z in range(32) if z / 32 < hi and (z + 1) / 32 > lo]
    assert overlapping and per_case["scan-2mm"] <= 32 - len(overlapping)
    usable = [z for z in range(32) if liver2[z].mean() >= 0.01]
    assert per_case["scan-2mm"] == len(usable) - len(set(overlapping) & set(usable))


def test_lesions_fit_into_the_healthy_liver_of_a_real_ct(liver_data):
    from synomaly.files.volume_io import read_volume

    ct, geometry = read_volume(liver_data / "lits117" / "ct.nii.gz")
    liver = read_volume(liver_data / "lits117" / "liver.nii.gz")[0] > 0
    tumour = read_volume(liver_data / "lits117" / "tumour.nii.gz")[0] > 0
    out = insert_lesions(ct, liver, geometry, (20.0, 10.0), (20.0, 40.0), seed=7, avoid=tumour)
    assert [int((out.lesions == k).any()) for k in (1, 2)] == [1, 1]
    with pytest.raises(InputError, match="no room for a 30 mm lesion"):  # its healthy liver is thin (see README)
        insert_lesions(ct, liver, geometry, (30.0,), (20.0, 40.0), seed=7, avoid=tumour)
    assert not ((out.lesions > 0) & tumour).any() and liver[out.lesions > 0].all()
