"""A small head in a large empty field: detection works on the foreground's bounding box, gives there what the
whole volume gives (maps, counterfactual, segmentation, report, in the input's grid), and its memory grows with
the box, not with the field (a 1024 x 1024 x 400 uint8 volume took 8.6 GB)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synomaly.errors import InputError
from synomaly.evaluation.phantom import make_phantom
from synomaly.files.geometry import Geometry
from synomaly.files.model_file import load_model
from synomaly.files.volume_io import read_volume, write_volume
from synomaly.inference import preprocessing
from synomaly.inference.detection import DetectionSettings, detect
from synomaly.inference.preprocessing import PreprocessConfig, VolumeBox, prepare_in_box, prepare_volume

# Stored neither axial-first nor unflipped: the box is found in the input's grid and used in the reoriented one.
OBLIQUE = Geometry((0.9, 1.1, 2.0), (10.0, -20.0, 30.0), (0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
PAD = ((5, 30), (40, 7), (12, 50))


def brain_uint8(shape=(24, 64, 64), seed=3) -> np.ndarray:
    """A skull-stripped phantom brain as uint8, its background exactly 0."""
    volume = make_phantom(shape=shape, seed=seed, lesion=True).volume
    return np.rint(np.clip(volume / np.percentile(volume, 99.9) * 200.0, 0, 255)).astype(np.uint8)


def whole_volume_box(foreground, orientation, spacing_zyx, config):
    """The box of the whole volume: detection as it worked before boxes, for comparison."""
    return VolumeBox(tuple(slice(0, n) for n in foreground.shape), foreground.shape, orientation)


@pytest.fixture(scope="module")
def model():
    model = load_model("demo-phantom")
    # A border rim and the volume's scale: every post-processing step runs.
    model.metadata["inference"] = {**model.metadata["inference"], "rim_mm": 2.0, "map_scale": "volume"}
    return model


def run(volume, model, geometry=OBLIQUE):
    settings = DetectionSettings(device="cpu", stages=1, ensemble=2, skull_check=False, threshold=0.05,
                                 min_component_mm3=5.0)
    return detect(volume, geometry, model, settings=settings)


def assert_same(a, b):
    assert np.array_equal(a.anomaly_map, b.anomaly_map)
    assert np.array_equal(a.uncertainty, b.uncertainty)
    assert np.array_equal(a.counterfactual, b.counterfactual)
    assert np.array_equal(a.segmentation, b.segmentation)
    for key in ("components", "anomalous_volume_ml", "max_score", "mean_score", "map_level", "slices_processed"):
        assert a.report[key] == b.report[key], key


def test_the_box_gives_what_the_whole_volume_gives(model, monkeypatch):
    padded = np.pad(brain_uint8(), PAD)
    boxed = run(padded, model)
    assert not boxed.prepared.box.whole  # the field around the brain was left out
    assert boxed.report["n_components"] > 0 and boxed.uncertainty is not None
    monkeypatch.setattr(preprocessing, "foreground_box", whole_volume_box)
    whole = run(padded, model)
    assert whole.prepared.box.whole
    assert_same(boxed, whole)
    # The whole volume's view of what the network saw is the one detection on the whole volume gives.
    for name in ("normalised", "foreground"):
        assert np.array_equal(getattr(boxed.prepared, name), getattr(whole.prepared, name))
    assert boxed.prepared.slices == whole.prepared.slices and boxed.prepared.frame == whole.prepared.frame
    z = boxed.prepared.slices[3]
    for got, expected in zip(boxed.prepared.network_slices([z]), whole.prepared.network_slices([z])):
        assert np.array_equal(got.numpy(), expected.numpy())


def test_an_empty_field_around_a_volume_changes_nothing_inside_it(model):
    brain = brain_uint8()
    alone, padded = run(brain, model), run(np.pad(brain, PAD), model)
    inside = tuple(slice(before, before + n) for (before, _), n in zip(PAD, brain.shape))
    assert np.array_equal(padded.anomaly_map[inside], alone.anomaly_map)
    assert np.array_equal(padded.counterfactual[inside], alone.counterfactual)
    assert np.array_equal(padded.segmentation[inside], alone.segmentation)
    outside = np.ones(padded.anomaly_map.shape, dtype=bool)
    outside[inside] = False
    assert not padded.anomaly_map[outside].any() and not padded.segmentation[outside].any()
    assert not padded.counterfactual[outside].any()  # the input itself there, as float32
    shift = [before for before, _ in reversed(PAD)]  # i, j, k
    assert [[round(c - s, 1) for c, s in zip(comp["centre_ijk"], shift)] for comp in padded.report["components"]] \
        == [comp["centre_ijk"] for comp in alone.report["components"]]
    assert padded.report["anomalous_volume_ml"] == alone.report["anomalous_volume_ml"]


def test_2_5d_stacks_from_the_box_are_the_whole_volumes():
    """Neighbouring slices (2.5D) near the box's ends are the volume's: the box reaches far enough along them."""
    brain = np.pad(brain_uint8(shape=(16, 48, 48)), ((9, 3), (20, 4), (6, 30)))
    config = PreprocessConfig(image_size=32, context_slices=2)
    whole = prepare_volume(brain, OBLIQUE, config)
    placed = prepare_in_box(brain, OBLIQUE, config)
    assert not placed.box.whole and placed.slices == whole.slices
    for got, expected in zip(placed.network_slices(), whole.network_slices()):
        assert np.array_equal(got.numpy(), expected.numpy())
    with pytest.raises(IndexError):
        placed.network_slices([placed.start[0] - 1])


# Started by a small launcher: Linux counts the memory of the process that starts a child in the child's peak
# (ru_maxrss survives exec), and this test process may be large by now.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, status, usage = os.wait4(p.pid, 0); print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)")


def peak_memory(path: Path, out: Path) -> int:
    """The peak resident memory (bytes) of one ``synomaly detect`` process on ``path``."""
    args = [sys.executable, "-c", LAUNCHER, sys.executable, "-m", "synomaly", "detect", str(path), "-o", str(out),
            "--model", "demo-phantom", "--stages", "1", "-q"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    code, peak = (int(v) for v in result.stdout.split())
    assert code == 0, result.stderr
    return peak * 1024  # Linux gives kilobytes


def test_memory_grows_with_the_box_not_with_the_empty_field(tmp_path):
    """The brain alone against the same brain in a 384 x 384 x 160 field: what the field adds stays under four
    float32 copies of it (before: seven; the outputs themselves are two, the map being zero outside the box)."""
    brain = brain_uint8(shape=(32, 96, 96), seed=5)
    geometry = Geometry.identity((1.0, 1.0, 2.0))
    field = np.zeros((160, 384, 384), dtype=np.uint8)
    field[64:96, 144:240, 144:240] = brain
    write_volume(tmp_path / "brain.nii.gz", brain, geometry)
    write_volume(tmp_path / "field.nii.gz", field, geometry)
    alone = peak_memory(tmp_path / "brain.nii.gz", tmp_path / "out_alone")
    in_field = peak_memory(tmp_path / "field.nii.gz", tmp_path / "out_field")
    assert in_field - alone < 4 * 4 * field.size, (alone, in_field)
    map_, _ = read_volume(tmp_path / "out_field" / "field_anomaly_map.nii.gz")
    alone_map, _ = read_volume(tmp_path / "out_alone" / "brain_anomaly_map.nii.gz")
    assert np.array_equal(map_[64:96, 144:240, 144:240], alone_map)


# --- NIfTI data blocks: read in pieces, and once where the file shows it is whole ------------------------------

def nifti_bytes(tmp_path, array, name="plain.nii") -> bytes:
    write_volume(tmp_path / name, array, Geometry.identity())
    return (tmp_path / name).read_bytes()


def test_a_gzip_stream_that_ends_cleanly_but_early_is_refused(tmp_path):
    """The gzip trailer's size spares integer data a second decompression; a stream cut short and closed again
    (a complete gzip member of half the file) states another size and is read through, and refused."""
    import gzip

    array = np.arange(20 * 30 * 40, dtype=np.int16).reshape(20, 30, 40)
    raw = nifti_bytes(tmp_path, array)
    half = tmp_path / "half.nii.gz"
    half.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(InputError, match="truncated or damaged"):
        read_volume(half)
    # Two gzip members (as bgzip writes): the trailer states the last one's size, and the whole stream is read.
    members = tmp_path / "members.nii.gz"
    members.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    assert np.array_equal(read_volume(members)[0], array)
    whole = tmp_path / "whole.nii.gz"
    whole.write_bytes(gzip.compress(raw))
    assert np.array_equal(read_volume(whole)[0], array)


def test_nan_and_cut_float_data_are_found_in_any_piece(tmp_path, monkeypatch):
    import gzip

    from synomaly.files import header_checks

    monkeypatch.setattr(header_checks, "BLOCK_BYTES", 4096)  # many pieces
    array = np.ones((20, 30, 40), dtype=np.float32)
    array[19, 29, 39] = np.nan  # in the last piece
    raw = nifti_bytes(tmp_path, np.ones_like(array))
    nan = tmp_path / "nan.nii.gz"  # the header of a written file, the data with its NaN put in by hand
    offset = len(raw) - array.nbytes
    nan.write_bytes(gzip.compress(raw[:offset] + array.astype("<f4").tobytes()))
    with pytest.raises(InputError, match="1 NaN or infinite"):
        read_volume(nan)
    cut = tmp_path / "cut.nii"
    cut.write_bytes(raw[:-10])
    with pytest.raises(InputError, match="truncated or damaged"):
        read_volume(cut)


@pytest.mark.parametrize("name", ["map.nii.gz", "map.nii", "map.nrrd"])
def test_a_written_volume_is_compared_with_what_was_meant(tmp_path, monkeypatch, name):
    """Read back in slabs (a NIfTI file's data in pieces): a file holding other values, or cut short, is refused."""
    from synomaly.files import volume_io

    monkeypatch.setattr(volume_io, "SLAB_VOXELS", 1000)
    array = np.random.default_rng(0).random((12, 20, 30)).astype(np.float32)
    path = tmp_path / name
    write_volume(path, array, Geometry.identity())
    volume_io._check_written(path, array, lossy=False)
    other = array.copy()
    other[11, 19, 29] += 1.0
    with pytest.raises(OSError, match="other values"):
        volume_io._check_written(path, other, lossy=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OSError, match="cannot be read back|other values"):
        volume_io._check_written(path, array, lossy=False)
