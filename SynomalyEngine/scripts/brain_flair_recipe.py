"""The recipe of the shipped brain FLAIR model: which cases, which settings. Used by
train_brain_model.py and choose_settings.py so both see exactly the same data and split.

Training data: the tumour-free axial slices of the training cases of ../shared/data (see the data
READMEs). The development cases pat0001, pat0002, Brats18_CBICA_ARW_1 and Brats18_CBICA_ATV_1 are
never read here.
"""
from pathlib import Path

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TRAINING_CASES = [DATA / "brats2015" / f"pat000{i}" for i in (3, 4, 5, 6)] + [
    DATA / "brats2018" / name for name in
    ("Brats18_CBICA_AAB_1", "Brats18_CBICA_AQN_1", "Brats18_CBICA_ASA_1", "Brats18_TCIA08_105_1")]
DEVELOPMENT_CASES = [DATA / "brats2015" / "pat0001", DATA / "brats2015" / "pat0002",
                     DATA / "brats2018" / "Brats18_CBICA_ARW_1", DATA / "brats2018" / "Brats18_CBICA_ATV_1"]


def training_settings(steps: int, device: str = "auto"):
    from synomaly.training import TrainingSettings

    return TrainingSettings(steps=steps, batch_size=8, num_res_blocks=1, min_slice_foreground=0.08,
                            checkpoint_every=50, preview_every=250, device=device, name="brain-flair",
                            description="Brain MRI FLAIR (BraTS 2015 + 2018 healthy slices), Synomaly brain preset")
