"""Detection over a cohort (issue 9): inputs from folders, globs and CSV lists, shares for job arrays,
skipping what is done, failures that do not stop the batch, and one summary from several processes.

The CLI tests run real ``python -m synomaly detect`` processes on tiny phantoms with the bundled demo
model and one stage, a few seconds each; the shard tests run two of them on one output folder.
"""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synomaly.commands.cohort import CohortInput, find_inputs, merge_summary, parse_shard, take_shard
from synomaly.errors import InputError, OutputError
from synomaly.files.output_set import OutputSet
from synomaly.evaluation.phantom import write_phantom_case

SHAPE = (16, 64, 64)


def detect(*args) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.Popen([sys.executable, "-m", "synomaly", "detect", *map(str, args), "--model", "demo-phantom",
                             "--stages", "1", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def finish(process: subprocess.Popen, code: int = 0):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == code, f"exit {process.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert "Traceback" not in stderr
    return stdout, stderr


def rows(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def hidden(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Four phantom cases, one folder each (flair + brainmask + seg), as a cohort is often laid out."""
    root = tmp_path_factory.mktemp("cohort")
    for i in range(4):
        write_phantom_case(root / f"pat{i}", seed=i, shape=SHAPE)
    return root


# --- shares -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [0, 1, 5, 17])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 20])
def test_shares_cover_every_input_exactly_once(count, n):
    items = [f"case{i:02d}" for i in range(count)]
    shares = [take_shard(items, k, n) for k in range(1, n + 1)]
    taken = [item for share in shares for item in share]
    assert sorted(taken) == items and len(taken) == len(set(taken))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares == [take_shard(list(items), k, n) for k in range(1, n + 1)], "the same on every call"


@pytest.mark.parametrize("text, words", [("0/4", ["1 to 4", "SLURM_ARRAY_TASK_ID + 1"]), ("5/4", ["1 to 4"]),
                                         ("2/0", ["at least 1"]), ("2", ["K/N"]), ("a/b", ["K/N"])])
def test_bad_shards_are_refused(text, words):
    with pytest.raises(InputError) as error:
        parse_shard(text)
    for word in words:
        assert word in str(error.value)
    assert parse_shard(" 3/8 ") == (3, 8)


# --- finding the inputs -----------------------------------------------------------------------------

def fake_dicom(folder: Path, count: int = 2, suffix: str = "") -> Path:
    """Files with the DICOM preamble: all that decides a folder is a series (reading it is read_volume's)."""
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"IM{i:04d}{suffix}").write_bytes(bytes(128) + b"DICM" + bytes(16))
    return folder


def test_a_folder_is_a_cohort_with_masks_paired_and_labels_and_outputs_left_out(cohort, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pat0_flair_anomaly_map.nii.gz").write_bytes(b"an output")
    found = find_inputs([cohort], output=out)
    assert found.cohort
    assert [(i.path, i.mask, i.name) for i in found.items] == [
        (cohort / f"pat{i}" / "flair.nii.gz", cohort / f"pat{i}" / "brainmask.nii.gz", f"pat{i}_flair")
        for i in range(4)]
    # The outputs of a run into the cohort's own folder are not inputs of the next one.
    (cohort / "pat0" / "flair_anomaly_map.nii.gz").write_bytes(b"an output")
    try:
        assert len(find_inputs([cohort], output=cohort / "pat0").items) == 4
    finally:
        (cohort / "pat0" / "flair_anomaly_map.nii.gz").unlink()


def test_dicom_folders_stay_one_series_and_are_found_in_a_cohort(tmp_path):
    series = fake_dicom(tmp_path / "study" / "patA" / "T2")
    fake_dicom(tmp_path / "study" / "patB" / "T2", suffix=".dcm")
    (tmp_path / "study" / "patB" / "T2" / "DICOMDIR").write_bytes(bytes(128) + b"DICM")
    alone = find_inputs([series])
    assert not alone.cohort and [(i.path, i.name) for i in alone.items] == [(series, "T2")]
    found = find_inputs([tmp_path / "study"])
    assert found.cohort
    # Two series called T2: named by their path below the common folder, on every machine alike.
    assert [(i.path.parent.name, i.name) for i in found.items] == [("patA", "patA_T2"), ("patB", "patB_T2")]
    # A folder with nothing recognisable stays one input, which reading then refuses as before.
    (tmp_path / "empty").mkdir()
    assert not find_inputs([tmp_path / "empty"]).cohort


def test_glob_and_csv_inputs(cohort, tmp_path, monkeypatch):
    found = find_inputs([str(cohort / "pat[12]" / "*.nii.gz")])
    assert found.cohort and [(i.path.parent.name, i.mask.name, i.name) for i in found.items] == [
        ("pat1", "brainmask.nii.gz", "pat1_flair"), ("pat2", "brainmask.nii.gz", "pat2_flair")]
    with pytest.raises(InputError, match="no image file or folder matches"):
        find_inputs([str(cohort / "nothing*")])
    listing = tmp_path / "list.csv"
    listing.write_text(f"image,mask,name,label\n{cohort}/pat3/flair.nii.gz,,third,\n\npat0/flair.nii.gz,"
                       "pat0/brainmask.nii.gz,,pat0/seg.nii.gz\nmissing.nii.gz,,,\n", encoding="utf-8")
    monkeypatch.chdir(cohort)  # relative paths are the CSV's, not the working folder's
    items = find_inputs([listing]).items
    assert [(i.path, i.mask, i.name) for i in items] == [
        (cohort / "pat3" / "flair.nii.gz", None, "third"),
        (tmp_path / "pat0" / "flair.nii.gz", tmp_path / "pat0" / "brainmask.nii.gz", "flair"),
        (tmp_path / "missing.nii.gz", None, "missing")], "rows in their order; a missing file fails on its own"
    listing.write_text("path,mask\nx.nii.gz,\n", encoding="utf-8")
    with pytest.raises(InputError, match="image"):
        find_inputs([listing])


def test_names_that_would_collide_are_refused_and_masks_go_with_named_inputs(cohort, tmp_path):
    (tmp_path / "flair.nrrd").write_bytes(b"")
    (tmp_path / "flair.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="would both write flair_"):
        find_inputs([tmp_path / "flair.nrrd", tmp_path / "flair.nii.gz"])
    with pytest.raises(InputError, match="--mask goes with inputs named one by one"):
        find_inputs([cohort], masks=[cohort / "pat0" / "brainmask.nii.gz"])
    one = find_inputs([cohort / "pat0" / "flair.nii.gz"], masks=[cohort / "pat0" / "brainmask.nii.gz"])
    assert not one.cohort and one.items == [CohortInput(cohort / "pat0" / "flair.nii.gz",
                                                        cohort / "pat0" / "brainmask.nii.gz", "flair")]
    # The same file twice is one input.
    assert len(find_inputs([cohort, cohort / "pat1" / "flair.nii.gz"]).items) == 4


# --- the summary ------------------------------------------------------------------------------------

def shard_file(folder: Path, name: str, *records) -> None:
    lines = ["name,input,status,finished,shard,error"] + [",".join(r) for r in records]
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_summary_takes_the_latest_attempt_and_pending_only_when_nothing_else_is_known(tmp_path):
    shard_file(tmp_path, "summary.shard-1-of-2.csv", ("a", "/a", "done", "2024-01-01T10:00:00+00:00", "1/2", ""),
               ("b", "/b", "failed", "2024-01-01T10:00:00+00:00", "1/2", "bad"))
    shard_file(tmp_path, "summary.shard-2-of-3.csv", ("a", "/a", "pending", "2024-01-02T10:00:00+00:00", "2/3", ""),
               ("b", "/b", "done", "2024-01-02T10:00:00+00:00", "2/3", ""),
               ("c", "/c", "pending", "2024-01-02T10:00:00+00:00", "2/3", ""))
    (tmp_path / "summary.shard-x.csv").write_text("not ours\n", encoding="utf-8")
    assert merge_summary(tmp_path) == {"done": 2, "pending": 1}
    assert [(r["name"], r["status"], r["shard"]) for r in rows(tmp_path / "summary.csv")] == [
        ("a", "done", "1/2"), ("b", "done", "2/3"), ("c", "pending", "2/3")]
    assert rows(tmp_path / "failures.csv") == []
    assert hidden(tmp_path) == []


def test_summary_waits_for_its_lock_and_says_what_to_do_when_it_cannot(tmp_path):
    shard_file(tmp_path, "summary.shard-1-of-1.csv", ("a", "/a", "failed", "2024-01-01T10:00:00+00:00", "1/1", "x"))
    with OutputSet(tmp_path, "summary.csv"):
        with pytest.raises(OutputError) as error:
            merge_summary(tmp_path, wait_s=0.5)
    assert "running any shard again" in str(error.value) and not (tmp_path / "summary.csv").exists()
    assert merge_summary(tmp_path) == {"failed": 1}
    assert [r["error"] for r in rows(tmp_path / "failures.csv")] == ["x"]


# --- locks of runs on other machines ----------------------------------------------------------------

def test_a_lock_of_another_machine_is_stale_once_it_is_no_longer_refreshed(tmp_path, monkeypatch):
    from synomaly.files import output_set

    lock = tmp_path / ".case.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "another-node", "started": "then", "committing": []}))
    with pytest.raises(OutputError, match="another-node"):
        OutputSet(tmp_path, "case").acquire()
    old = time.time() - output_set.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    with OutputSet(tmp_path, "case") as taken:  # the dead run's lock is cleared
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    # A held lock is refreshed, so that other machines see it alive.
    monkeypatch.setattr(output_set, "HEARTBEAT_S", 0.05)
    with OutputSet(tmp_path, "case"):
        os.utime(lock, (old, old))
        for _ in range(100):
            if lock.stat().st_mtime > old + 60:
                break
            time.sleep(0.05)
        assert lock.stat().st_mtime > old + 60
    assert not taken.held and hidden(tmp_path) == []


# --- the CLI ----------------------------------------------------------------------------------------

# Detection that SIGKILLs itself at its 4th volume write: in the second input, the first one finished.
KILLED_IN_SECOND_INPUT = """
import os, signal, sys
from synomaly.commands import cli
from synomaly.files import outputs
real_write, count = outputs.write_volume, [0]
def write_volume(*args, **kwargs):
    count[0] += 1
    if count[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(*args, **kwargs)
outputs.write_volume = write_volume
sys.exit(cli.main(sys.argv[1:]))
"""


def test_two_shards_cover_a_folder_and_a_killed_shard_resubmitted_skips_what_it_finished(cohort, tmp_path):
    out = tmp_path / "out"
    names = [f"pat{i}_flair" for i in range(4)]
    args = ["detect", cohort, "-o", out, "--model", "demo-phantom", "--stages", "1", "-q", "--shard", "1/2"]
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_SECOND_INPUT, *map(str, args)], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "pat0_flair_report.json").exists() and not list(out.glob("pat2_*"))
    assert {r["name"]: r["status"] for r in rows(out / "summary.shard-1-of-2.csv")} == {
        "pat0_flair": "done", "pat2_flair": "pending"}
    first = (out / "pat0_flair_report.json").stat().st_mtime_ns
    # Submitted again as it was: the finished input is skipped, the dead run's lock and staging are cleared.
    stdout, _ = finish(detect(cohort, "-o", out, "--shard", "1/2"))
    assert "2 of 4 inputs, 1 detected, 1 skipped" in stdout and "pat0_flair" not in stdout.split("\n", 1)[1]
    assert (out / "pat0_flair_report.json").stat().st_mtime_ns == first
    finish(detect(cohort, "-o", out, "--shard", "2/2"))
    summary = rows(out / "summary.csv")
    assert [(r["name"], r["status"], r["shard"]) for r in summary] == [
        (name, "done", f"{1 + i % 2}/2") for i, name in enumerate(names)], "each input in one share, once"
    for row, name in zip(summary, names):
        report = json.loads((out / f"{name}_report.json").read_text(encoding="utf-8"))
        assert row["input"] == report["input"] and row["mask"] == report["mask"]
        assert float(row["anomalous_volume_ml"]) == pytest.approx(report["anomalous_volume_ml"], rel=1e-5)
        assert int(row["n_components"]) == report["n_components"] and row["model_id"] == report["model"]["model_id"]
        assert float(row["threshold"]) == pytest.approx(report["threshold"], rel=1e-5)
    assert rows(out / "failures.csv") == [] and hidden(out) == []


def test_a_corrupt_input_does_not_stop_the_batch(cohort, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((cohort / "pat1" / "flair.nii.gz").read_bytes()[:2000])
    listing = tmp_path / "inputs.csv"
    listing.write_text(f"image,mask\nbroken.nii.gz,\n{cohort}/pat0/flair.nii.gz,{cohort}/pat0/brainmask.nii.gz\n"
                       "missing.nii.gz,\n", encoding="utf-8")
    out = tmp_path / "out"
    stdout, stderr = finish(detect(listing, "-o", out), code=2)
    errors = stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("synomaly: error: ") for e in errors), stderr
    assert "broken.nii.gz" in errors[0] and "truncated" in errors[0] and "missing.nii.gz" in errors[1]
    assert "1 detected, 0 skipped (outputs exist; --overwrite redoes them), 2 failed" in stdout
    assert (out / "flair_report.json").exists() and not list(out.glob("broken_*"))
    failures = rows(out / "failures.csv")
    assert [Path(r["input"]).name for r in failures] == ["broken.nii.gz", "missing.nii.gz"]
    assert "truncated" in failures[0]["error"] and "no such file" in failures[1]["error"]
    assert {r["name"]: r["status"] for r in rows(out / "summary.csv")} == {
        "broken": "failed", "flair": "done", "missing": "failed"}
    assert hidden(out) == []


def test_two_shards_finishing_together_both_reach_the_summary(cohort, tmp_path):
    """Both shards finish while the summary lock is held (as by a third shard merging), then merge at once."""
    out = tmp_path / "out"
    inputs = [cohort / "pat0" / "flair.nii.gz", cohort / "pat3" / "flair.nii.gz"]
    out.mkdir()
    with OutputSet(out, "summary.csv"):
        runs = [detect(*inputs, "-o", out, "--shard", f"{k}/2") for k in (1, 2)]
        try:
            for _ in range(6000):
                shards = [out / f"summary.shard-{k}-of-2.csv" for k in (1, 2)]
                if all(p.exists() and rows(p) and rows(p)[0]["status"] == "done" for p in shards):
                    break
                assert all(r.poll() is None for r in runs), [r.communicate() for r in runs]
                time.sleep(0.05)
            assert all(r.poll() is None for r in runs), "both wait for the lock"
        except BaseException:
            for r in runs:
                r.kill()
            raise
    for r in runs:
        finish(r)
    assert sorted((Path(r["input"]).parent.name, r["status"]) for r in rows(out / "summary.csv")) == [
        ("pat0", "done"), ("pat3", "done")]
    assert hidden(out) == []


def test_sigterm_stops_like_ctrl_c_and_the_summary_shows_what_is_pending(cohort, tmp_path):
    """A scheduler's time limit sends SIGTERM: the input in progress leaves nothing, the summary is rebuilt."""
    hook = KILLED_IN_SECOND_INPUT.replace("count[0] == 4", "count[0] == 1").replace("SIGKILL", "SIGTERM")
    out = tmp_path / "out"
    args = ["detect", cohort / "pat0", cohort / "pat1", "-o", out, "--model", "demo-phantom", "--stages", "1", "-q"]
    stopped = subprocess.run([sys.executable, "-c", hook, *map(str, args)], capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert stopped.returncode == 130 and stopped.stderr.strip() == "synomaly: interrupted", stopped.stderr
    assert [(r["name"], r["status"]) for r in rows(out / "summary.csv")] == [
        ("pat0_flair", "pending"), ("pat1_flair", "pending")]
    assert not list(out.glob("pat*")) and hidden(out) == []


def test_runs_that_find_the_same_dead_lock_at_once_keep_each_others_outputs(tmp_path, monkeypatch):
    """Two runs judge a killed run's lock dead at the same moment; the first clears it, takes the lock
    and moves its report into place before the second acts: the second must neither remove that
    report (a name the dead run was moving too) nor take the lock from under the first."""
    from synomaly.files import output_set

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".case.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                      "started": "then", "committing": ["case_report.json"]}))
    (tmp_path / "case_report.json").write_text("half of the dead run's set")
    first = OutputSet(tmp_path, "case")
    real_alive, calls = output_set._alive, []

    def alive_while_the_first_run_goes_ahead(pid, host, lock):
        calls.append(pid)
        if len(calls) == 1:  # the second run has read the dead lock; the first one overtakes it
            assert not real_alive(pid, host, lock)
            first.acquire()
            first.stage(tmp_path / "case_report.json").write_text("the first run's report")
            first.commit()
            return False
        return real_alive(pid, host, lock)

    monkeypatch.setattr(output_set, "_alive", alive_while_the_first_run_goes_ahead)
    try:
        with pytest.raises(OutputError, match=f"process {os.getpid()}"):
            OutputSet(tmp_path, "case").acquire()
        assert (tmp_path / "case_report.json").read_text() == "the first run's report"
        assert json.loads((tmp_path / ".case.lock").read_text())["pid"] == os.getpid() and first.held
    finally:
        first.release()
    assert hidden(tmp_path) == []
