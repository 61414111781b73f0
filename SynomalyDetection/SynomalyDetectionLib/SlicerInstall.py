"""Installing the engine's packages inside Slicer: the installers ``Dependencies.ensure_dependencies``
is given there. They use the Slicer application (its event loop, the PyTorch extension), so the
package's ``__init__`` does not import this file; outside Slicer, tests pass their own installers.
"""
import slicer

from .Dependencies import run_pip
from .JobRunner import worker_python


def install_torch(requirement: str):
    """PyTorch through the PyTorch extension, which picks the build matching the GPU driver; None when
    that extension is not installed. (It imports torch into Slicer's process once installed.)"""
    try:
        import PyTorchUtils
    except ImportError:
        return None
    with slicer.util.WaitCursor():
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement)


def pip_install_logged(requirements, on_line) -> None:
    """pip in Slicer's Python without a console window; ``on_line(line)`` gets each output line as it
    comes, with the GUI kept alive between lines. A failure raises CalledProcessError with pip's output
    as text (``slicer.util.pip_install`` puts a read-out pipe there)."""
    def show(line):
        on_line(line)
        slicer.app.processEvents()

    with slicer.util.WaitCursor():
        run_pip(requirements, worker_python(), launch=slicer.util.launchConsoleProcess, on_line=show)
