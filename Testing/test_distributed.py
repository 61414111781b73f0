"""Training in several processes (DistributedDataParallel over gloo on the CPU), as torchrun and
``synomaly train --nproc`` start it: the loss curve is that of one process, rank 0 alone writes,
a killed team resumes at its saved step, and a wrong launch is refused with one line.

Real processes on tiny phantoms; each launch costs a few seconds of start-up per process.
"""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from synomaly.files.model_file import read_metadata
from synomaly.evaluation.phantom import write_phantom_case
from synomaly.training.checkpoints import run_dir_for
from synomaly.training.loop import train
from synomaly.training.settings import TrainingSettings

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

TINY = dict(batch_size=4, base_channels=8, num_res_blocks=1, image_size=32, device="cpu", lr=1e-3, seed=3)
TINY_ARGS = ("--batch-size", "4", "--base-channels", "8", "--res-blocks", "1", "--image-size", "32",
             "--device", "cpu", "--lr", "1e-3", "--seed", "3")
# Float rounding differs between one batch of 3 and shares of 1 and 2 (and in the gradient sum): over 30
# steps the curves agree to about 2e-7 relative. Shares averaged without their weights differ by 4e-2.
LOSS_RTOL = 1e-4


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    root = tmp_path_factory.mktemp("healthy")
    for seed in range(2):
        write_phantom_case(root / f"case{seed}", seed=seed, lesion=False, shape=(16, 64, 64))
    return root


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC ARGS`` (a script, or ``-m synomaly ...``)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *map(str, args)], capture_output=True, text=True, env=env(), timeout=600)


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("synomaly: error:")]


# The Python API under torchrun; each process reports the batch sizes its network trained on.
SHARES_SCRIPT = """
import json, os, sys
from synomaly.method import network
from synomaly import TrainingSettings, train

sizes, forward = set(), network.UNet.forward
def sized_forward(self, x, t):
    if self.training:
        sizes.add(int(x.shape[0]))
    return forward(self, x, t)
network.UNet.forward = sized_forward
train([sys.argv[1]], sys.argv[2], TrainingSettings(**json.loads(sys.argv[3])))
print(json.dumps({"rank": int(os.environ["RANK"]), "sizes": sorted(sizes)}))
"""


@pytest.mark.slow
def test_two_processes_share_every_batch_and_give_the_loss_curve_of_one(healthy, tmp_path):
    """A batch of 3 in 2 processes: shares of 1 and 2 slices, weighted so that the curve is one process's."""
    # fp32: bf16 (auto's choice on CPUs with native bf16) rounds shares of 1 and 2 apart by about 1.5e-3,
    # which would hide a weighting error of that size.
    settings = dict(TINY, batch_size=3, steps=30, checkpoint_every=10, precision="fp32")
    one = tmp_path / "one.safetensors"
    train([healthy], one, TrainingSettings(**settings))
    two = tmp_path / "two.safetensors"
    script = tmp_path / "shares.py"
    script.write_text(SHARES_SCRIPT)
    result = torchrun(2, script, healthy, two, json.dumps(settings))
    assert result.returncode == 0, result.stderr
    reports = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert reports == [{"rank": 0, "sizes": [1]}, {"rank": 1, "sizes": [2]}]
    expected = torch.load(run_dir_for(one) / "checkpoint.pt", weights_only=True)
    saved = torch.load(run_dir_for(two) / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 30 and len(saved["losses"]) == 30
    np.testing.assert_allclose(saved["losses"], expected["losses"], rtol=LOSS_RTOL)
    assert expected["losses"][-1] < 0.8 * expected["losses"][0]  # the curve compared is one that learns
    # The same draws in every process: a checkpoint resumes alike whatever the process count.
    assert torch.equal(saved["generator"], expected["generator"])
    meta, meta_one = read_metadata(two), read_metadata(one)
    assert meta["training"]["world_size"] == 2 and meta_one["training"]["world_size"] == 1
    assert meta["threshold"] == pytest.approx(meta_one["threshold"], rel=1e-3)
    assert sorted(p.name for p in run_dir_for(two).iterdir()) == ["checkpoint.pt", "loss.csv", "previews"]
    assert [line.split(",")[0] for line in (run_dir_for(two) / "loss.csv").read_text().splitlines()[1:]] == \
        [str(s) for s in range(1, 31)]


def _process_tree(pid: int):
    """``pid`` and its descendants, from /proc (Linux)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


def _launch_training(healthy, model, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "synomaly", "train", str(healthy), "-o", str(model),
                             "--steps", "100000", "--checkpoint-every", "5", "--nproc", "2", *args, *TINY_ARGS],
                            stderr=subprocess.PIPE, text=True, env=env())


def _logged_step(line: str) -> int:
    return int(line.split("step ")[1].split("/")[0]) if line.startswith("training: step") else -1


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes in /proc")
def test_a_killed_team_resumes_at_its_saved_step_and_ctrl_c_stops_all_at_one_step(healthy, tmp_path):
    """``train --nproc 2`` killed with SIGKILL, launcher and workers at once (as a scheduler kills a job),
    resumes from its last checkpoint; Ctrl-C (SIGINT to the launcher) then stops both processes at one
    step, saved, and says so once."""
    model = tmp_path / "k.safetensors"
    checkpoint = run_dir_for(model) / "checkpoint.pt"
    proc = _launch_training(healthy, model)
    watchdog = threading.Timer(300, proc.kill)  # a regression fails the test instead of hanging it
    watchdog.start()
    try:
        for line in proc.stderr:
            if "checkpoint saved" in line and _logged_step(line) >= 10:
                break
        tree = _process_tree(proc.pid)
        assert len(tree) >= 3, "the launcher and its two training processes"
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.kill()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] % 5 == 0 and saved["step"] >= 10 and len(saved["losses"]) == saved["step"]
    assert not model.exists()

    resumed = _launch_training(healthy, model, "--resume")
    watchdog = threading.Timer(300, resumed.kill)
    watchdog.start()
    try:
        first = next(line for line in resumed.stderr if line.startswith("training: step"))
        resumed.send_signal(signal.SIGINT)
        _, stderr = resumed.communicate(timeout=120)
    finally:
        watchdog.cancel()
        resumed.kill()
    assert _logged_step(first) == saved["step"] + 1, first
    assert resumed.returncode == 130, stderr
    stopped = [line for line in stderr.splitlines() if "training stopped" in line]
    assert len(stopped) == 1 and "--resume" in stopped[0] and "Traceback" not in stderr, stderr
    reached = int(stopped[0].split("at step ")[1].split(" ")[0])
    final = torch.load(checkpoint, weights_only=True)
    assert final["step"] == reached > saved["step"] and final["losses"][: saved["step"]] == saved["losses"]
    assert not model.exists()


def _environment(pid: int) -> dict:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/self/environ").exists(),
                    reason="confines the run with an affinity mask and reads the processes' environment in /proc")
def test_launched_processes_share_the_cpus_the_run_may_use(healthy, tmp_path):
    """``train --nproc 2`` confined to one CPU (as taskset or a batch system confines it) gives each process one
    thread, not a part of all the machine's CPUs (which would oversubscribe the one it may use)."""
    cpu = min(os.sched_getaffinity(0))
    alone = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    proc = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-m", "synomaly", "train", str(healthy),
                             "-o", str(tmp_path / "t.safetensors"), "--steps", "100000", "--nproc", "2", *TINY_ARGS],
                            stderr=subprocess.PIPE, text=True, env=alone)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        next(line for line in proc.stderr if line.startswith("training: step"))
        ranks = {}
        for pid in _process_tree(proc.pid):
            try:
                environment = _environment(pid)
            except OSError:  # a helper process that has ended
                continue
            if "RANK" in environment:
                ranks[environment["RANK"]] = environment.get("OMP_NUM_THREADS")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    assert ranks == {"0": "1", "1": "1"}, ranks
    assert proc.returncode == 130, stderr


