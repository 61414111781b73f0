"""What the engine needs that Slicer may lack, found without importing anything heavy.

``importlib.util.find_spec`` tells whether a package is installed without importing it, so checking
for torch costs nothing at start-up and never fails when torch is absent.
"""
import importlib.util
from dataclasses import dataclass
from typing import Callable, List, Optional

TORCH_REQUIREMENT = ">=1.13"

# import name -> pip requirement, the engine's dependencies other than torch
PIP_REQUIREMENTS = {
    "numpy": "numpy>=1.21",
    "SimpleITK": "SimpleITK>=2.2",
    "skimage": "scikit-image>=0.19",
    "scipy": "scipy>=1.7",
    "safetensors": "safetensors>=0.3",
    "opensimplex": "opensimplex>=0.4",
    "tqdm": "tqdm>=4.60",
    "nibabel": "nibabel>=3.2",
}


def _installed(name: str, find_spec: Callable) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class MissingDependencies:
    torch: bool
    pip: List[str]

    @property
    def any(self) -> bool:
        return self.torch or bool(self.pip)

    def describe(self) -> str:
        names = (["PyTorch"] if self.torch else []) + self.pip
        return ", ".join(names)


def missing_dependencies(find_spec: Callable = importlib.util.find_spec) -> MissingDependencies:
    return MissingDependencies(
        torch=not _installed("torch", find_spec),
        pip=[req for name, req in PIP_REQUIREMENTS.items() if not _installed(name, find_spec)])


@dataclass
class InstallProblem:
    """Why the engine's packages are not there: a message that says what to do, and the installer's output."""

    message: str
    details: str = ""

    def __str__(self) -> str:
        return self.message


_installing = False


def installing() -> bool:
    """True while an installation runs; it processes GUI events, so the panel must refuse a second one."""
    return _installing


def _failure_details(exc: BaseException) -> str:
    """The installer's own output (pip's, for a CalledProcessError), then the error itself."""
    parts = []
    for name in ("output", "stdout", "stderr"):
        text = getattr(exc, name, None)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if text and text not in parts:
            parts.append(str(text).strip())
    parts.append(f"{type(exc).__name__}: {exc}")
    return "\n\n".join(parts)


def ensure_dependencies(confirm: Callable[[str], bool], install_torch: Callable[[str], object],
                        pip_install: Callable[[List[str]], None],
                        find_spec: Callable = importlib.util.find_spec) -> Optional[InstallProblem]:
    """Offer to install what is missing; return None when all is there, else the problem, saying why.

    ``confirm(text)`` asks the user; ``install_torch(requirement)`` installs torch (through the PyTorch
    extension inside Slicer) and returns a false value when that did not happen; ``pip_install`` installs
    the rest. They are passed in so that the Qt-free part can be tested without Slicer. An installer that
    raises (pip's CalledProcessError) becomes a problem with its output as details; a call while an
    installation runs (its event processing lets the user click again) installs nothing.
    """
    global _installing
    if _installing:
        return InstallProblem("An installation of the needed Python packages is already running; "
                              "wait until it has finished.")
    missing = missing_dependencies(find_spec)
    if not missing.any:
        return None
    question = (f"Synomaly Detection needs Python packages that are not installed: {missing.describe()}.\n\n"
                "Install them now? This downloads several hundred MB and can take a few minutes.")
    if not confirm(question):
        return InstallProblem(f"Not installed: {missing.describe()}. Anomaly detection and training need them; "
                              "click Detect or Start training again to install them.")
    _installing = True
    try:
        if missing.torch:
            try:
                installed = install_torch(TORCH_REQUIREMENT)
            except Exception as exc:
                return InstallProblem(f"PyTorch could not be installed ({exc}). Check the internet connection, or "
                                      "install PyTorch from the PyTorch Utils module; see the details.",
                                      _failure_details(exc))
            if not installed:
                return InstallProblem("PyTorch was not installed. Install the 'PyTorch' extension from the "
                                      "Extensions Manager, then install PyTorch from its module (PyTorch Utils) "
                                      "or retry here.")
        if missing.pip:
            try:
                pip_install(missing.pip)
            except Exception as exc:
                return InstallProblem(f"Installing {', '.join(missing.pip)} failed ({exc}). Check the internet "
                                      "connection and retry; see the details.", _failure_details(exc))
    finally:
        _installing = False
    importlib.invalidate_caches()
    still = missing_dependencies(find_spec)
    if still.any:
        return InstallProblem(f"Installation did not complete; still missing: {still.describe()}. "
                              "See the Python console.")
    return None
