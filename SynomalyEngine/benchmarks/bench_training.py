"""Training throughput (samples per second) of ``synomaly.training.loop.train``, fp32 against bf16 autocast.

Both runs use the same phantom volumes, network and batch, one after the other in this process; the
first ``--warmup`` steps of each (allocation, autotuning) are not timed. Beside each, the network's own step
(forward, backward, AdamW on a batch already on the device, no noise, no per-step loss read-back): the
ceiling the whole loop could reach, which tells a data- or launch-bound loop from a compute-bound one.
The CPU's name and capability, and the GPU's, are printed first: figures are only comparable on the same
machine.

Run:  python SynomalyEngine/benchmarks/bench_training.py --device cuda [--steps 200] [--batch-size 32 128]
"""
import argparse
import os
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per precision (default: 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed first steps (default: 20)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[32],
                   help="one or more batch sizes, each timed in every precision (default: 32)")
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--res-blocks", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--compile", action="store_true",
                   help="also time each with torch.compile (train --compile); its compiling is in the warm-up")
    return p.parse_args(argv)


def network_step_rate(settings, device, steps, warmup):
    """Samples per second of the network's training step alone, on a random batch resident on ``device``."""
    import torch

    from synomaly.method.network import UNet

    torch.manual_seed(0)
    network = UNet(settings.network_config()).to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    forward = torch.compile(network) if settings.compile else network
    size = settings.image_size
    x = torch.randn(settings.batch_size, 1, size, size, device=device)
    t = torch.randint(0, 1000, (settings.batch_size,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16"):
            eps = forward(x, t)
        loss = ((eps.float() - x) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * settings.batch_size / (time.perf_counter() - t0)


def main(argv=None):
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from synomaly.inference.detection import resolve_device
    from synomaly.evaluation.phantom import make_phantom
    from synomaly.inference.runtime import describe_cpu
    from synomaly.training.cases import TrainingCase
    from synomaly.training.loop import train
    from synomaly.training.settings import TrainingSettings

    device = resolve_device(args.device)
    print(f"synomaly training benchmark: torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"CPU: {describe_cpu()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    cases = []
    for seed in range(3):
        ph = make_phantom(shape=(60, 128, 128), seed=seed, lesion=False)
        cases.append(TrainingCase(f"phantom{seed}", ph.volume, ph.geometry))
    timed_end = args.warmup + args.steps
    total = timed_end + 1  # the last step also writes the checkpoint: left out of the timing
    with tempfile.TemporaryDirectory(prefix="synomaly-bench-train-") as tmp:
        for batch_size in args.batch_size:
            rates = {}
            for compile_ in ([False, True] if args.compile else [False]):
                for precision in args.precisions:
                    marks = {}

                    def progress(step, _total, _loss, message):
                        if step in (args.warmup, timed_end) and message.startswith("step"):
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            marks[step] = time.perf_counter()

                    settings = TrainingSettings(steps=total, batch_size=batch_size, base_channels=args.base_channels,
                                                num_res_blocks=args.res_blocks, device=str(device),
                                                precision=precision, compile=compile_, checkpoint_every=10 ** 6,
                                                preview_every=10 ** 6, validation_fraction=0.15)
                    name = f"{precision}{' compiled' if compile_ else ''}"
                    train(cases, os.path.join(tmp, f"{precision}-{compile_}-{batch_size}.safetensors"), settings,
                          progress=progress)
                    seconds = marks[timed_end] - marks[args.warmup]
                    rates[name] = args.steps * batch_size / seconds
                    alone = network_step_rate(settings, device, args.steps, args.warmup)
                    print(f"batch {batch_size}, {name}: {rates[name]:.0f} samples/s "
                          f"({1e3 * seconds / args.steps:.1f} ms per step, {args.steps} steps timed after "
                          f"{args.warmup}); network step alone {alone:.0f} samples/s", flush=True)
            if "fp32" in rates:
                print(f"batch {batch_size}, over fp32: " + ", ".join(
                    f"{name} {rate / rates['fp32']:.2f}x" for name, rate in rates.items() if name != "fp32"),
                    flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
