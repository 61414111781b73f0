"""BIDS in, BIDS derivatives out: a raw BIDS dataset of phantoms (3 subjects, 2 sessions, a FLAIR and a T1w
each) detected in two shards, one by the command and one by the Python API; the derivatives dataset indexed by
pybids, every output found by its entities, the cohort's summary complete, a second run skipping all."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))
from dicom_phantoms import write_bids_dataset  # noqa: E402
from test_cli import assert_refused, ok, run_cli, snapshot  # noqa: E402

bids = pytest.importorskip("bids", reason="needs pybids (pip install pybids)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids") / "study"
    images = write_bids_dataset(root)
    return root, images


@pytest.fixture(scope="module")
def derived(dataset):
    """Shard 1/2 by the command, shard 2/2 by the Python API, into BIDS_ROOT/derivatives/synomaly."""
    from synomaly.commands.cli import main

    root, _ = dataset
    first = ok(run_cli("detect", root, "--bids", "--shard", "1/2", "--model", "demo-phantom", "--stages", "1",
                       "-q", timeout=600))
    assert main(["detect", str(root), "--bids", "--shard", "2/2", "--model", "demo-phantom", "--stages", "1",
                 "-q"]) == 0
    return root / "derivatives" / "synomaly", first


def test_derivatives_index_in_pybids_with_every_output(dataset, derived):
    root, images = dataset
    out, _ = derived
    layout = bids.BIDSLayout(str(root), derivatives=True, validate=False)
    assert [Path(d.root) for d in layout.derivatives.values()] == [out]
    for stem in images:
        subject, session = stem.split("_")[0][4:], stem.split("_")[1][4:]
        found = {}
        for key, entities in {"mask": dict(desc="anomaly", suffix="mask"),
                              "map": dict(desc="anomaly", suffix="map"),
                              "counterfactual": dict(desc="counterfactual", suffix="FLAIR")}.items():
            files = layout.get(scope="synomaly", subject=subject, session=session, space="orig",
                               extension=".nii.gz", **entities)
            assert len(files) == 1, (stem, key, files)
            found[key] = files[0]
            assert Path(files[0].path).parent == out / f"sub-{subject}" / f"ses-{session}" / "anat"
        mask = sitk.ReadImage(found["mask"].path)
        source = sitk.ReadImage(str(images[stem]))
        assert mask.GetSize() == source.GetSize() and mask.GetOrigin() == source.GetOrigin()
        metadata = found["mask"].get_metadata()
        assert metadata["Sources"] == [f"bids:raw:sub-{subject}/ses-{session}/anat/{stem}_FLAIR.nii.gz"]
        assert metadata["Type"] == "Lesion" and "settings" in metadata and "anomalous_volume_ml" in metadata
        assert found["map"].get_metadata()["model"]["model_id"] == metadata["model"]["model_id"]
        assert "Description" in found["counterfactual"].get_metadata()
    # the raw dataset's own query is untouched by the derivatives: still six FLAIR images
    assert len(layout.get(scope="raw", suffix="FLAIR", extension=".nii.gz")) == 6


def test_dataset_description_names_version_model_and_source(dataset, derived):
    from synomaly import __version__

    root, _ = dataset
    out, _ = derived
    description = json.loads((out / "dataset_description.json").read_text())
    report = json.loads(next(out.rglob("*_desc-anomaly_mask.json")).read_text())
    assert description["DatasetType"] == "derivative"
    generated = description["GeneratedBy"][0]
    assert generated["Name"] == "synomaly" and generated["Version"] == __version__
    assert report["model"]["model_id"] in generated["Description"]
    assert description["SourceDatasets"][0]["URL"] == root.resolve().as_uri()


def test_cohort_summary_covers_both_shards_and_a_rerun_skips(dataset, derived):
    root, images = dataset
    out, first = derived
    assert "shard 1/2: 3 of 6 inputs" in first.stdout
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["name"] for r in rows) == sorted(images)
    assert {r["status"] for r in rows} == {"done"} and {r["shard"] for r in rows} == {"1/2", "2/2"}
    assert (out / "failures.csv").read_text().splitlines()[1:] == []
    before = snapshot(*[p for p in out.rglob("sub-*") if p.is_file()])
    again = ok(run_cli("detect", root, "--bids", "--shard", "1/2", "--model", "demo-phantom", "-q"))
    assert "3 skipped" in again.stdout
    assert snapshot(*[p for p in out.rglob("sub-*") if p.is_file()]) == before


def test_derivatives_are_never_inputs_of_a_plain_run(dataset, derived):
    from synomaly.commands.cohort import find_inputs

    root, images = dataset
    found = find_inputs([str(root)])
    assert sorted(p.name for p in (item.path for item in found.items)) == sorted(
        [p.name for p in images.values()] + [p.name.replace("FLAIR", "T1w") for p in images.values()])


def test_filter_selects_by_entities(dataset, tmp_path):
    from synomaly.commands.bids import find_bids_inputs, parse_filter

    root, _ = dataset
    found = find_bids_inputs([str(root)], None, tmp_path, parse_filter('{"session": "01"}'))
    assert [item.name for item in found.items] == ["sub-01_ses-01", "sub-02_ses-01", "sub-03_ses-01"]
    assert all(item.path.name.endswith("_FLAIR.nii.gz") for item in found.items)
    found = find_bids_inputs([str(root)], None, tmp_path, parse_filter('{"subject": ["02"]}'))
    assert [item.name for item in found.items] == ["sub-02_ses-01", "sub-02_ses-02"]


def test_bad_bids_inputs_are_refused(dataset, tmp_path):
    root, images = dataset
    before = snapshot(root)
    assert_refused(run_cli("detect", root, "--bids", "--bids-filter", '{"session": ', "-o", tmp_path / "o"),
                   "--bids-filter", "not JSON")
    assert_refused(run_cli("detect", root, "--bids", "--bids-filter", '{"session": "09"}', "-o", tmp_path / "o"),
                   "no FLAIR image", "09")
    assert_refused(run_cli("detect", root, "--bids", "--bids-filter", '{"colour": "red"}', "-o", tmp_path / "o"),
                   "--bids-filter")
    assert_refused(run_cli("detect", images["sub-01_ses-01"].parent, "--bids", "-o", tmp_path / "o"),
                   "not a BIDS dataset")
    assert_refused(run_cli("detect", root, "--bids-filter", '{"session": "01"}', "-o", tmp_path / "o"),
                   "--bids-filter goes with --bids")
    assert_refused(run_cli("detect", root, "--bids", "--format", "nrrd", "-o", tmp_path / "o"), "NIfTI")
    assert not (tmp_path / "o").exists() and snapshot(root) == before


def test_derivatives_of_another_engine_are_not_replaced(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "deriv"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "fmriprep", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "x"}]}))
    before = snapshot(out)
    assert_refused(run_cli("detect", root, "--bids", "-o", out, "--model", "demo-phantom", "-q"),
                   "not written by synomaly")
    assert snapshot(out) == before and not np.any([p.name.startswith("sub-") for p in out.iterdir()])


def test_a_failed_subject_leaves_no_folder_the_run_made(tmp_path):
    """sub-02's and sub-03's FLAIR cannot be detected in (a line of voxels): sub-01 is written; of sub-02 only the
    folder that was there before the run is left, of sub-03 nothing: the folders the run made for them are gone."""
    root = tmp_path / "study"
    images = write_bids_dataset(root, subjects=("01", "02", "03"), sessions=("01",))
    for failing in ("sub-02_ses-01", "sub-03_ses-01"):
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((50, 1, 1), np.float32)), str(images[failing]))
    out = tmp_path / "deriv"
    (out / "sub-02").mkdir(parents=True)  # the user's, before the run: stays
    result = run_cli("detect", root, "--bids", "-o", out, "--model", "demo-phantom", "--stages", "1", "-q")
    assert result.returncode == 2 and "sub-02_ses-01_FLAIR.nii.gz" in result.stderr, result.stderr
    assert (out / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_space-orig_desc-anomaly_mask.nii.gz").is_file()
    assert list((out / "sub-02").iterdir()) == [] and not (out / "sub-03").exists()
    with open(out / "summary.csv", newline="") as f:
        assert {row["name"]: row["status"] for row in csv.DictReader(f)} == {
            "sub-01_ses-01": "done", "sub-02_ses-01": "failed", "sub-03_ses-01": "failed"}
