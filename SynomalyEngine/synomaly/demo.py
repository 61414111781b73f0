"""The demo: a generated phantom with a known lesion, the bundled demo model, all outputs, the Dice.

Works on a fresh machine with nothing but the install: no downloads, no shared data.
"""
import sys
from pathlib import Path

DEMO_SEED = 2025
TRAIN_SEEDS = range(100, 112)


def demo_training_settings(steps: int = 600, device: str = "auto"):
    from .training import TrainingSettings

    return TrainingSettings(preset="brain-flair", steps=steps, batch_size=8, lr=5e-4, image_size=64,
                            base_channels=16, num_res_blocks=1, attention_resolutions=(8,), checkpoint_every=100,
                            preview_every=max(100, steps), min_slice_foreground=0.02, device=device,
                            name="demo-phantom", ema_decay=0.995,
                            description="Demo model trained on 12 healthy brain phantoms (not for real data)")


def train_demo_model(output: Path, steps: int = 600, device: str = "auto", progress=None) -> Path:
    """Train the demo model on healthy phantoms: about two minutes on two CPU cores."""
    import tempfile

    from .phantom import write_phantom_case
    from .training import train

    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for seed in TRAIN_SEEDS:
            folder = Path(tmp) / f"healthy{seed}"
            write_phantom_case(folder, seed=seed, lesion=False)
            folders.append(folder)
        return train(folders, output, demo_training_settings(steps, device), progress=progress)


def demo_model(device: str = "auto", quiet: bool = False):
    """The bundled demo model; trained into the user's cache if a source checkout lacks it."""
    from .model_file import BUNDLED_DIR, DEMO_MODEL, load_model

    if (BUNDLED_DIR / f"{DEMO_MODEL}.safetensors").exists():
        return load_model(DEMO_MODEL)
    cache = Path.home() / ".cache" / "synomaly" / f"{DEMO_MODEL}.safetensors"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print("training the demo model on healthy phantoms (about two minutes)...", file=sys.stderr)
        train_demo_model(cache, device=device)
    return load_model(cache)


def run_demo(out_dir: Path, device: str = "auto", overwrite: bool = False, quiet: bool = False) -> dict:
    from .baseline import baseline_for, baseline_segmentation
    from .cli import Progress, check_writable, output_paths, refuse_existing, write_outputs
    from .detection import DetectionSettings, detect
    from .metrics import auprc, dice
    from .output_set import OutputFolder, OutputSet
    from .phantom import make_phantom
    from .volume_io import write_volume

    out_dir = Path(out_dir)
    paths = output_paths(out_dir, "phantom", "nii.gz")
    inputs = {"image": out_dir / "phantom_flair.nii.gz", "lesion": out_dir / "phantom_lesion.nii.gz"}
    check_writable(out_dir)
    # Inputs and outputs appear together at the end, or (after an error) not at all.
    with OutputFolder(out_dir), OutputSet(out_dir, "phantom") as output_set:
        if not overwrite:
            refuse_existing(list(paths.values()) + list(inputs.values()))
        phantom = make_phantom(lesion=True, seed=DEMO_SEED)
        write_volume(output_set.stage(inputs["image"]), phantom.volume, phantom.geometry)
        write_volume(output_set.stage(inputs["lesion"]), phantom.lesion_mask, phantom.geometry)
        model = demo_model(device, quiet)
        bar = Progress("demo", enabled=not quiet)
        try:
            result = detect(phantom.volume, phantom.geometry, model, settings=DetectionSettings(device=device),
                            progress=bar)
        finally:
            bar.close()
        write_outputs(output_set, paths, result, phantom.geometry, phantom.volume, ground_truth=phantom.lesion_mask)
    gt = phantom.lesion_mask > 0
    fg = phantom.brain_mask > 0
    base_scores = baseline_for(result.prepared)
    base_threshold = model.metadata["calibration"]["baseline_threshold"]
    figures = {
        "dice": dice(result.segmentation, gt), "auprc": auprc(result.anomaly_map, gt, fg),
        "baseline_dice": dice(baseline_segmentation(base_scores, base_threshold, fg), gt),
        "baseline_auprc": auprc(base_scores, gt, fg),
    }
    print(f"input:          {inputs['image']} (known lesion: {inputs['lesion']})")
    for kind in ("anomaly_seg", "anomaly_map", "counterfactual", "report", "overview"):
        print(f"{kind + ':':15s} {paths[kind]}")
    print(f"Dice against the known lesion: {figures['dice']:.3f} (AUPRC {figures['auprc']:.3f}); "
          f"intensity-threshold baseline: Dice {figures['baseline_dice']:.3f} (AUPRC {figures['baseline_auprc']:.3f})")
    return figures
