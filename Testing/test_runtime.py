"""Precision and layout of the network at inference: chosen per machine, forced on request, same answer; the
devices a name means (Apple's mps only by name, in fp32)."""
import numpy as np
import pytest
import torch

from synomaly.errors import DeviceError, InputError
from synomaly.inference.detection import resolve_device
from synomaly.inference.runtime import (BF16_TRAINING_BATCH, autocast, cpu_has_native_bf16, describe_cpu,
                                        resolve_precision, resolve_training_precision)
from synomaly.training.distributed import Team


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


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="Apple's mps is available here")
def test_mps_without_mps_is_a_device_error_that_says_what_to_choose():
    with pytest.raises(DeviceError, match=r"mps is not available here .*use --device cpu or auto"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or mps"):
        resolve_device("metal")


@pytest.fixture
def mac(monkeypatch):
    """A machine with Apple's mps and no CUDA, as torch reports it (a torch.device needs no hardware)."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_mps_only_by_name_never_for_auto(mac):
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("auto") == torch.device("cpu"), "auto stays with CUDA or the CPU"


def test_mps_runs_fp32_and_refuses_bf16(mac):
    mps = torch.device("mps")
    assert resolve_precision(mps, "auto") == resolve_precision(mps, "fp32") == "fp32"
    assert resolve_training_precision(mps, "auto", BF16_TRAINING_BATCH, compiled=True) == "fp32"
    for refused in (lambda: resolve_precision(mps, "bf16"), lambda: resolve_training_precision(mps, "bf16", 8, False)):
        with pytest.raises(DeviceError, match="bf16 is not offered on Apple's mps"):
            refused()
    with autocast(mps, "fp32"):  # no autocast context at all: an older torch refuses one on mps even disabled
        assert not torch.is_autocast_enabled()


def test_mps_trains_in_one_process_only(mac):
    assert Team().resolve_device("mps") == torch.device("mps")
    with pytest.raises(InputError, match="--device mps trains in one process only"):
        Team(rank=0, world_size=2, local_rank=0, local_world_size=2).resolve_device("mps")
