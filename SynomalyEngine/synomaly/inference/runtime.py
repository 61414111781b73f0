"""How the network runs on this machine: numeric precision, memory layout, and the CPU's name.

bf16 autocast halves the network's time on CPUs that compute bf16 natively (AVX512-BF16 or AMX) and
slows it down on the others (AVX2 only), where it is emulated; so ``auto`` decides per machine.
On CUDA the network is small enough to be bound by kernel launches and elementwise work, not by the
tensor cores (fp32 convolutions already run there as TF32), so bf16 pays only for large training batches
or a compiled network (measured on an H100: README, Measured speed). ``fp32`` or ``bf16`` force either.
Apple's mps runs fp32 only: bf16 autocast there needs a recent torch and macOS and was never measured.
"""
import contextlib
import platform
from typing import Optional

import torch

from synomaly.errors import DeviceError, InputError

PRECISIONS = ("auto", "fp32", "bf16")


def onednn_cap() -> Optional[str]:
    """The instruction-set cap oneDNN was given (``ONEDNN_MAX_CPU_ISA``, or its older name), if any."""
    import os

    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")


def onednn_allows_bf16() -> bool:
    """False where oneDNN is capped below the bf16 instruction sets (``ONEDNN_MAX_CPU_ISA=AVX2``, as used to
    stand in for an AVX2-only CPU, or by a user on a shared machine): bf16 would then be emulated."""
    cap = (onednn_cap() or "ALL").upper()
    return cap in ("ALL", "DEFAULT") or any(name in cap for name in ("BF16", "AMX", "FP16", "AVX10"))


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX tiles (oneDNN then runs bf16 convolutions natively), unless
    oneDNN is capped below them."""
    if not onednn_allows_bf16():
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except RuntimeError:
                continue
    return False


def resolve_precision(device: torch.device, requested: Optional[str] = "auto") -> str:
    """Detection's ``fp32`` or ``bf16`` for this device; ``auto``: bf16 on native-bf16 CPUs, fp32 elsewhere.

    On an H100, bf16 ran the network no faster (0.43 vs 0.37 ms per slice at batch 32, 0.29 at 128 in
    both; a three-stage detection's network phase 0.60 vs 0.49 s), so CUDA keeps fp32's exact maps."""
    requested = requested or "auto"
    if requested not in PRECISIONS:
        raise InputError(f"unknown precision {requested!r}; use auto, fp32 or bf16.")
    if device.type == "mps":
        return fp32_on_mps(requested)
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def fp32_on_mps(requested: str) -> str:
    """Apple's mps: fp32, whatever ``auto`` would pick elsewhere; bf16 asked for by name is refused."""
    if requested == "bf16":
        raise DeviceError("bf16 is not offered on Apple's mps device; use --precision fp32 or auto there, or "
                          "--device cpu.")
    return "fp32"


BF16_TRAINING_BATCH = 256  # per process, on CUDA; measured: bf16/fp32 0.69x at 32, 1.16x at 256 (H100)


def resolve_training_precision(device: torch.device, requested: str, batch_per_process: int,
                               compiled: bool) -> str:
    """Training's ``fp32`` or ``bf16``; ``auto``: bf16 where it was measured faster, fp32 elsewhere.

    On CPUs with native bf16 as for detection (an EPYC with AVX512-BF16, 2 cores: 1.69x at batch 8, 2.75x at
    16); on CUDA with a compiled network (1.72x the compiled fp32 step) or from BF16_TRAINING_BATCH slices."""
    if device.type == "mps":
        return fp32_on_mps(requested)
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if compiled or batch_per_process >= BF16_TRAINING_BATCH else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """The context the network runs in; fp32 needs none (an older torch, 2.2 say, the last for Intel Macs,
    refuses an autocast context on mps even when it is disabled)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_network(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Inference mode on ``device``; channels-last on CPU, where oneDNN's convolutions prefer it."""
    network = network.to(device).eval()
    if device.type == "cpu":
        network = network.to(memory_format=torch.channels_last)
    return network


def cpu_name() -> str:
    """The CPU model as the OS names it (benchmarks print it next to every figure)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_cpu() -> str:
    """``AMD EPYC ... (AVX512, native bf16: yes)``; a oneDNN cap is named, so that a capped run is never
    mistaken for a CPU that lacks the instructions."""
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    cap = onednn_cap()
    capped = f", oneDNN capped at {cap}" if cap else ""
    return f"{cpu_name()} ({capability}{capped}, native bf16: {'yes' if cpu_has_native_bf16() else 'no'})"

