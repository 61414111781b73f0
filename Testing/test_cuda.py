"""The CUDA path: the same detection and training as on the CPU, on a GPU. Skipped without CUDA (CI has
none); run on a GPU machine with ``pytest -m cuda Testing``."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")]


def test_detection_on_cuda_matches_the_cpu():
    from synomaly.inference.detection import DetectionSettings, detect
    from synomaly.evaluation.metrics import auprc, dice
    from synomaly.files.model_file import load_model
    from synomaly.evaluation.phantom import make_phantom

    phantom = make_phantom(seed=3)
    model = load_model("demo-phantom")
    gt = phantom.lesion_mask > 0
    results = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        result = detect(phantom.volume, phantom.geometry, model, settings=DetectionSettings(
            device=device, precision=precision))
        assert result.report["settings"]["device"].startswith(device)
        results[device, precision] = result
    reference = results["cpu", "fp32"]
    fg = reference.prepared.orientation.invert(reference.prepared.foreground)
    for key, result in results.items():
        assert abs(auprc(result.anomaly_map, gt, fg) - auprc(reference.anomaly_map, gt, fg)) < 0.01, key
        assert abs(dice(result.segmentation > 0, gt) - dice(reference.segmentation > 0, gt)) < 0.02, key
    # fp32 on the GPU computes the same function: the maps agree voxel by voxel up to rounding (TF32
    # convolutions and the fusion's threshold may flip a few border pixels).
    differing = np.abs(results["cuda", "fp32"].anomaly_map - reference.anomaly_map) > 0.02
    assert differing.mean() < 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda_writes_a_model_the_cpu_can_use(tmp_path, precision):
    from synomaly.inference.detection import DetectionSettings, detect
    from synomaly.files.model_file import load_model
    from synomaly.evaluation.phantom import make_phantom
    from synomaly.training.cases import TrainingCase
    from synomaly.training.loop import train
    from synomaly.training.settings import TrainingSettings

    cases = []
    for seed in range(2):
        ph = make_phantom(shape=(40, 96, 96), seed=seed, lesion=True)
        cases.append(TrainingCase(f"p{seed}", ph.volume, ph.geometry, labels=ph.lesion_mask > 0))
    losses = []
    settings = TrainingSettings(steps=30, batch_size=8, device="cuda", precision=precision, lesion_slices="mask",
                                checkpoint_every=10, preview_every=30)
    path = train(cases, tmp_path / "m.safetensors", settings, progress=lambda s, t, loss, m: losses.append(loss))
    assert np.isfinite(losses[-1])
    model = load_model(path)
    assert model.metadata["training"]["device"].startswith("cuda")
    assert model.metadata["training"]["precision"] == precision
    result = detect(cases[0].image, cases[0].geometry, model, settings=DetectionSettings(device="cpu"))
    assert np.isfinite(result.anomaly_map).all()


def test_blur_on_cuda_is_scipys_filter():
    """Detection blurs its map on the GPU when it runs there: the same filter as on the CPU."""
    from synomaly.inference.postprocessing import blur_map

    rng = np.random.default_rng(0)
    arr = np.zeros((40, 60, 50), dtype=np.float32)
    arr[5:30, 0:20, 10:45] = rng.random((25, 20, 35), dtype=np.float32)
    expected = blur_map(arr, 3.5, (1.0, 0.9, 0.9))
    got = blur_map(arr, 3.5, (1.0, 0.9, 0.9), torch.device("cuda"))
    np.testing.assert_allclose(got, expected, atol=1e-5)
