"""What the engine needs that Slicer may lack or has too old, found without importing anything heavy.

``importlib.util.find_spec`` tells whether a package is there and ``importlib.metadata`` which version
it is, without importing it (as SlicerNNUnet checks): checking for torch costs nothing at start-up and
never fails when torch is absent. A package that is there but older than the engine needs counts as
missing: the engine needs torch 2.0 (``scaled_dot_product_attention``, the meta device), and an older
torch already in Slicer would fail every run in the worker.
"""
import importlib.metadata
import importlib.util
import subprocess
from dataclasses import dataclass, field
from typing import Callable, List, Optional

TORCH_REQUIREMENT = ">=2.0"

# import name -> (distribution name, minimum version): the engine's dependencies (its pyproject.toml)
REQUIREMENTS = {
    "torch": ("torch", "2.0"),
    "numpy": ("numpy", "1.21"),
    "SimpleITK": ("SimpleITK", "2.2"),
    "skimage": ("scikit-image", "0.19"),
    "scipy": ("scipy", "1.7"),
    "safetensors": ("safetensors", "0.3"),
    "opensimplex": ("opensimplex", "0.4"),
    "tqdm": ("tqdm", "4.60"),
    "nibabel": ("nibabel", "3.2"),
}
# import name -> pip requirement, the engine's dependencies other than torch
PIP_REQUIREMENTS = {name: f"{dist}>={minimum}" for name, (dist, minimum) in REQUIREMENTS.items() if name != "torch"}


def _installed(name: str, find_spec: Callable) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def distribution_version(dist: str) -> Optional[str]:
    """The installed version from the package's metadata (no import); None when it has none."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _numeric(version: str) -> tuple:
    parts = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_at_least(version: str, minimum: str) -> bool:
    """``version >= minimum`` as pip compares them (``packaging``, which Slicer's pip brings), or by the
    numeric release parts where ``packaging`` is missing."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _numeric(version) >= _numeric(minimum)
    try:
        return Version(version) >= Version(minimum)
    except InvalidVersion:
        return _numeric(version) >= _numeric(minimum)


@dataclass
class Package:
    """One dependency: ``installed`` is its version, "" when importable without metadata (Slicer's own
    builds: kept as they are), None when absent."""

    name: str
    dist: str
    minimum: str
    installed: Optional[str]

    @property
    def ok(self) -> bool:
        return self.installed is not None and (self.installed == "" or version_at_least(self.installed, self.minimum))

    @property
    def requirement(self) -> str:
        return f"{self.dist}>={self.minimum}"

    def describe(self) -> str:
        label = "PyTorch" if self.name == "torch" else self.dist
        if self.installed is None:
            return f"{label} (not installed; needs >={self.minimum})"
        if not self.ok:
            return f"{label} {self.installed} (too old; needs >={self.minimum})"
        return f"{label} {self.installed or '(version unknown)'}"


def dependency_report(find_spec: Callable = importlib.util.find_spec,
                      version_of: Callable[[str], Optional[str]] = distribution_version) -> List[Package]:
    """Every dependency with the version installed, for the panel and the installer's question."""
    report = []
    for name, (dist, minimum) in REQUIREMENTS.items():
        installed = None
        if _installed(name, find_spec):
            installed = version_of(dist) or ""
        report.append(Package(name, dist, minimum, installed))
    return report


@dataclass
class MissingDependencies:
    torch: bool
    pip: List[str]
    packages: List[Package] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return self.torch or bool(self.pip)

    def describe(self) -> str:
        if self.packages:
            return ", ".join(p.describe() for p in self.packages)
        return ", ".join((["PyTorch"] if self.torch else []) + self.pip)


def missing_dependencies(find_spec: Callable = importlib.util.find_spec,
                         version_of: Callable[[str], Optional[str]] = distribution_version,
                         everything: bool = False) -> MissingDependencies:
    """What is absent or older than the engine needs (both are installed, the latter upgraded);
    ``everything``: all that pip manages (the panel's Upgrade/Reinstall), not Slicer's own builds."""
    wrong = [p for p in dependency_report(find_spec, version_of)
             if not p.ok or (everything and p.installed != "")]
    return MissingDependencies(torch=any(p.name == "torch" for p in wrong),
                               pip=[p.requirement for p in wrong if p.name != "torch"], packages=wrong)


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
    """The installer's own output (pip's, for a CalledProcessError), then the error itself. Only text:
    ``slicer.util.logProcessOutput`` puts the (read-out) pipe objects into its CalledProcessError."""
    parts = []
    for name in ("output", "stdout", "stderr"):
        text = getattr(exc, name, None)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if isinstance(text, str) and text.strip() and text.strip() not in parts:
            parts.append(text.strip())
    if not parts and isinstance(exc, subprocess.CalledProcessError):
        parts.append("The installer's output is in Slicer's Python console and application log.")
    parts.append(f"{type(exc).__name__}: {exc}")
    return "\n\n".join(parts)


def run_pip(requirements: List[str], python: str, launch: Optional[Callable] = None,
            on_line: Optional[Callable[[str], None]] = None) -> str:
    """``python -m pip install --upgrade REQUIREMENTS``; each output line goes to ``on_line`` (which may
    process GUI events) as it comes. Returns pip's output; raises CalledProcessError carrying it as text.
    ``launch(args)`` starts the process with its output piped as text (Slicer's
    ``slicer.util.launchConsoleProcess`` inside Slicer: no console window, Slicer's startup environment)."""
    args = [python, "-m", "pip", "install", "--upgrade", *requirements]
    if launch is None:
        def launch(command):
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, errors="replace")
    process = launch(args)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line.rstrip())
    process.wait()
    output = "".join(lines)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, args, output=output)
    return output


def install_question(missing: MissingDependencies) -> str:
    """The confirmation text: each package to install or upgrade, with the version found."""
    items = "\n".join(f"  - {p.describe()}" for p in missing.packages) or f"  - {missing.describe()}"
    return ("Synomaly Detection will install or upgrade these Python packages (as found here now):\n"
            f"{items}\n\nInstall them now? This downloads several hundred MB and can take a few "
            "minutes (PyTorch through the PyTorch extension, which picks the build for this computer's GPU).")


def ensure_dependencies(confirm: Callable[[str], bool], install_torch: Callable[[str], object],
                        pip_install: Callable[[List[str]], None],
                        find_spec: Callable = importlib.util.find_spec,
                        version_of: Callable[[str], Optional[str]] = distribution_version,
                        everything: bool = False) -> Optional[InstallProblem]:
    """Offer to install what is missing; return None when all is there, else the problem, saying why.

    ``confirm(text)`` asks the user; ``install_torch(requirement)`` installs torch (through the PyTorch
    extension inside Slicer) and returns a false value when that did not happen; ``pip_install`` installs
    the rest. They are passed in so that the Qt-free part can be tested without Slicer. An installer that
    raises (pip's CalledProcessError) becomes a problem with its output as details; a call while an
    installation runs (its event processing lets the user click again) installs nothing. ``everything``:
    offer to upgrade or reinstall all the packages, not only the missing ones.
    """
    global _installing
    if _installing:
        return InstallProblem("An installation of the needed Python packages is already running; "
                              "wait until it has finished.")
    missing = missing_dependencies(find_spec, version_of, everything)
    if not missing.any:
        return None
    if not confirm(install_question(missing)):
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
    still = missing_dependencies(find_spec, version_of)
    if still.any:
        return InstallProblem(f"Installation did not complete; still missing: {still.describe()}. "
                              "See the Python console.")
    return None
