"""Carotid ultrasound: 2D images through reading, the vessel disc, the plaque inserter, training and detection.

2D images are volumes of one slice; the carotid-us preset takes them (its organ region is a disc around
the lumen mask), the 3D presets refuse them with the reason. Real CLI processes and tiny real training
runs; the real carotid images where ``../shared/data`` has them.
"""
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from synomaly.errors import InputError, OutputError
from synomaly.evaluation.plaque import PlaqueSettings, insert_plaque
from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume
from synomaly.method.presets import PRESETS
from synomaly.inference.vessel_disc import vessel_disc
from synomaly.files.geometry import Geometry
from synomaly.files.volume_io import is_2d, read_volume, write_volume
from test_cli import assert_refused, ok, run_cli, snapshot

CAROTID = PRESETS["carotid-us"]


def ultrasound_like(shape=(96, 112), centre=(48, 56), radius=20, seed=0):
    """A dark round lumen in a bright speckled wall ring on mid-grey tissue, and its lumen mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    r = np.hypot(yy - centre[0], xx - centre[1])
    image = 60 + 15 * rng.standard_normal(shape)
    image[(r > radius) & (r <= radius + 5)] = 170 + 20 * rng.standard_normal(((r > radius) & (r <= radius + 5)).sum())
    image[r <= radius] = 6 + 3 * rng.standard_normal((r <= radius).sum())
    return np.clip(image, 0, 255).astype(np.uint8), r <= radius


def write_rgb(path, grey, spacing=(1.0, 1.0), tint=0):
    """Grey stored as RGB, as the carotid data are; ``tint`` makes the red channel differ (real colour)."""
    rgb = np.stack([np.clip(grey.astype(int) + tint, 0, 255), grey, grey], axis=-1).astype(np.uint8)
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def carotid_images(shared_data, n=None):
    folder = shared_data / "carotid-us" / "images"
    if not folder.is_dir():
        pytest.skip(f"carotid images not found at {folder}; CI provides them")
    images = sorted(folder.glob("*.png"))
    return images[:n] if n else images


# --- reading 2D images ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".jpg", ".dcm"])
def test_rgb_encoded_grey_reads_as_a_grey_volume_of_one_slice(tmp_path, suffix):
    grey, _ = ultrasound_like()
    path = write_rgb(tmp_path / f"image{suffix}", grey, spacing=(0.1, 0.2) if suffix != ".jpg" else (1.0, 1.0))
    notes = []
    array, geometry = read_volume(path, notes)
    assert array.shape == (1,) + grey.shape and array.dtype == np.uint8 and is_2d(array.shape)
    if suffix != ".jpg":  # JPEG is lossy
        assert np.array_equal(array[0], grey)
        assert geometry.spacing == pytest.approx((0.1, 0.2, 1.0))
    assert geometry.origin == (0.0, 0.0, 0.0) and np.allclose(geometry.direction_matrix, np.eye(3))
    assert notes == [], "grey stored as RGB is no colour"


def test_real_colour_is_converted_with_a_warning(tmp_path):
    grey, _ = ultrasound_like()
    notes = []
    array, _ = read_volume(write_rgb(tmp_path / "doppler.png", grey, tint=120), notes)
    assert array.shape == (1,) + grey.shape
    assert len(notes) == 1 and "coloured" in notes[0] and "doppler.png" in notes[0]


def write_with_alpha(path, grey, alpha, colour=True):
    """An RGBA PNG of the grey image (grey + alpha, a two-channel PNG, with ``colour`` False)."""
    channels = [grey, grey, grey, alpha] if colour else [grey, alpha]
    sitk.WriteImage(sitk.GetImageFromArray(np.stack(channels, axis=-1), isVector=True), str(path))
    return path


def test_an_opaque_alpha_channel_is_dropped_silently(tmp_path):
    grey, lumen = ultrasound_like()
    wide = grey.astype(np.uint16) * 257
    for name, image in (("us8.png", grey), ("us16.png", wide)):
        notes = []
        array, _ = read_volume(write_with_alpha(tmp_path / name, image, np.full_like(image, np.iinfo(image.dtype).max)),
                               notes)
        assert np.array_equal(array[0], image) and array.dtype == image.dtype and notes == [], name
    mask = write_with_alpha(tmp_path / "lumen.png", lumen.astype(np.uint8) * 255, np.full(lumen.shape, 255, np.uint8))
    ok(run_cli("detect", tmp_path / "us8.png", "--mask", mask, "--model", "carotid-us", "-o", tmp_path / "out", "-q"))
    assert (tmp_path / "out" / "us8_anomaly_seg.png").is_file()


def test_a_png_with_transparent_pixels_is_refused_and_nothing_is_written(tmp_path):
    """An ultrasound export whose surround is transparent, with arbitrary grey values under it (a viewer shows
    them as its own background), is refused naming the file and what to do; so is a partly transparent pixel,
    a transparent mask, and a grey PNG with an alpha channel (which ITK cannot read)."""
    grey, lumen = ultrasound_like()
    yy, xx = np.mgrid[:grey.shape[0], :grey.shape[1]]
    outside = np.hypot(yy - 48, xx - 56) > 45
    under = grey.copy()
    under[outside] = np.random.default_rng(1).integers(0, 256, int(outside.sum()))
    lumen_png = tmp_path / "lumen.png"
    write_volume(lumen_png, lumen[None].astype(np.uint8) * 255, Geometry.identity())
    opaque = np.full(grey.shape, 255, np.uint8)
    faint = opaque.copy()
    faint[3, 4] = 128
    sector = write_with_alpha(tmp_path / "sector.png", under, np.where(outside, 0, 255).astype(np.uint8))
    cases = [(sector, lumen_png, f"sector.png: {int(outside.sum())} of its {grey.size} pixels are transparent"),
             (write_with_alpha(tmp_path / "faint.png", grey, faint), lumen_png, "faint.png: 1 of its"),
             (write_with_alpha(tmp_path / "us.png", grey, opaque),
              write_with_alpha(tmp_path / "lumen_drawn.png", lumen.astype(np.uint8) * 255,
                               np.where(lumen, 255, 0).astype(np.uint8)), "lumen_drawn.png: "),
             (write_with_alpha(tmp_path / "grey_alpha.png", grey, faint, colour=False), lumen_png,
              "grey_alpha.png: a grey PNG with an alpha channel")]
    before = snapshot(tmp_path)
    for image, mask, words in cases:
        out = tmp_path / f"out_{image.stem}"
        assert_refused(run_cli("detect", image, "--mask", mask, "--model", "carotid-us", "-o", out),
                       words, "export it again without transparency")
        assert not out.exists()
    assert snapshot(tmp_path) == before


def test_png_writes_back_exactly_and_refuses_what_it_cannot_hold(tmp_path):
    grey, _ = ultrasound_like()
    geometry = Geometry((0.1, 0.2, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    write_volume(tmp_path / "out.png", grey[None], geometry)
    array, read_back = read_volume(tmp_path / "out.png")
    assert np.array_equal(array[0], grey) and read_back == geometry
    for array, where, words in ((grey[None].astype(np.float32), geometry, "integers"),
                                (np.stack([grey, grey]), geometry, "2D images"),
                                (grey[None], Geometry((1, 1, 1), (5.0, 0.0, 0.0), geometry.direction), "origin")):
        with pytest.raises(OutputError, match=words):
            write_volume(tmp_path / "bad.png", array, where)
    assert not list(tmp_path.glob("*bad*")) and not list(tmp_path.glob(".tmp-*"))


# --- the vessel disc --------------------------------------------------------------------------------

def test_vessel_disc_is_the_lumen_grown_by_the_margin_in_pixels_or_mm():
    _, lumen = ultrasound_like(radius=20)
    r = np.hypot(*(np.mgrid[:96, :112] - np.array([48, 56])[:, None, None]))
    in_pixels = vessel_disc(lumen[None], (1.0, 1.0, 1.0), 30, 2.5)[0]
    assert in_pixels[r <= 49].all() and not in_pixels[r >= 51].any()
    in_mm = vessel_disc(lumen[None], (1.0, 0.1, 0.1), 30, 2.5)[0]  # 2.5 mm = 25 pixels of 0.1 mm
    assert in_mm[r <= 44].all() and not in_mm[r >= 46].any()
    dented = lumen.copy()
    dented[40:56, 36:50] = False  # a plaque cuts deep into the lumen: the disc still covers it, convex
    disc = vessel_disc(dented[None], (1.0, 1.0, 1.0), 30, 2.5)[0]
    assert disc[lumen].all() and not (disc & ~in_pixels).any()
    with pytest.raises(InputError, match="lumen mask is empty"):
        vessel_disc(np.zeros((1, 96, 112), bool), (1.0, 1.0, 1.0), 30, 2.5)


def test_carotid_preprocessing_needs_the_lumen_mask_and_uses_its_disc():
    image, lumen = ultrasound_like()
    config = PreprocessConfig(intensity=CAROTID.intensity, window=CAROTID.window, image_size=32,
                              disc_margin_px=CAROTID.disc_margin_px, disc_margin_mm=CAROTID.disc_margin_mm)
    geometry = Geometry.identity()
    with pytest.raises(InputError, match="lumen mask"):
        prepare_volume(image[None], geometry, config)
    prepared = prepare_volume(image[None], geometry, config, lumen[None])
    assert np.array_equal(prepared.foreground, vessel_disc(lumen[None], (1, 1, 1), 40, 2.5))
    assert prepared.slices == [0]


# --- the plaque inserter ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_plaque_is_a_wall_thickening_of_known_mask(seed):
    from scipy import ndimage

    image, lumen = ultrasound_like(shape=(160, 180), centre=(80, 90), radius=45, seed=seed)
    before = image.copy()
    plaque = insert_plaque(image[None], lumen[None], seed=seed)
    mask, left = plaque.mask[0], plaque.lumen[0]
    settings = PlaqueSettings()
    assert np.array_equal(image, before), "the input is not modified"
    assert plaque.image.shape == (1,) + image.shape and plaque.image.dtype == image.dtype
    assert mask.any() and not (mask & ~lumen).any(), "inside the original lumen"
    assert ndimage.label(mask)[1] == 1, "one piece"
    assert (ndimage.binary_dilation(mask) & ~lumen).any(), "it grows from the wall"
    assert np.array_equal(left, lumen & ~mask)
    depth = ndimage.distance_transform_edt(lumen)
    assert depth[mask].max() <= settings.thickness[1] * plaque.params["lumen_radius_px"] + 1e-6
    assert plaque.params["area_px"] == mask.sum()
    assert plaque.image[0][mask].mean() > image[lumen & ~mask].mean() + 50, "echogenic"
    far = ndimage.distance_transform_edt(~mask) > 4 * settings.edge_sigma_px
    assert np.array_equal(plaque.image[0][far], image[far]), "nothing changes away from the plaque"
    assert not (mask & ~vessel_disc(left[None], (1, 1, 1), CAROTID.disc_margin_px, 0)[0]).any(), \
        "the disc made from the lumen left beside it covers the plaque"
    again = insert_plaque(image[None], lumen[None], seed=seed)
    assert np.array_equal(again.image, plaque.image) and np.array_equal(again.mask, plaque.mask)
    other = insert_plaque(image[None], lumen[None], seed=seed + 100)
    assert not np.array_equal(other.mask, plaque.mask)


def test_plaques_in_the_real_images(shared_data):
    from scipy import ndimage

    for path in carotid_images(shared_data)[::19]:
        image, _ = read_volume(path)
        lumen, _ = read_volume(path.parent.parent / "lumen_masks" / path.name)
        plaque = insert_plaque(image, lumen, seed=7)
        assert plaque.mask.any() and not (plaque.mask & ~(lumen > 0)).any()
        assert ndimage.label(plaque.mask[0])[1] == 1
        assert plaque.image[plaque.mask].mean() > image[plaque.lumen].mean()


def test_plaque_needs_a_lumen():
    image, _ = ultrasound_like()
    with pytest.raises(InputError, match="empty"):
        insert_plaque(image, np.zeros(image.shape, bool), seed=0)


# --- the command line: 2D images through training and detection ----------------------------------

@pytest.fixture(scope="module")
def carotid_run(tmp_path_factory, shared_data):
    """A tiny carotid model trained by the real CLI on real images of two acquisitions (CSV with groups)."""
    images = carotid_images(shared_data)
    by_acquisition = {}
    for path in images:
        by_acquisition.setdefault(path.name.split("_slice_")[0], []).append(path)
    groups = [g for g in sorted(by_acquisition) if len(by_acquisition[g]) >= 3][:3]
    folder = tmp_path_factory.mktemp("carotid")
    with open(folder / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mask", "group"])
        for group in groups[:2]:
            for path in by_acquisition[group][:2]:
                w.writerow([path, path.parent.parent / "lumen_masks" / path.name, group])
    model = folder / "carotid.safetensors"
    ok(run_cli("train", folder / "train.csv", "--preset", "carotid-us", "-o", model, "--steps", "2",
               "--batch-size", "2", "--image-size", "32", "--base-channels", "8", "-q"))
    test_image = by_acquisition[groups[2]][0]
    return {"model": model, "image": test_image, "mask": test_image.parent.parent / "lumen_masks" / test_image.name,
            "folder": folder}


def test_png_through_training_and_detection_keeps_format_and_geometry(carotid_run, tmp_path):
    from synomaly.files.model_file import read_metadata

    meta = read_metadata(carotid_run["model"])
    assert meta["preset"] == "carotid-us" and meta["preprocessing"]["disc_margin_px"] == CAROTID.disc_margin_px
    assert {c["case"] for c in meta["training"]["data"]["cases"]} and meta["training"]["data"]["validation_slices"] == 2
    image, lumen = carotid_run["image"], carotid_run["mask"]
    before = snapshot(image, lumen)
    out = tmp_path / "out"
    result = ok(run_cli("detect", image, "--mask", lumen, "--model", carotid_run["model"], "-o", out, "-q"))
    assert "pixels anomalous" in result.stdout
    name = image.stem
    grey, geometry = read_volume(image)
    outputs = {p.name: p for p in out.iterdir()}
    assert set(outputs) == {f"{name}_{k}" for k in ("anomaly_seg.png", "anomaly_map.png", "anomaly_map.nrrd",
                                                    "counterfactual.png", "report.json", "overview.png")}
    arrays = {}
    for kind in ("anomaly_seg.png", "anomaly_map.png", "anomaly_map.nrrd", "counterfactual.png"):
        path = outputs[f"{name}_{kind}"]
        assert sitk.ReadImage(str(path)).GetDimension() == (3 if kind.endswith(".nrrd") else 2)
        arrays[kind], kept = read_volume(path)
        assert arrays[kind].shape == grey.shape and kept == geometry, kind
    assert set(np.unique(arrays["anomaly_seg.png"])) <= {0, 255} and arrays["counterfactual.png"].dtype == np.uint8
    assert arrays["anomaly_map.png"].dtype == np.uint16 and arrays["anomaly_map.nrrd"].dtype == np.float32
    np.testing.assert_allclose(arrays["anomaly_map.png"] * 2.0 / 65535, arrays["anomaly_map.nrrd"], atol=2 / 65535)
    report = json.loads(outputs[f"{name}_report.json"].read_text())
    assert report["anomalous_area_px"] == int((arrays["anomaly_seg.png"] > 0).sum())
    assert report["pixel_spacing_known"] is False and report["anomalous_area_mm2"] is None
    assert "2 / 65535" in report["png_outputs"]["anomaly_map"]
    disc = vessel_disc(read_volume(lumen)[0], (1, 1, 1), CAROTID.disc_margin_px, 0)
    assert not arrays["anomaly_map.nrrd"][~disc].any(), "the map stays inside the disc around the vessel"
    assert snapshot(image, lumen) == before


def test_single_frame_dicom_outputs_keep_its_geometry(carotid_run, tmp_path):
    grey, _ = read_volume(carotid_run["image"])
    lumen, _ = read_volume(carotid_run["mask"])
    image = sitk.GetImageFromArray(grey)  # (1, H, W): a DICOM file of one frame
    image.SetSpacing((0.06, 0.07, 1.0))
    image.SetOrigin((12.5, -3.0, 40.0))
    sitk.WriteImage(image, str(tmp_path / "frame.dcm"))
    frame, geometry = read_volume(tmp_path / "frame.dcm")
    assert frame.shape == grey.shape
    write_volume(tmp_path / "lumen.nrrd", lumen, geometry)
    result = ok(run_cli("detect", tmp_path / "frame.dcm", "--mask", tmp_path / "lumen.nrrd", "--model",
                        carotid_run["model"], "-o", tmp_path / "out", "-q"))
    # ITK's single frame is not a source a DICOM SEG can reference: the other outputs, and a word.
    assert "no DICOM outputs" in result.stderr, result.stderr
    for kind in ("anomaly_seg", "anomaly_map", "counterfactual"):
        array, kept = read_volume(tmp_path / "out" / f"frame_{kind}.nrrd")
        assert array.shape == frame.shape and kept == geometry, kind
    report = json.loads((tmp_path / "out" / "frame_report.json").read_text())
    assert report["pixel_spacing_known"] is True
    assert report["anomalous_area_mm2"] == pytest.approx(report["anomalous_area_px"] * 0.06 * 0.07)
    # PNG keeps no origin: refused for a frame that has one (ITK's DICOM writer may store none for a single
    # frame, so the frame with an origin is an NRRD here).
    framed = tmp_path / "framed.nrrd"
    write_volume(framed, frame, Geometry((0.06, 0.07, 1.0), (12.5, -3.0, 40.0), geometry.direction))
    write_volume(tmp_path / "framed_lumen.nrrd", lumen, Geometry((0.06, 0.07, 1.0), (12.5, -3.0, 40.0),
                                                                  geometry.direction))
    assert_refused(run_cli("detect", framed, "--mask", tmp_path / "framed_lumen.nrrd", "--model", carotid_run["model"],
                           "--format", "png", "-o", tmp_path / "png"), "origin", "nrrd")
    assert not (tmp_path / "png").exists()


def test_jpeg_input_gets_lossless_png_outputs(carotid_run, tmp_path):
    grey, geometry = read_volume(carotid_run["image"])
    write_rgb(tmp_path / "scan.jpg", grey[0])
    ok(run_cli("detect", tmp_path / "scan.jpg", "--mask", carotid_run["mask"], "--model", carotid_run["model"],
               "-o", tmp_path / "out", "-q"))
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["scan_anomaly_map.nrrd", "scan_anomaly_map.png", "scan_anomaly_seg.png",
                       "scan_counterfactual.png", "scan_overview.png", "scan_report.json"]
    for name in written[:4]:
        array, kept = read_volume(tmp_path / "out" / name)
        assert array.shape == grey.shape and kept == geometry


def test_carotid_detection_without_lumen_mask_is_refused(carotid_run, tmp_path):
    assert_refused(run_cli("detect", carotid_run["image"], "--model", carotid_run["model"], "-o", tmp_path / "out"),
                   "lumen mask", "--mask", carotid_run["image"].name)
    assert not (tmp_path / "out").exists()


def test_2d_image_is_refused_by_the_3d_presets(tmp_path):
    grey, lumen = ultrasound_like()
    image = write_rgb(tmp_path / "us.png", grey)
    line = assert_refused(run_cli("detect", image, "--model", "demo-phantom", "-o", tmp_path / "out"),
                          "us.png", "2D image", "brain-flair", "3D volumes", "carotid-us")
    assert "112 x 96 pixels" in line
    assert not (tmp_path / "out").exists()
    case = tmp_path / "scan1"
    case.mkdir()
    write_rgb(case / "us.png", grey)
    write_volume(case / "us_mask.png", lumen[None].astype(np.uint8) * 255, Geometry.identity())
    assert_refused(run_cli("train", case, "-o", tmp_path / "m.safetensors", "--preset", "liver-ct", "--steps", "1"),
                   "training case scan1", "2D image", "liver-ct", "3D volumes")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.run").exists()


def test_png_format_is_refused_for_a_volume(phantom_case, tmp_path):
    assert_refused(run_cli("detect", phantom_case["flair"], "--model", "demo-phantom", "--format", "png",
                           "-o", tmp_path / "out"), "PNG holds 2D images", "--format nrrd")
    assert not (tmp_path / "out").exists()


def test_training_images_of_one_acquisition_are_refused_before_training(tmp_path):
    rows = []
    for k in range(3):
        grey, lumen = ultrasound_like(seed=k)
        write_rgb(tmp_path / f"frame{k}.png", grey)
        write_volume(tmp_path / f"frame{k}_mask.png", lumen[None].astype(np.uint8) * 255, Geometry.identity())
        rows.append(f"frame{k}.png,frame{k}_mask.png,acq1")
    (tmp_path / "train.csv").write_text("image,mask,group\n" + "\n".join(rows) + "\n")
    assert_refused(run_cli("train", tmp_path / "train.csv", "--preset", "carotid-us", "-o", tmp_path / "m.safetensors",
                           "--steps", "1"), "all of one group", "two or more groups")
    assert not (tmp_path / "m.run").exists()


def test_bundled_carotid_model_ranks_inserted_plaques_above_the_baseline(shared_data):
    """The shipped model on acquisitions it never saw (its card's test split): its map ranks the pixels of
    inserted plaques above the rest of the disc better than the grey-level baseline does."""
    from synomaly.inference.baseline import baseline_for
    from synomaly.inference.detection import DetectionSettings, detect
    from synomaly.evaluation.metrics import auprc
    from synomaly.files.model_file import load_model

    images = carotid_images(shared_data)
    acquisitions = sorted({p.name.split("_slice_")[0] for p in images})
    model = load_model("carotid-us")
    ours, baseline = [], []
    for acquisition in acquisitions[2::3][:3]:
        path = next(p for p in images if p.name.startswith(acquisition))
        image, geometry = read_volume(path)
        lumen, _ = read_volume(path.parent.parent / "lumen_masks" / path.name)
        for seed in (1, 2, 3):
            plaque = insert_plaque(image, lumen, seed=seed)
            result = detect(plaque.image, geometry, model, plaque.lumen, DetectionSettings(device="cpu"))
            disc = result.prepared.orientation.invert(result.prepared.foreground)
            ours.append(auprc(result.anomaly_map, plaque.mask, disc))
            baseline.append(auprc(baseline_for(result.prepared), plaque.mask, disc))
    print(f"AUPRC ours {np.round(ours, 3)}, baseline {np.round(baseline, 3)}")
    assert np.mean(ours) > np.mean(baseline) + 0.1
