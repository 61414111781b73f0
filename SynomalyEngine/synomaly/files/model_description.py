"""What a model file's description must hold, checked before anything is built from it.

A model file is data from anywhere (a colleague, a download, a damaged disk): every value that shapes a
detection is checked here, with one line naming the key, what it holds and what was expected. Nothing
here imports torch, so that Slicer's own process can list models (``model_file.list_models``).
"""
import math
import numbers
import re
from typing import Any, Dict, Optional, Sequence

from synomaly.errors import ModelFileError
from synomaly.method.presets import PRESETS

FORMAT = "synomaly-model"
FORMAT_VERSION = 1
MODEL_ID = re.compile(r"^[0-9a-f]{12}$")
MAX_CHANNELS = 1024  # far above any network trained here: a larger one is a damaged or hostile file


class _Checker:
    """Collects the path of the value being checked, so that a refusal names it (``inference.ensemble``)."""

    def __init__(self, path):
        self.path = path

    def fail(self, key: str, value: Any, wanted: str):
        raise ModelFileError(f"{self.path}: the model description's {key} is {value!r}, but must be {wanted}; "
                             "the file is damaged or was not written by synomaly: download or train it again.")

    def section(self, meta: Dict, key: str) -> Dict:
        value = meta.get(key)
        if not isinstance(value, dict):
            self.fail(key, value, "a section of settings")
        return value

    def whole(self, section: Dict, prefix: str, key: str, low: int, high: Optional[int] = None,
              required: bool = True) -> None:
        if key not in section and not required:
            return
        value = section.get(key)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
                or (high is not None and value > high):
            self.fail(f"{prefix}{key}", value, f"a whole number from {low}" + (f" to {high}" if high else " up"))

    def number(self, section: Dict, prefix: str, key: str, low: float, high: float = math.inf,
               low_included: bool = True, required: bool = True) -> None:
        if key not in section and not required:
            return
        value = section.get(key)
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and (value >= low if low_included else value > low) and value <= high
        if not ok:
            bound = f"{'at least' if low_included else 'above'} {low:g}" + ("" if math.isinf(high) else
                                                                            f" and at most {high:g}")
            self.fail(f"{prefix}{key}", value, f"a finite number {bound}")

    def choice(self, section: Dict, prefix: str, key: str, allowed: Sequence, required: bool = True) -> None:
        if key not in section and not required:
            return
        if section.get(key) not in allowed:
            self.fail(f"{prefix}{key}", section.get(key), "one of " + ", ".join(map(repr, allowed)))


def check_description(meta: Any, path) -> Dict:
    """``meta`` (the parsed JSON of the file's header) if it describes a usable model; else ModelFileError."""
    c = _Checker(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a Synomaly model file (its description is not one).")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 1:
        c.fail("format_version", version, "a whole number of at least 1")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer Synomaly (format {version}); upgrade.")
    if not isinstance(meta.get("model_id"), str) or not MODEL_ID.match(meta["model_id"]):
        c.fail("model_id", meta.get("model_id"), "12 hexadecimal digits")
    if not isinstance(meta.get("name", ""), str) or not isinstance(meta.get("description", ""), str):
        c.fail("name", meta.get("name"), "a text")
    c.choice(meta, "", "preset", sorted(PRESETS))
    c.number(meta, "", "threshold", 0.0, low_included=False)
    schedule = c.section(meta, "schedule")
    c.whole(schedule, "schedule.", "num_steps", 2, 100_000)
    c.choice(schedule, "schedule.", "kind", ("cosine", "linear"))
    _check_preprocessing(c, c.section(meta, "preprocessing"))
    _check_inference(c, c.section(meta, "inference"), schedule["num_steps"])
    _check_network(c, c.section(meta, "network"), meta["preprocessing"])
    _check_input_reference(c, meta.get("calibration"))
    return meta


def _check_input_reference(c: _Checker, calibration: Any) -> None:
    """The ranges an input is compared with (``inference.input_fit``): optional, as models written before
    it have none, but when present every range holds finite numbers, the lower first."""
    if not isinstance(calibration, dict) or "input_reference" not in calibration:
        return
    features = calibration["input_reference"].get("features") if isinstance(calibration["input_reference"],
                                                                             dict) else None
    if not isinstance(features, dict):
        c.fail("calibration.input_reference", calibration["input_reference"], "a section with features")
    for name, ref in features.items():
        values = [ref.get(k) for k in ("low", "median", "high")] if isinstance(ref, dict) else [None]
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values) \
                or not values[0] <= values[1] <= values[2]:
            c.fail(f"calibration.input_reference.features.{name}", ref, "finite low <= median <= high")


