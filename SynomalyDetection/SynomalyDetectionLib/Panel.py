"""What the panel shows about a run and about the machine, without Qt: the run log with elapsed time and
time left, the compute devices this computer has, and the few steps that fill its controls (given the
controls, so that the widget stays thin and this file needs no Qt).

The device list comes from a short process of the worker's interpreter: importing torch in Slicer's
own process would load CUDA there for nothing (and an old torch could not be upgraded afterwards).
"""
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

MAX_LOG_LINES = 500
LOW_GPU_MEMORY_BYTES = 8 * 1024 ** 3

PROBE_SCRIPT = """
import json
import torch
found = {"torch": torch.__version__, "cuda": []}
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        found["cuda"].append({"index": index, "name": properties.name, "memory": properties.total_memory})
mps = getattr(torch.backends, "mps", None)
found["mps"] = bool(mps is not None and mps.is_available())
print(json.dumps(found))
"""


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class RunLog:
    """The worker's messages with the time each came, and the elapsed and remaining time of the run."""

    started: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic
    lines: List[str] = field(default_factory=list)
    fraction: float = 0.0

    def add(self, fraction: Optional[float], message: str) -> str:
        """A progress report: ``fraction`` done (None when unknown) and the worker's message, logged
        when it differs from the last one. Returns the new log line ("" when none)."""
        if fraction is not None:
            self.fraction = min(max(float(fraction), 0.0), 1.0)
        message = str(message or "").strip()
        if not message or (self.lines and self.lines[-1].endswith("  " + message)):
            return ""
        self.lines.append(f"[{_clock(self.clock() - self.started)}]  {message}")
        del self.lines[:-MAX_LOG_LINES]
        return self.lines[-1]

    def remaining_s(self) -> Optional[float]:
        """Time left at the pace so far; None until there is a pace to go by."""
        elapsed = self.clock() - self.started
        if self.fraction < 0.02 or self.fraction >= 1.0 or elapsed < 3.0:
            return None
        return elapsed * (1.0 - self.fraction) / self.fraction

    def times(self) -> str:
        text = f"Elapsed {_clock(self.clock() - self.started)}"
        remaining = self.remaining_s()
        return text + (f", about {_clock(remaining)} left" if remaining is not None else "")

    def text(self) -> str:
        return "\n".join(self.lines)


def device_choices(found: Optional[dict]) -> List[Tuple[str, str]]:
    """(value for the engine, label) for each device: automatic, each CUDA GPU with its name and memory,
    Apple's GPU where the probe found mps (auto never picks it: the engine runs there in fp32 only and was
    not measured there), the CPU."""
    choices = [("auto", "auto (a CUDA GPU if there is one, else the CPU)")]
    for gpu in (found or {}).get("cuda", []):
        memory = f"{gpu['memory'] / 1024 ** 3:.0f} GB" if gpu.get("memory") else "memory unknown"
        choices.append((f"cuda:{gpu['index']}", f"cuda:{gpu['index']}: {gpu['name']} ({memory})"))
    if (found or {}).get("mps"):
        choices.append(("mps", "mps: Apple GPU (fp32)"))
    choices.append(("cpu", "cpu"))
    return choices


def memory_hint(device: str, found: Optional[dict]) -> str:
    """A warning for a GPU with little memory ("" otherwise): large volumes and ensembles may not fit."""
    gpus = (found or {}).get("cuda", [])
    index = 0 if device in ("auto", "cuda") and gpus else None
    if device.startswith("cuda:") and device[5:].isdigit():
        index = int(device[5:])
    gpu = next((g for g in gpus if g["index"] == index), None)
    if gpu is None or not gpu.get("memory") or gpu["memory"] >= LOW_GPU_MEMORY_BYTES:
        return ""
    return (f"{gpu['name']} has {gpu['memory'] / 1024 ** 3:.1f} GB of memory: a large volume or an ensemble may not "
            "fit; if a run fails for lack of GPU memory, lower the ensemble size or choose the CPU.")


def select_data(combo, value) -> None:
    """Select the item of that value in a QComboBox; one the list lacks (a GPU gone since the scene was
    saved) is added, so that the saved choice is kept and shown."""
    index = combo.findData(value)
    if index < 0 and value:
        combo.addItem(value, value)
        index = combo.count - 1
    combo.setCurrentIndex(max(index, 0))


def set_checked_nodes(selector, nodes, checked, unchecked) -> None:
    """Check exactly ``nodes`` in a qMRMLCheckableNodeComboBox (``checked``/``unchecked``: Qt's states)."""
    ids = {node.GetID() for node in nodes}
    for index in range(selector.nodeCount()):
        node = selector.nodeFromIndex(index)
        selector.setCheckState(node, checked if node.GetID() in ids else unchecked)


class DeviceProbe:
    """Lists the compute devices in a process of the worker's interpreter, polled like a job."""

    def __init__(self, python: str, launch: Optional[Callable] = None):
        launch = launch or (lambda args: subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                          stderr=subprocess.PIPE, text=True))
        self._process = launch([python, "-c", PROBE_SCRIPT])
        self.found: Optional[dict] = None
        self.error = ""

    def poll(self) -> bool:
        """True while the probe runs; then ``found`` holds the devices, or ``error`` says why not."""
        if self._process is None:
            return False
        if self._process.poll() is None:
            return True
        out, err = self._process.communicate()
        self._process = None
        try:
            self.found = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.error = ((err or out or "").strip().splitlines() or ["no output"])[-1]
            logging.warning(f"Synomaly: the compute devices could not be listed: {self.error}")
        return False
