"""Per-volume wall time of detection by phase: the reference research loop, our previous path and today's default.

Columns, all on the same volume and weights, interleaved: the research code's loop (fp32, one slice at a
time, the difference map, fusion and stopping test in numpy on the host after every stage, stages forced);
our previous path (fp32, contiguous layout, batch of 2 on CPU, per-slice convergence); today's default path
at the same stages ("same work": the runtime's gain alone); and today's default with the model's own stage
count (precision chosen per machine: bf16 autocast where the CPU computes bf16 natively, channels-last on CPU).
Also: the network call alone per slice, the post-processing alone (previous vs now), and the peak resident
memory of a whole ``synomaly detect`` process on a BraTS-sized and on a 512 x 512 x 300 volume.
The CPU's name and capability are printed first: figures are only comparable on the same machine.

The reference loop is a drop-in replacement for ``synomaly.inference.multistage.run_stages``, so every column goes
through ``synomaly.inference.detection.detect`` and is timed by its own ``timings_s``.

Run:  python SynomalyEngine/benchmarks/bench_detection.py [--slices N] [--threads 2] [--device cpu]
"""
import argparse
import contextlib
import functools
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
    p.add_argument("--stages", type=int, default=3,
                   help="at most this many stages in the reference loop (forced), the previous path and the same-work "
                        "column (default: 3, the research method's); the default column uses the model's own")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per network call in the engine (default: the engine's, 2 on CPU, 32 on CUDA)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each pipeline, interleaved; each phase reports its median (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="phantom and noise seed")
    p.add_argument("--precision", default="auto", help="precision of the default column (default: auto)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--in-memory", action="store_true",
                   help="detect on the volume in memory: no file reading or writing (GPU machines without "
                        "SimpleITK; the GPU target excludes file reading); implies --no-memory")
    p.add_argument("--sweep", type=int, nargs="*", default=[],
                   help="also time the default path end to end at each of these batch sizes")
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

    from synomaly.inference.multistage import remove_small_components_2d

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
    from synomaly.inference.multistage import StageResult, kernel_sigma, one_step_counterfactual

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
    """Read, detect, write; phase times in seconds and the detection report. ``path`` may be a
    (volume, geometry) pair already in memory: then nothing is read or written (both phases 0)."""
    from synomaly.inference.detection import detect

    if isinstance(path, tuple):
        result = detect(*path, model, None, settings, slices=slices)
        t = result.report["timings_s"]
        return ({"read": 0.0, "preprocess": t["preprocess_s"], "network": t["network_s"],
                 "post-process": t["postprocess_s"], "write": 0.0}, result.report)
    from synomaly.files.outputs import output_paths, write_outputs
    from synomaly.files.output_set import OutputSet
    from synomaly.files.volume_io import read_volume

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


def plain_network(network, device):
    """The previous path: fp32 weights in the default (contiguous) layout. The engine's channels-last
    conversion is in place, so the layout is set back here explicitly."""
    import torch

    return network.to(device, memory_format=torch.contiguous_format).eval()


def previous_postprocessing(arr, threshold, min_mm3, voxel_mm3, spacing, sigma_mm):
    """The previous post-processing on the same map: whole-volume blur, label to filter, label again."""
    import numpy as np
    from scipy import ndimage

    structure = np.ones((3, 3, 3), dtype=bool)
    blurred = ndimage.gaussian_filter(arr.astype(np.float32), sigma=[sigma_mm / s for s in spacing], mode="nearest")
    labels, n = ndimage.label(blurred > threshold, structure=structure)
    keep = np.bincount(labels.ravel(), minlength=n + 1) * voxel_mm3 >= min_mm3
    keep[0] = False
    seg = keep[labels]
    labels, n = ndimage.label(seg, structure=structure)
    if n:
        index = np.arange(1, n + 1)
        ndimage.maximum(blurred, labels, index)
        ndimage.center_of_mass(seg, labels, index)
    return seg


def peak_memory_mb(path, args, out_dir):
    """Peak resident memory of a whole ``synomaly detect`` run in a fresh process (MiB)."""
    import subprocess

    # VmHWM is this process's own high-water mark; ru_maxrss would report at least the RSS this benchmark
    # had when it started the process (Linux folds the forked copy's size into it at exec).
    code = ("import resource, sys\nfrom synomaly.commands.cli import main\nrc = main(sys.argv[1:])\n"
            "try:\n    peak = [int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')][0]\n"
            "except (OSError, IndexError):\n    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print('PEAK', peak / 1024)\nsys.exit(rc)")
    cmd = [sys.executable, "-c", code, "detect", str(path), "-o", str(out_dir), "-q", "--overwrite",
           "--device", args.device]
    if args.model:
        cmd += ["--model", args.model]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return float("nan"), done.stderr.strip().splitlines()[-1:]
    peak = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK")]
    return peak[0], []


def main(argv=None):
    args = parse_args(argv)
    # Thread counts must be set before numpy/torch load their thread pools.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)

    import synomaly.inference.multistage as multistage
    import synomaly.inference.runtime as runtime
    from synomaly.inference.detection import DetectionSettings, resolve_device
    from synomaly.files.model_file import load_model
    from synomaly.method.network import count_parameters
    from synomaly.evaluation.phantom import make_phantom
    from synomaly.inference.preprocessing import PreprocessConfig, prepare_volume
    from synomaly.files.volume_io import write_volume

    device = resolve_device(args.device)
    model = load_model(args.model)
    size = int(model.metadata["preprocessing"]["image_size"])
    n_params = count_parameters(model.network)
    precision = runtime.resolve_precision(device, args.precision)
    print(f"synomaly detection benchmark: torch {torch.__version__}, device {device}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, torch.get_num_threads()={torch.get_num_threads()}")
    print(f"CPU: {runtime.describe_cpu()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    print(f"model: {model.name} ({model.model_id}), {n_params:,} parameters, input {size}x{size}")

    with tempfile.TemporaryDirectory(prefix="synomaly-bench-") as tmp:
        t0 = time.perf_counter()
        phantom = make_phantom(shape=(155, 240, 240), spacing=(1, 1, 1), seed=args.seed)
        if args.in_memory:
            case = (phantom.volume, phantom.geometry)
        else:
            case = os.path.join(tmp, "case.nii.gz")
            write_volume(case, phantom.volume, phantom.geometry)
        print(f"volume: phantom seed {args.seed}, 240 x 240 x 155 voxels, 1 mm "
              f"(generated{'' if args.in_memory else ' and written'} in {time.perf_counter() - t0:.1f} s, "
              "not timed below)")

        prepared = prepare_volume(phantom.volume, phantom.geometry,
                                  PreprocessConfig.from_dict(model.metadata["preprocessing"]))
        all_slices = prepared.slices
        ref_slices = None
        if args.slices is not None and args.slices < len(all_slices):
            pick = np.linspace(0, len(all_slices) - 1, max(1, args.slices)).round().astype(int)
            ref_slices = [all_slices[i] for i in sorted(set(pick.tolist()))]
        del prepared

        old_batch = 32 if device.type == "cuda" else 2
        batch = args.batch_size or old_batch
        network = model.network
        fwd = {}
        for name, prec, layout in (("fp32", "fp32", plain_network), (precision, precision, runtime.prepare_network)):
            net = layout(network, device)
            with runtime.autocast(device, prec):
                fwd[name] = (forward_time_per_slice(net, size, batch, device),
                             forward_time_per_slice(net, size, 1, device))

        fp32 = DetectionSettings(device=str(device), stages=args.stages, batch_size=old_batch, seed=args.seed,
                                 precision="fp32")
        same = DetectionSettings(device=str(device), stages=args.stages, batch_size=args.batch_size,
                                 seed=args.seed, precision=args.precision)
        default = DetectionSettings(device=str(device), batch_size=args.batch_size, seed=args.seed,
                                    precision=args.precision)
        forced = functools.partial(multistage.StageSettings, tolerance=-1.0)
        runs = {"reference": [], "previous": [], "same work": [], "default": []}
        for _ in range(max(1, args.repeats)):
            with patched(runtime, "prepare_network", plain_network):
                with patched(multistage, "StageSettings", forced), patched(multistage, "run_stages", reference_stages):
                    runs["reference"].append(run_pipeline(case, model, fp32, os.path.join(tmp, "reference"),
                                                          slices=ref_slices))
                runs["previous"].append(run_pipeline(case, model, fp32, os.path.join(tmp, "previous")))
            runs["same work"].append(run_pipeline(case, model, same, os.path.join(tmp, "same")))
            runs["default"].append(run_pipeline(case, model, default, os.path.join(tmp, "default")))
        (ref, ref_report), (prev, prev_report), (same_t, same_report), (new, new_report) = (
            median_phases(runs[k]) for k in ("reference", "previous", "same work", "default"))

        # Post-processing alone, previous vs now, on the same raw map (the phase above also holds the
        # inverse reorientation and the counterfactual's intensity mapping).
        from synomaly.inference.postprocessing import blur_map, segment
        raw = np.zeros(phantom.volume.shape, dtype=np.float32)
        raw[phantom.lesion_mask > 0] = 0.5
        raw += (np.random.default_rng(0).random(raw.shape, dtype=np.float32) * 0.05) * (phantom.volume > 0)
        s = new_report["settings"]
        cut = 0.25  # half the synthetic lesion's value: the model's threshold may be in other units (map_scale)
        t0 = time.perf_counter()
        previous_postprocessing(raw, cut, s["min_component_mm3"], 1.0, (1, 1, 1), s["blur_mm"])
        post_prev = time.perf_counter() - t0
        t0 = time.perf_counter()
        segment(blur_map(raw, s["blur_mm"], (1, 1, 1)), cut, s["min_component_mm3"], 1.0)
        post_new = time.perf_counter() - t0

        sweep = {}
        for b in args.sweep:
            sized = DetectionSettings(device=str(device), batch_size=b, seed=args.seed,
                                      precision=args.precision)
            sweep[b] = median_phases([run_pipeline(case, model, sized, os.path.join(tmp, f"sweep{b}"))
                                      for _ in range(max(1, args.repeats))])[0]
        memory = {}
        if not (args.no_memory or args.in_memory):
            memory["240 x 240 x 155"] = peak_memory_mb(case, args, os.path.join(tmp, "mem1"))
            import SimpleITK as sitk
            from scipy import ndimage

            small = make_phantom(shape=(75, 128, 128), seed=args.seed).volume
            big = sitk.GetImageFromArray(ndimage.zoom(small, (4, 4, 4), order=1).astype(np.int16))
            big.SetSpacing((0.45, 0.45, 0.6))
            big_path = os.path.join(tmp, "big.nii.gz")
            sitk.WriteImage(big, big_path)
            del big, small
            memory["512 x 512 x 300"] = peak_memory_mb(big_path, args, os.path.join(tmp, "mem2"))

    n_new = new_report["slices_processed"]
    n_ref = ref_report["slices_processed"]
    ref_network_measured = ref["network"]
    if n_ref < n_new:
        ref["network"] = ref_network_measured * n_new / n_ref

    print()
    print(f"{'phase (s)':<14}{'reference loop':>16}{'previous (fp32)':>17}{'same work':>11}"
          f"{'default (' + precision + ')':>16}{'ref/same':>10}{'ref/default':>13}")
    for phase in new:
        mark = "*" if phase == "network" and n_ref < n_new else " "
        print(f"{phase:<14}{ref[phase]:>15.2f}{mark}{prev[phase]:>17.2f}{same_t[phase]:>11.2f}{new[phase]:>16.2f}"
              f"{ratio(ref[phase], same_t[phase]):>10}{ratio(ref[phase], new[phase]):>13}")
    tr, tp, ts, tn = sum(ref.values()), sum(prev.values()), sum(same_t.values()), sum(new.values())
    print(f"{'total':<14}{tr:>15.2f}{'*' if n_ref < n_new else ' '}{tp:>17.2f}{ts:>11.2f}{tn:>16.2f}"
          f"{ratio(tr, ts):>10}{ratio(tr, tn):>13}")
    print()
    print("reference loop: fp32, contiguous layout, one slice at a time, host round trip per stage, "
          f"{args.stages} stages forced; previous: fp32, contiguous, batch {old_batch}, at most {args.stages} stages, "
          f"per-slice convergence; same work: the default path at most {args.stages} stages; default: precision "
          f"{precision}, channels-last on CPU, batch {default.batch_size or old_batch}, the model's stages "
          f"(at most {new_report['settings']['max_stages']}), per-slice convergence")
    print(f"slices processed: {n_new}" + (f" (* reference network time extrapolated x{n_new / n_ref:.2f} from "
                                          f"{n_ref} evenly spaced slices: {ref_network_measured:.2f} s measured)"
                                          if n_ref < n_new else ""))
    print(f"mean stages: reference {ref_report['mean_stages']:.2f} (forced), previous {prev_report['mean_stages']:.2f},"
          f" same work {same_report['mean_stages']:.2f}, default {new_report['mean_stages']:.2f}")
    shown = ", ".join(f"{k}={v}" for k, v in new_report["settings"].items() if k in SHOWN)
    print(f"settings: {shown}")
    print(f"timings: median of {max(1, args.repeats)} interleaved runs per column")
    for name, (at_batch, at_one) in fwd.items():
        print(f"network call alone per slice, {name}: {1e3 * at_batch:.2f} ms at batch {batch}, "
              f"{1e3 * at_one:.2f} ms at batch 1")
    print(f"post-processing alone on one map: previous {post_prev:.3f} s, now {post_new:.3f} s "
          f"({ratio(post_prev, post_new)}x)")
    print(f"anomalous volume: previous {prev_report['anomalous_volume_ml']:.2f} mL, default "
          f"{new_report['anomalous_volume_ml']:.2f} mL, phantom lesion {phantom.lesion_mask.sum() / 1000:.2f} mL")
    for b, phases in sweep.items():
        print(f"default path at batch {b}: total {sum(phases.values()):.2f} s (network {phases['network']:.2f} s, "
              f"preprocess {phases['preprocess']:.2f} s, post-process {phases['post-process']:.2f} s)")
    for shape, (peak, err) in memory.items():
        print(f"peak resident memory of `synomaly detect` on {shape}: "
              + (f"{peak:.0f} MiB" if not err else f"failed: {err}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
