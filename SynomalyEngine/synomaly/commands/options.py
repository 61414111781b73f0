"""Options that several commands share: the detection settings of detect and evaluate, and help texts
that keep their lines."""
import argparse


class KeepLines(argparse.HelpFormatter):
    """Fills a one-line text to the terminal's width; keeps a text written in lines as it is."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def detection_settings(args, **more):
    """The DetectionSettings of ``detection_options`` (shared by detect and evaluate), with a command's own."""
    from synomaly.inference.detection import DetectionSettings

    return DetectionSettings(device=args.device, stages=args.stages, noise_level=args.noise_level,
                             threshold=args.threshold, ensemble=args.ensemble, mode=args.mode,
                             precision=args.precision, min_component_mm3=args.min_component_mm3,
                             blur_mm=args.blur_mm, **more)


def detection_options(p):
    p.add_argument("--model", default=None, help="bundled model name or path to a .safetensors file "
                                                 "(default: the bundled brain FLAIR model)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps (Apple GPU, fp32)")
    p.add_argument("--stages", type=int, default=None, help="maximum number of stages (default: the model's)")
    p.add_argument("--noise-level", type=int, default=None, help="diffusion step t of the noise (default: the model's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="anomaly-map threshold (default: the model's calibrated one)")
    p.add_argument("--ensemble", type=int, default=None,
                   help="noise draws to average (default: the model's); >1 also writes an uncertainty map")
    p.add_argument("--mode", choices=("multi", "single"), default=None, help="multi-stage (default) or single-stage")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="network precision: auto (default) = bf16 on CPUs with native bf16 (AVX512-BF16, AMX), "
                        "fp32 elsewhere, CUDA included (bf16 measured no faster there)")
    p.add_argument("--min-component-mm3", type=float, default=None, help="drop smaller components (default: the model's)")
    p.add_argument("--blur-mm", type=float, default=None, help="Gaussian sigma of the anomaly map in mm (default: the "
                   "model's); less keeps lesions of a few mm, with more false positives (see the model card)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the CPUs this process may use, "
                   "at most SLURM_CPUS_PER_TASK or OMP_NUM_THREADS)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