def test_a_wrong_launch_is_refused_with_one_line(healthy, tmp_path):
    model = tmp_path / "m.safetensors"
    # Checked by the launcher before any process starts.
    args = ("train", healthy, "-o", model, "--steps", "3", *TINY_ARGS)
    result = subprocess.run([sys.executable, "-m", "synomaly", *map(str, args), "--nproc", "5"],
                            capture_output=True, text=True, env=env(), timeout=120)
    assert result.returncode == 2 and error_lines(result.stderr) == [
        "synomaly: error: 5 training processes but a batch size of 4: each process trains on its share of every "
        "batch; give a batch size of at least 5, or start fewer processes."], result.stderr
    compile_alone = ["synomaly: error: --compile trains in one process only (not tried with several, where DDP "
                     "splits the graph); leave out --compile, or --nproc and torchrun."]
    result = subprocess.run([sys.executable, "-m", "synomaly", *map(str, args), "--nproc", "2", "--compile"],
                            capture_output=True, text=True, env=env(), timeout=120)
    assert result.returncode == 2 and error_lines(result.stderr) == compile_alone, result.stderr
    # Started by torchrun itself: every process finds it, process 0 alone says so.
    result = torchrun(2, "-m", "synomaly", *args, "--compile")
    assert result.returncode != 0 and error_lines(result.stderr) == compile_alone, result.stderr
    result = torchrun(2, "-m", "synomaly", *args, "--batch-size", "1")
    assert result.returncode != 0
    assert error_lines(result.stderr) == [
        "synomaly: error: 2 training processes but a batch size of 1: each process trains on its share of every "
        "batch; give a batch size of at least 2, or start fewer processes."], result.stderr
    # A problem found by the processes (here: no data) is said once, and nothing is written.
    missing = tmp_path / "missing"
    result = subprocess.run([sys.executable, "-m", "synomaly", "train", str(missing), "-o", str(model),
                             "--nproc", "2", *TINY_ARGS], capture_output=True, text=True, env=env(), timeout=300)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"synomaly: error: {missing}: no such file or folder."], result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value, team", [(None, False), ("1", False), ("2", True), ("two", False), ("", False)])
def test_a_team_process_is_told_by_world_size_without_raising(monkeypatch, value, team):
    # The entry point skips the exit-time teardown (where gloo can abort a finished process) only in a team;
    # a malformed WORLD_SIZE is the CLI's to report, not a crash at exit.
    from synomaly.training.distributed import in_team_process

    if value is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", value)
    assert in_team_process() is team
