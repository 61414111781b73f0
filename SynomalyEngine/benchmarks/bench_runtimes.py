"""The network call alone, per 128 x 128 slice, in each way of running it on this CPU.

Why: the network is most of detection's time. This compares eager PyTorch (fp32 and bf16 autocast, contiguous
and channels-last), ``torch.compile``, ONNX Runtime and OpenVINO (each only when installed; the exported
model is built from the same weights), at several batch sizes, so the engine's default is picked by
measurement on the machine at hand. The CPU's name and capability come first.

Run:  python SynomalyEngine/benchmarks/bench_runtimes.py [--threads 2] [--batches 1 2 4 8 16] [--repeats 5]
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="bundled model name or .safetensors path (default: the default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], help="ways to leave out, e.g. compile openvino")
    return p.parse_args(argv)


def per_slice_ms(call, batch, repeats):
    call()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) / batch


def main(argv=None):
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from synomaly.files.model_file import load_model
    from synomaly.inference.runtime import describe_cpu

    model = load_model(args.model)
    size = int(model.metadata["preprocessing"]["image_size"])
    base = model.network.float().eval()
    print(f"torch {torch.__version__}, {args.threads} threads; CPU: {describe_cpu()}")
    print(f"model {model.name} ({model.model_id}), input {size}x{size}; ms per slice, median of {args.repeats}")

    def timed(net, bf16):
        """A call factory for ``net`` under autocast; each way gets its own copy of the weights, since
        ``Module.to(memory_format=...)`` converts in place."""
        def make(x, t):
            def call():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return net(x, t).float().numpy()
            return call
        return make

    def copy_in(layout):
        return copy.deepcopy(base).to(memory_format=layout)

    ways = {
        "eager fp32": timed(copy_in(torch.contiguous_format), False),
        "eager fp32 channels-last": timed(copy_in(torch.channels_last), False),
        "eager bf16": timed(copy_in(torch.contiguous_format), True),
        "eager bf16 channels-last": timed(copy_in(torch.channels_last), True),
    }
    if "compile" not in args.skip:
        compiled = torch.compile(copy_in(torch.channels_last), dynamic=False)
        ways["torch.compile fp32"] = timed(compiled, False)
        ways["torch.compile bf16"] = timed(compiled, True)

    reference = copy_in(torch.contiguous_format)
    tmp = tempfile.mkdtemp(prefix="synomaly-rt-")
    onnx_path = os.path.join(tmp, "unet.onnx")
    exported = False
    try:
        x0 = torch.randn(2, 1, size, size)
        t0 = torch.full((2,), 200, dtype=torch.long)
        torch.onnx.export(copy_in(torch.contiguous_format), (x0, t0), onnx_path,
                          input_names=["x", "t"], output_names=["eps"],
                          dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}})
        exported = True
    except Exception as exc:  # the exporters change between torch versions: say why and go on
        print(f"ONNX export failed, ONNX Runtime and OpenVINO skipped: {type(exc).__name__}: {exc}"[:300])
    if exported and "onnxruntime" not in args.skip:
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
            session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])

            def make_ort(x, t):
                feeds = {"x": x.numpy(), "t": t.numpy()}
                return lambda: session.run(None, feeds)[0]
            ways["onnxruntime fp32"] = make_ort
        except ImportError:
            print("onnxruntime not installed: skipped")
    if exported and "openvino" not in args.skip:
        try:
            import openvino as ov

            core = ov.Core()
            for hint in ("f32", "bf16"):
                cfg = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": hint}
                try:
                    compiled_ov = core.compile_model(onnx_path, "CPU", cfg)
                except Exception as exc:
                    print(f"OpenVINO {hint}: {exc}"[:200])
                    continue

                def make_ov(x, t, c=compiled_ov):
                    feeds = {"x": x.numpy(), "t": t.numpy()}
                    return lambda: c(feeds)[0]
                ways[f"openvino {hint}"] = make_ov
        except ImportError:
            print("openvino not installed: skipped")

    print(f"{'way':<28}" + "".join(f"{'b=' + str(b):>9}" for b in args.batches) + "   max |diff| vs eager fp32")
    for name, make in ways.items():
        row, err = [], 0.0
        for b in args.batches:
            x = torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(b))
            t = torch.full((b,), 200, dtype=torch.long)
            call = make(x.contiguous(memory_format=torch.channels_last) if "channels-last" in name else x, t)
            row.append(per_slice_ms(call, b, args.repeats))
            with torch.inference_mode():
                ref = reference(x, t).numpy()
            err = max(err, float(np.abs(np.asarray(call(), dtype=np.float32).reshape(ref.shape) - ref).max()))
        print(f"{name:<28}" + "".join(f"{v:>9.1f}" for v in row) + f"   {err:.3g}")
    print("(ratios: divide the eager fp32 row by a row, column by column)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
