"""CPU inference time per 128x128 slice and parameter count of our UNet and MONAI's DiffusionModelUNet.

Why: the default network is chosen by measurement (issue 2, Network point 3): MONAI's
``DiffusionModelUNet`` is the field's well-kept implementation and is used unless ours measures better.
Both are built at the same sizes (channels b, 2b, 2b, 4b; attention at the 16x16 level and in the middle;
the same number of residual blocks per level) and timed on the same batch, one after the other.
MONAI is optional: it is not a dependency of the engine; install it into the venv only to run this
comparison (``pip install monai``).

Run:  python SynomalyEngine/benchmarks/bench_network.py [--bases 16 32 64] [--res-blocks 1 2] [--threads 1]
"""
import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bases", type=int, nargs="+", default=[16, 32, 64], help="base channel counts")
    p.add_argument("--res-blocks", type=int, nargs="+", default=[1, 2], help="residual blocks per level")
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2, 4], help="channel multipliers per level")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed batches after one warm-up; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and OpenMP (default: 1)")
    p.add_argument("--stages", type=int, default=3, help="stages assumed for the per-volume estimate")
    p.add_argument("--volume-slices", type=int, default=155, help="slices assumed for the per-volume estimate")
    p.add_argument("--no-monai", action="store_true", help="time our UNet only")
    return p.parse_args(argv)


def time_per_slice(networks, batch, size, repeats):
    """Median seconds per slice of one forward pass on a (batch, 1, size, size) input, for each network.

    The networks take turns batch by batch after a warm-up each, so a change in the load of a shared
    machine hits them alike rather than whichever happens to run later."""
    import torch

    x = torch.randn(batch, 1, size, size)
    t = torch.randint(100, 300, (batch,))
    times = [[] for _ in networks]
    with torch.inference_mode():
        for net in networks:
            out = net(x, t)
            if out.shape != x.shape:
                raise RuntimeError(f"output shape {tuple(out.shape)} differs from the input's {tuple(x.shape)}")
        for _ in range(repeats):
            for net, record in zip(networks, times):
                t0 = time.perf_counter()
                net(x, t)
                record.append(time.perf_counter() - t0)
    return [statistics.median(record) / batch for record in times]


def ours(base, res_blocks, mult, size):
    from synomaly.method.network import UNet, UNetConfig

    return UNet(UNetConfig(base_channels=base, num_res_blocks=res_blocks, channel_mult=tuple(mult),
                           image_size=size)).eval()


def monai_unet(base, res_blocks, mult, size):
    """The closest MONAI configuration: our attention sits at 16x16 (and 8x8) and in the middle block;
    our heads are at most 4, so the head width is a quarter of the attention level's channels."""
    from monai.networks.nets import DiffusionModelUNet

    channels = [base * m for m in mult]
    attention = [size // 2 ** level in (16, 8) for level in range(len(mult))]
    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=res_blocks,
                              channels=channels, attention_levels=attention, norm_num_groups=min(32, base),
                              num_head_channels=max(1, channels[-1] // 4)).eval()


def main(argv=None):
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    monai_version = None
    if not args.no_monai:
        try:
            import monai

            monai_version = monai.__version__
        except ImportError:
            pass
    print(f"network benchmark: torch {torch.__version__}, CPU, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, "
          f"torch.get_num_threads()={torch.get_num_threads()}, MONAI {monai_version or 'not installed'}")
    print(f"input {args.batch} x 1 x {args.image_size} x {args.image_size}, channel_mult {tuple(args.channel_mult)}, "
          f"median of {args.repeats} batches after one warm-up, the networks taking turns; "
          f"volume = {args.volume_slices} slices x {args.stages} stages")
    print()
    head = f"{'base':>4} {'res':>3} | {'ours params':>12} {'ms/slice':>9} {'s/volume':>9}"
    if monai_version:
        head += f" | {'MONAI params':>12} {'ms/slice':>9} {'s/volume':>9} | {'MONAI/ours time':>15}"
    print(head)
    print("-" * len(head))
    per_volume = args.volume_slices * args.stages
    for base in args.bases:
        for res_blocks in args.res_blocks:
            torch.manual_seed(0)
            nets = [ours(base, res_blocks, args.channel_mult, args.image_size)]
            if monai_version:
                nets.append(monai_unet(base, res_blocks, args.channel_mult, args.image_size))
            counts = [sum(p.numel() for p in net.parameters()) for net in nets]
            times = time_per_slice(nets, args.batch, args.image_size, args.repeats)
            del nets
            row = (f"{base:>4} {res_blocks:>3} | {counts[0]:>12,} {1e3 * times[0]:>9.1f}"
                   f" {times[0] * per_volume:>9.1f}")
            if monai_version:
                row += (f" | {counts[1]:>12,} {1e3 * times[1]:>9.1f} {times[1] * per_volume:>9.1f}"
                        f" | {times[1] / times[0]:>15.2f}")
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
