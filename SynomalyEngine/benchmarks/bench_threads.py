"""How to use the cores for the network: one stream of batches on all intra-op threads (the engine's way
today) against one Python thread per core, each with one intra-op thread, running its share of the batches.

Why: on 2 cores a 128 x 128 slice is too small for two intra-op threads to split well; two independent
streams keep both cores busy. Both columns run the same network, precision and batches in the same process,
alternated, so the ratio holds on the machine at hand. The CPU's name and capability come first.

Run:  python SynomalyEngine/benchmarks/bench_threads.py [--threads 2] [--precision bf16] [--slices 64] [--repeats 3]
"""
import argparse
import statistics
import threading
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="bundled model name or .safetensors path (default: the default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from synomaly.files.model_file import load_model
    from synomaly.inference.runtime import autocast, describe_cpu, prepare_network

    device = torch.device("cpu")
    model = load_model(args.model)
    network = prepare_network(model.network, device)
    batches = list(torch.randn(args.slices, 1, 128, 128).split(args.batch))
    timesteps = torch.full((args.batch,), 200)

    def run(share):
        with torch.no_grad(), autocast(device, args.precision):
            for x in share:
                network(x, timesteps[:x.shape[0]])

    def one_stream():
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        run(batches)
        return time.perf_counter() - t0

    def streams():
        torch.set_num_threads(1)
        workers = [threading.Thread(target=run, args=(batches[i::args.threads],)) for i in range(args.threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - t0

    print(describe_cpu())
    print(f"model {model.name} ({model.model_id}), {args.precision}, batch {args.batch}, {args.slices} slices, "
          f"{args.threads} cores")
    run(batches[:2])
    times = {"one stream": [], "a stream per core": []}
    for _ in range(args.repeats):
        times["one stream"].append(one_stream())
        times["a stream per core"].append(streams())
    ms = {way: statistics.median(t) / args.slices * 1000 for way, t in times.items()}
    for way, value in ms.items():
        print(f"{way:>18}: {value:6.1f} ms per slice (runs: {', '.join(f'{t / args.slices * 1000:.1f}' for t in times[way])})")
    print(f"ratio: x{ms['one stream'] / ms['a stream per core']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
