"""First-use dependency check (no torch import) and finding the bundled engine."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="needs slicer-core (pip install slicer-core)")

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SynomalyDetection"
sys.path.insert(0, str(MODULE_DIR))

from SynomalyDetectionLib import Dependencies  # noqa: E402
from SynomalyDetectionLib.Engine import engine_search_paths  # noqa: E402


ALL = set(Dependencies.PIP_REQUIREMENTS) | {"torch"}


class Recorder:
    def __init__(self, installed, answer=True, torch_ok=True):
        self.installed, self.answer, self.torch_ok = set(installed), answer, torch_ok
        self.questions, self.torch_calls, self.pip_calls = [], [], []

    def confirm(self, text):
        self.questions.append(text)
        return self.answer

    def install_torch(self, requirement):
        self.torch_calls.append(requirement)
        if self.torch_ok:
            self.installed.add("torch")
        return self.torch_ok

    def pip_install(self, requirements):
        self.pip_calls.append(list(requirements))
        self.installed |= {name for name, req in Dependencies.PIP_REQUIREMENTS.items() if req in requirements}

    def run(self):
        return Dependencies.ensure_dependencies(self.confirm, self.install_torch, self.pip_install,
                                                find_spec=lambda name: object() if name in self.installed else None)


def test_nothing_to_do_when_all_is_installed():
    recorder = Recorder(ALL)
    assert recorder.run() is None
    assert not recorder.questions and not recorder.torch_calls and not recorder.pip_calls


def test_missing_packages_are_offered_once_and_installed():
    recorder = Recorder({"numpy", "scipy", "SimpleITK"})
    assert recorder.run() is None
    assert len(recorder.questions) == 1 and "PyTorch" in recorder.questions[0]
    assert recorder.torch_calls == [Dependencies.TORCH_REQUIREMENT]
    assert sorted(recorder.pip_calls[0]) == sorted(
        ["scikit-image>=0.19", "safetensors>=0.3", "opensimplex>=0.4", "tqdm>=4.60", "nibabel>=3.2"])


def test_declining_installs_nothing_and_says_why():
    recorder = Recorder({"numpy"}, answer=False)
    message = recorder.run().message
    assert "Not installed" in message and "PyTorch" in message
    assert not recorder.torch_calls and not recorder.pip_calls


def test_torch_that_could_not_be_installed_points_to_the_pytorch_extension():
    recorder = Recorder(ALL - {"torch"}, torch_ok=False)
    assert "PyTorch" in recorder.run().message and "Extensions Manager" in recorder.run().message
    assert not recorder.pip_calls


def test_a_failed_pip_install_is_reported():
    recorder = Recorder(ALL - {"tqdm"})
    recorder.pip_install = lambda requirements: None
    assert "still missing: tqdm" in recorder.run().message


def test_an_installer_that_raises_is_a_problem_with_its_output_as_details():
    """pip_install and PyTorchUtils raise CalledProcessError: that reached only the Python console."""
    recorder = Recorder(ALL - {"tqdm"})

    def failing_pip(requirements):
        raise subprocess.CalledProcessError(1, ["pip", "install"], output="ERROR: No matching distribution for tqdm")

    recorder.pip_install = failing_pip
    problem = recorder.run()
    assert "tqdm" in problem.message and "failed" in problem.message
    assert "No matching distribution" in problem.details and "CalledProcessError" in problem.details
    assert not Dependencies.installing()

    recorder = Recorder(ALL - {"torch"})
    recorder.install_torch = lambda requirement: 1 / 0
    problem = recorder.run()
    assert "PyTorch could not be installed" in problem.message and "ZeroDivisionError" in problem.details
    assert not Dependencies.installing()


def test_a_second_request_while_installing_installs_nothing():
    """The installation processes GUI events, so a second click could start a nested installation."""
    recorder = Recorder(ALL - {"tqdm"})
    nested = []

    def pip_install(requirements):
        assert Dependencies.installing()
        nested.append(Recorder(ALL - {"tqdm"}).run())
        recorder.installed.add("tqdm")

    recorder.pip_install = pip_install
    assert recorder.run() is None
    assert "already running" in nested[0].message
    assert not Dependencies.installing()


def test_real_check_does_not_import_torch():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from SynomalyDetectionLib import Dependencies; "
            "Dependencies.missing_dependencies(); assert 'torch' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


LOCATE = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("engine_locator", sys.argv[1])
engine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(engine)
assert importlib.util.find_spec("synomaly") is None, "run without site-packages"
try:
    engine.ensure_engine_importable(Path(sys.argv[2]))
except ImportError as exc:
    print(exc)
    sys.exit(3)
import synomaly
print(synomaly.__file__)
"""


