"""Per-volume wall time of detection by phase, next to the reference research loop on the same network.

Why: the engine batches slices and keeps them on the device between stages; the original research code
runs one slice at a time and does the difference map, the fusion and the stopping test in numpy on the
host after every stage. This script measures what that design costs on a BraTS-sized volume
(240 x 240 x 155 voxels, 1 mm), with the same model, settings, number of stages, reading, preprocessing,
post-processing and writing, so the only difference between the two columns is the stage loop.

The reference loop is a drop-in replacement for ``synomaly.multistage.run_stages``, so both runs go
through ``synomaly.detection.detect`` and are timed by its own ``timings_s``.

Run:  python SynomalyEngine/benchmarks/bench_detection.py [--slices N] [--threads 1] [--device cpu]
"""
import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="bundled model name or .safetensors path (default: the bundled default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--slices", type=int, default=None,
                   help="run the reference loop on N evenly spaced slices only and extrapolate its network time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and OpenMP (default: 1)")
    p.add_argument("--stages", type=int, default=3, help="stages forced in both loops (default: 3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per network call in the engine (default: the engine's, 2 on CPU, 32 on CUDA)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each pipeline, interleaved; each phase reports its median (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="phantom and noise seed")
    return p.parse_args(argv)


SHOWN = ("mode", "noise_level", "max_stages", "kernel_size", "fusion_threshold", "min_component_px", "ensemble",
         "blur_mm", "min_component_mm3", "device")


@contextlib.contextmanager
def patched(module, name, value):
    """Swap a module attribute for the duration of a run; ``detect`` imports its helpers at call time."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def host_difference_map(x0, pred, fg, settings, sigma, truncate):
    """The research code's map on one 2D slice in numpy: blur both, difference, threshold, drop small blobs."""
    import numpy as np
    from scipy import ndimage

    from synomaly.multistage import remove_small_components_2d

    blur = (ndimage.gaussian_filter(x0, sigma, mode="mirror", truncate=truncate)
            - ndimage.gaussian_filter(pred, sigma, mode="mirror", truncate=truncate))
    diff = np.clip(settings.direction * blur, 0, None) if settings.signed else np.abs(blur)
    diff = diff * fg
    keep = remove_small_components_2d((diff > settings.fusion_threshold)[None], settings.min_component_px)[0]
    return diff * keep


def reference_stages(network, schedule, x0, foreground, settings, batch_size=16, generator=None,
                     progress=None, cancel=None):
    """The research loop, with ``run_stages``' signature: for each slice, for each stage, a tensor goes to
    the network, the prediction comes back to numpy for the map and the fusion, then back to a tensor.
    ``batch_size`` is ignored: the reference works on one slice at a time."""
    import numpy as np
    import torch

    from synomaly.errors import Cancelled
    from synomaly.multistage import StageResult, kernel_sigma, one_step_counterfactual

    sigma = kernel_sigma(settings.kernel_size)
    truncate = ((settings.kernel_size - 1) / 2) / sigma  # OpenCV's kernel radius for this kernel size
    device = x0.device
    preds, stages = [], []
    for i in range(x0.shape[0]):
        if cancel is not None and cancel():
            raise Cancelled("detection cancelled")
        x0_np = x0[i, 0].float().cpu().numpy()
        fg_np = foreground[i, 0].cpu().numpy().astype(np.float32)
        cache = x0_np
        prev_count = x0_np.size  # the research code starts from a map of ones
        for stage in range(1, settings.max_stages + 1):
            x = torch.from_numpy(np.ascontiguousarray(cache))[None, None].to(device)
            pred = one_step_counterfactual(network, schedule, x, settings.noise_level, generator)
            pred_np = pred[0, 0].float().cpu().numpy()
            m = host_difference_map(x0_np, pred_np, fg_np, settings, sigma, truncate)
            w = np.clip(m, 0, 1) if settings.soft_fusion else (m > 0).astype(np.float32)
            cache = (pred_np * w + x0_np * (1 - w)).astype(np.float32)
            count = int(np.count_nonzero(m))
            change = abs(prev_count - count) / max(prev_count, 500)
            prev_count = count
            if change < settings.tolerance:
                break
        preds.append(pred_np)
        stages.append(stage)
    return StageResult(torch.from_numpy(np.stack(preds))[:, None].to(device), stages)


def run_pipeline(path, model, settings, out_dir, slices=None):
    """Read, detect, write; phase times in seconds and the detection report."""
    from synomaly.cli import output_paths, write_outputs
    from synomaly.detection import detect
    from synomaly.output_set import OutputSet
    from synomaly.volume_io import read_volume

    t0 = time.perf_counter()
    volume, geometry = read_volume(path)
    read_s = time.perf_counter() - t0
    result = detect(volume, geometry, model, None, settings, slices=slices)
    os.makedirs(out_dir, exist_ok=True)
    paths = output_paths(Path(out_dir), "case", "nii.gz")
    t0 = time.perf_counter()
    with OutputSet(Path(out_dir), "case") as output_set:
        write_outputs(output_set, paths, result, geometry, volume)
    write_s = time.perf_counter() - t0
    t = result.report["timings_s"]
    phases = {"read": read_s, "preprocess": t["preprocess_s"], "network": t["network_s"],
              "post-process": t["postprocess_s"], "write": write_s}
    return phases, result.report


def median_phases(runs):
    """Median of each phase over repeated runs (the machine is shared, single runs are noisy); last report."""
    import statistics

    phases = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
    return phases, runs[-1][1]


def ratio(a, b):
    return f"{a / b:.2f}" if b > 0 else "n/a"


def forward_time_per_slice(network, size, batch, device, repeats=5):
    """Network call alone, seconds per slice at a given batch size (median of ``repeats``)."""
    import statistics

    import torch

    x = torch.randn(batch, 1, size, size, device=device)
    t = torch.full((batch,), 200, dtype=torch.long, device=device)
    times = []
    with torch.inference_mode():
        network(x, t)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            network(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch


def main(argv=None):
    args = parse_args(argv)
    # Thread counts must be set before numpy/torch load their thread pools.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import functools

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)

    import synomaly.multistage as multistage
    from synomaly.detection import DetectionSettings, resolve_device
    from synomaly.model_file import load_model
    from synomaly.network import count_parameters
    from synomaly.phantom import make_phantom
    from synomaly.preprocessing import PreprocessConfig, prepare_volume
    from synomaly.volume_io import write_volume

    device = resolve_device(args.device)
    model = load_model(args.model)
    size = int(model.metadata["preprocessing"]["image_size"])
    n_params = count_parameters(model.network)
    print(f"synomaly detection benchmark: torch {torch.__version__}, device {device}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, torch.get_num_threads()={torch.get_num_threads()}")
    print(f"model: {model.name} ({model.model_id}), {n_params:,} parameters, input {size}x{size}")

    with tempfile.TemporaryDirectory(prefix="synomaly-bench-") as tmp:
        t0 = time.perf_counter()
        phantom = make_phantom(shape=(155, 240, 240), spacing=(1, 1, 1), seed=args.seed)
        case = os.path.join(tmp, "case.nii.gz")
        write_volume(case, phantom.volume, phantom.geometry)
        print(f"volume: phantom seed {args.seed}, 240 x 240 x 155 voxels, 1 mm "
              f"(generated and written in {time.perf_counter() - t0:.1f} s, not timed below)")

        prepared = prepare_volume(phantom.volume, phantom.geometry,
                                  PreprocessConfig.from_dict(model.metadata["preprocessing"]))
        all_slices = prepared.slices
        ref_slices = None
        if args.slices is not None and args.slices < len(all_slices):
            pick = np.linspace(0, len(all_slices) - 1, max(1, args.slices)).round().astype(int)
            ref_slices = [all_slices[i] for i in sorted(set(pick.tolist()))]
        del prepared

        network = model.network.to(device).eval()
        batch = args.batch_size or (32 if device.type == "cuda" else 2)
        fwd_batch = forward_time_per_slice(network, size, batch, device)
        fwd_one = forward_time_per_slice(network, size, 1, device)

        settings = DetectionSettings(device=str(device), stages=args.stages, batch_size=batch,
                                     seed=args.seed)
        forced = functools.partial(multistage.StageSettings, tolerance=-1.0)
        runs = {"ours": [], "reference": [], "converging": []}
        for _ in range(max(1, args.repeats)):
            with patched(multistage, "StageSettings", forced):
                runs["ours"].append(run_pipeline(case, model, settings, os.path.join(tmp, "ours")))
                with patched(multistage, "run_stages", reference_stages):
                    runs["reference"].append(run_pipeline(case, model, settings, os.path.join(tmp, "reference"),
                                                          slices=ref_slices))
            runs["converging"].append(run_pipeline(case, model, settings, os.path.join(tmp, "converging")))
        (ours, ours_report), (ref, ref_report), (conv, conv_report) = (median_phases(runs[k])
                                                                       for k in ("ours", "reference", "converging"))

    n_ours = ours_report["slices_processed"]
    n_ref = ref_report["slices_processed"]
    ref_network_measured = ref["network"]
    if n_ref < n_ours:
        ref["network"] = ref_network_measured * n_ours / n_ref

    print()
    print(f"{'phase':<14}{'ours (s)':>10}{'reference (s)':>15}{'ratio ref/ours':>16}{'ours, converging (s)':>22}")
    for phase in ours:
        mark = "*" if phase == "network" and n_ref < n_ours else " "
        print(f"{phase:<14}{ours[phase]:>10.2f}{ref[phase]:>14.2f}{mark}{ratio(ref[phase], ours[phase]):>16}"
              f"{conv[phase]:>22.2f}")
    total_o, total_r, total_c = sum(ours.values()), sum(ref.values()), sum(conv.values())
    print(f"{'total':<14}{total_o:>10.2f}{total_r:>14.2f}{'*' if n_ref < n_ours else ' '}"
          f"{ratio(total_r, total_o):>16}{total_c:>22.2f}")
    print()
    print(f"slices processed: ours {n_ours}, reference {n_ref}"
          + (f" (* network time extrapolated x{n_ours / n_ref:.2f} from {n_ref} evenly spaced slices: "
             f"{ref_network_measured:.2f} s measured)" if n_ref < n_ours else "")
          + f", ours converging {conv_report['slices_processed']}")
    print(f"mean stages: ours {ours_report['mean_stages']:.2f}, reference {ref_report['mean_stages']:.2f} "
          f"(both forced to max_stages={args.stages}), ours converging {conv_report['mean_stages']:.2f} "
          f"(per-slice convergence, at most {args.stages})")
    shown = ", ".join(f"{k}={v}" for k, v in ours_report["settings"].items() if k in SHOWN)
    print(f"settings: {shown}")
    print(f"timings: median of {max(1, args.repeats)} interleaved runs per column")
    print(f"network size: {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB float32), input {size}x{size}")
    evals_o = n_ours * ours_report["mean_stages"]
    evals_r = n_ref * ref_report["mean_stages"]
    print(f"network phase per slice (all stages): ours {1e3 * ours['network'] / n_ours:.1f} ms, "
          f"reference {1e3 * ref_network_measured / n_ref:.1f} ms; "
          f"per slice and stage: ours {1e3 * ours['network'] / evals_o:.2f} ms, "
          f"reference {1e3 * ref_network_measured / evals_r:.2f} ms")
    print(f"network call alone per slice: {1e3 * fwd_batch:.2f} ms at batch {batch}, "
          f"{1e3 * fwd_one:.2f} ms at batch 1")
    print(f"anomalous volume: ours {ours_report['anomalous_volume_ml']:.2f} mL, ours converging "
          f"{conv_report['anomalous_volume_ml']:.2f} mL, phantom lesion {phantom.lesion_mask.sum() / 1000:.2f} mL")
    return 0


if __name__ == "__main__":
    sys.exit(main())