def _check_preprocessing(c: _Checker, pre: Dict) -> None:
    p = "preprocessing."
    c.choice(pre, p, "intensity", ("robust", "window"))
    window = pre.get("window")
    if pre["intensity"] == "window" or window is not None:
        if not (isinstance(window, list) and len(window) == 2
                and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in window)
                and window[0] < window[1]):
            c.fail(p + "window", window, "two finite numbers, the lower first")
    c.whole(pre, p, "image_size", 8, 4096)
    if pre["image_size"] % 8:
        c.fail(p + "image_size", pre["image_size"], "a multiple of 8")
    c.number(pre, p, "bright_factor", 0.0, low_included=False)
    c.number(pre, p, "low_percentile", 0.0, 49.0)
    c.number(pre, p, "margin_mm", 0.0)
    c.number(pre, p, "min_foreground_fraction", 0.0, 1.0)
    for key in ("disc_margin_px", "disc_margin_mm"):
        c.number(pre, p, key, 0.0, required=False)
    c.whole(pre, p, "context_slices", 0, 16, required=False)


def _check_inference(c: _Checker, inf: Dict, num_steps: int) -> None:
    p = "inference."
    c.choice(inf, p, "mode", ("multi", "single"), required=False)
    c.whole(inf, p, "noise_level", 1, num_steps - 1, required=False)
    levels = inf.get("single_noise_levels", [1])
    if not isinstance(levels, list) or not levels or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 < v < num_steps for v in levels):
        c.fail(p + "single_noise_levels", levels, f"a list of whole numbers from 1 to {num_steps - 1}")
    c.whole(inf, p, "max_stages", 1, 100, required=False)
    c.whole(inf, p, "kernel_size", 1, 99, required=False)
    c.whole(inf, p, "ensemble", 1, 64, required=False)
    c.whole(inf, p, "min_component_px", 0, required=False)
    for key in ("fusion_threshold", "blur_mm", "min_component_mm3", "rim_mm", "fine_blur_mm", "fine_gain"):
        c.number(inf, p, key, 0.0, required=False)
    for key in ("soft_fusion", "signed"):
        c.choice(inf, p, key, (True, False), required=False)
    c.choice(inf, p, "direction", (1, -1), required=False)
    c.choice(inf, p, "map_scale", ("none", "volume"), required=False)


def _check_network(c: _Checker, net: Dict, pre: Dict) -> None:
    p = "network."
    c.whole(net, p, "in_channels", 1, 33)
    c.whole(net, p, "out_channels", 1, 1)
    c.whole(net, p, "base_channels", 1, MAX_CHANNELS)
    c.whole(net, p, "num_res_blocks", 1, 8)
    c.whole(net, p, "num_heads", 1, 64, required=False)
    c.number(net, p, "dropout", 0.0, 1.0, required=False)
    for key in ("channel_mult", "attention_resolutions"):
        value = net.get(key)
        if not isinstance(value, list) or len(value) > 8 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 < v <= 64 for v in value):
            c.fail(p + key, value, "a list of at most 8 whole numbers from 1 to 64")
    if not net["channel_mult"] or net["base_channels"] * max(net["channel_mult"]) > MAX_CHANNELS:
        c.fail(p + "channel_mult", net["channel_mult"], f"at least one level, at most {MAX_CHANNELS} channels wide")
    if net.get("image_size") != pre["image_size"]:
        c.fail(p + "image_size", net.get("image_size"), f"the preprocessing's image size ({pre['image_size']})")
    if net["in_channels"] != 1 + 2 * pre.get("context_slices", 0):
        c.fail(p + "in_channels", net["in_channels"], "1 plus twice the preprocessing's context slices")