def locate_without_site_packages(module_dir, cwd):
    """Run the locator for a module in ``module_dir`` when no engine is pip-installed (python -S, and no
    PYTHONPATH that a developer may point at the engine)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-S", "-c", LOCATE, str(MODULE_DIR / "SynomalyDetectionLib/Engine.py"),
                           str(module_dir)], capture_output=True, text=True, cwd=str(cwd), env=env)


def engine_found_from(module_dir, cwd):
    run = locate_without_site_packages(module_dir, cwd)
    assert run.returncode == 0, run.stdout + run.stderr
    return Path(run.stdout.strip()).resolve()


def test_engine_is_found_in_the_source_tree(tmp_path):
    assert engine_search_paths(MODULE_DIR) == [MODULE_DIR, ROOT / "SynomalyEngine"]
    assert engine_found_from(MODULE_DIR, tmp_path) == (ROOT / "SynomalyEngine/synomaly/__init__.py").resolve()


def test_engine_is_found_beside_the_installed_module(tmp_path):
    installed = tmp_path / "qt-scripted-modules"
    (installed / "synomaly").mkdir(parents=True)
    shutil.copy(ROOT / "SynomalyEngine/synomaly/__init__.py", installed / "synomaly")
    assert engine_found_from(installed, tmp_path) == (installed / "synomaly/__init__.py").resolve()


def test_missing_engine_is_a_clear_error(tmp_path):
    empty = tmp_path / "modules" / "SynomalyDetection"
    empty.mkdir(parents=True)
    run = locate_without_site_packages(empty, tmp_path)
    assert run.returncode == 3 and "reinstall the extension" in run.stdout


# versions (issue 20, item 2): a package older than the engine needs is as good as missing


def versions(**found):
    return lambda dist: found.get(dist, "99.0")


def test_an_old_torch_counts_as_missing_and_the_question_names_its_version():
    recorder = Recorder(ALL)
    problem = Dependencies.ensure_dependencies(recorder.confirm, recorder.install_torch, recorder.pip_install,
                                               find_spec=lambda name: object(),
                                               version_of=versions(torch="1.13.1+cu117", scipy="1.5.0"))
    assert recorder.torch_calls == [">=2.0"] and recorder.pip_calls == [["scipy>=1.7"]]
    assert "PyTorch 1.13.1+cu117 (too old; needs >=2.0)" in recorder.questions[0]
    assert "scipy 1.5.0 (too old; needs >=1.7)" in recorder.questions[0]
    assert "still missing" in problem.message, "the stand-in installers changed no version"


@pytest.mark.parametrize("version, ok", [("2.0.0", True), ("2.13.0+cpu", True), ("2.1.0.dev20230601", True),
                                         ("1.13.1", False), ("1.9", False), ("10.0", True)])
def test_versions_compare_as_pip_compares_them(version, ok):
    assert Dependencies.version_at_least(version, "2.0") is ok


def test_slicers_own_builds_without_metadata_are_kept():
    """Slicer's SimpleITK may have no pip metadata: it is used as it is, never reinstalled over."""
    missing = Dependencies.missing_dependencies(find_spec=lambda name: object(),
                                                version_of=lambda dist: None if dist == "SimpleITK" else "99")
    assert not missing.any
    everything = Dependencies.missing_dependencies(find_spec=lambda name: object(),
                                                   version_of=lambda dist: None if dist == "SimpleITK" else "99",
                                                   everything=True)
    assert everything.torch and "SimpleITK>=2.2" not in everything.pip and "numpy>=1.21" in everything.pip


OLD_TORCH = """
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
from SynomalyDetectionLib import Dependencies
missing = Dependencies.missing_dependencies()
assert "torch" not in sys.modules
print(missing.torch, missing.describe())
"""


def test_the_real_check_reads_the_installed_version_without_importing(tmp_path):
    """A torch 1.13.1 distribution first on the path, as an old torch inside Slicer would be."""
    pytest.importorskip("torch")
    site = tmp_path / "site"
    (site / "torch-1.13.1.dist-info").mkdir(parents=True)
    (site / "torch-1.13.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 1.13.1\n")
    run = subprocess.run([sys.executable, "-c", OLD_TORCH, str(MODULE_DIR), str(site)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("True") and "PyTorch 1.13.1 (too old; needs >=2.0)" in run.stdout


# what pip said reaches the details (issue 20, item 13)


def test_slicers_process_error_gives_text_details_not_a_file_object():
    """slicer.util.logProcessOutput raises CalledProcessError(output=proc.stdout): a read-out pipe."""
    proc = subprocess.Popen([sys.executable, "-c", "print('ERROR: pip says no'); raise SystemExit(1)"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import slicer.util

    with pytest.raises(subprocess.CalledProcessError) as caught:
        slicer.util.logProcessOutput(proc)
    details = Dependencies._failure_details(caught.value)
    assert "<_io" not in details and "CalledProcessError" in details
    assert "Python console" in details, "where its output went instead"


def test_run_pip_gives_pips_own_output_line_by_line(tmp_path):
    lines = []
    with pytest.raises(subprocess.CalledProcessError) as caught:
        Dependencies.run_pip(["synomaly-no-such-package==0.0.1"], sys.executable, on_line=lines.append,
                             launch=lambda args: subprocess.Popen(
                                 args[:5] + ["--no-index", "--find-links", str(tmp_path)] + args[5:],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    details = Dependencies._failure_details(caught.value)
    assert "synomaly-no-such-package" in details and "ERROR" in details
    assert lines and any("ERROR" in line for line in lines), "each line went to the panel as it came"
