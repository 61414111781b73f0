"""Precision and layout of the network at inference: chosen per machine, forced on request, same answer."""
import numpy as np
import pytest
import torch

from synomaly.errors import InputError
from synomaly.inference.runtime import (BF16_TRAINING_BATCH, cpu_has_native_bf16, describe_cpu, resolve_precision,
                                        resolve_training_precision)


def test_precision_auto_follows_the_machine():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision(torch.device("cuda"), "auto") == "fp32", "bf16 measured no faster on a GPU"
    assert resolve_precision(cpu, "fp32") == "fp32"
    assert resolve_precision(cpu, "bf16") == "bf16"


def test_training_precision_auto_is_bf16_only_where_it_measured_faster():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_training_precision(cuda, "auto", 32, compiled=False) == "fp32"
    assert resolve_training_precision(cuda, "auto", BF16_TRAINING_BATCH, compiled=False) == "bf16"
    assert resolve_training_precision(cuda, "auto", 8, compiled=True) == "bf16"
    assert resolve_training_precision(cpu, "auto", 8, compiled=False) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_training_precision(cpu, "bf16", 8, compiled=False) == "bf16"
    assert resolve_training_precision(cuda, "fp32", 1024, compiled=True) == "fp32"


@pytest.mark.parametrize("cap, allowed", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                                          ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_a_onednn_cap_below_bf16_makes_auto_choose_fp32(monkeypatch, cap, allowed):
    # oneDNN capped to AVX2 emulates bf16 (16x slower per convolution on this project's EPYC): auto must not pick it.
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    from synomaly.inference.runtime import onednn_allows_bf16

    assert onednn_allows_bf16() is allowed
    if not allowed:
        assert resolve_precision(torch.device("cpu"), "auto") == "fp32"
        assert resolve_training_precision(torch.device("cpu"), "auto", 8, compiled=False) == "fp32"


def test_unknown_precision_is_refused():
    with pytest.raises(InputError, match="precision"):
        resolve_precision(torch.device("cpu"), "fp16")


def test_cpu_description_names_capability():
    text = describe_cpu()
    assert "native bf16" in text and torch.backends.cpu.get_cpu_capability() in text


def test_bf16_and_channels_last_give_the_fp32_answer(phantom_case):
    """The fast path must not move the result: same segmentation up to a few boundary voxels."""
    from synomaly.inference.detection import DetectionSettings, detect
    from synomaly.files.model_file import load_model
    from synomaly.files.volume_io import read_volume

    volume, geometry = read_volume(phantom_case["flair"])
    model = load_model("demo-phantom")
    results = {p: detect(volume, geometry, model, settings=DetectionSettings(device="cpu", precision=p))
               for p in ("fp32", "bf16")}
    assert results["fp32"].report["settings"]["precision"] == "fp32"
    assert results["bf16"].report["settings"]["precision"] == "bf16"
    a, b = results["fp32"].segmentation > 0, results["bf16"].segmentation > 0
    dice = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
    assert a.sum() > 0 and dice > 0.95
    assert np.abs(results["fp32"].anomaly_map - results["bf16"].anomaly_map).max() < 0.1
