"""Is a brain volume skull-stripped? The brain models need it; a whole head is refused, not guessed at.

A brain model learnt skull-stripped FLAIR only: run on a whole head it calls skull, scalp and
everything unfamiliar anomalous (a healthy whole-head FLAIR came out 39 % "anomalous", exit 0).
Two measurements, on a copy coarsened to about 2 mm voxels, tell the two kinds of volume apart:

- ``constant_background``: the fraction of the voxels outside the head's outline that hold exactly
  the background value. Skull stripping sets everything outside the brain to one constant; a
  whole-head MR image has noisy air around the head (magnitude images are never constant there).
- ``dark_layer``: under the outline's surface, in 2 mm thick layers 2 to 20 mm deep, the largest
  fraction of voxels darker than 0.3 x the outline's median (above the background). Bone and the
  CSF around the brain make a dark layer under the scalp; a stripped brain's outer layers are cortex.

The outline is everything brighter than a tenth of the foreground's median (dim scalp included),
its largest piece, with holes filled slice by slice (the dark skull inside it included).

Measured with this code on all 38 real skull-stripped BraTS FLAIR volumes in the shared data
(brats2015: 6, z-scored; brats2018: 32, raw; training and development cases alike):
constant_background 0.993-1.000, dark_layer 0.004-0.142. On 24 phantoms with skull and scalp
(``phantom.make_phantom(head="bright" / "dark")``, 3 sizes and spacings, 4 seeds each):
constant_background 0.026-0.149, dark_layer 0.097-0.929; skull-stripped phantoms: 1.000 and <= 0.001.
Rule: skull-stripped when constant_background >= 0.5 and dark_layer <= 0.25. It passes every real
case and refuses every phantom with a head, the first measure alone with a wide margin both ways.
The second is a partial guard for whole heads whose air a scanner set to zero (phantoms with the
air zeroed: constant_background 0.995-1.000, and 20 of 24 refused on their dark layer).

Brain extraction itself is not ours to do: where HD-BET (the field's usual tool) is installed,
``hd_bet_brain_mask`` runs it; elsewhere it says how to install it.
"""
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from synomaly.errors import InputError
from synomaly.files.geometry import Geometry

CONSTANT_BACKGROUND_MIN = 0.5
DARK_LAYER_MAX = 0.25
DARK_FRACTION = 0.3        # "dark": below this fraction of the outline's median, above the background
OUTLINE_FRACTION = 0.1     # the outline: above this fraction of the foreground's median
LAYERS_MM = (2.0, 20.0, 2.0)  # depth range and layer thickness searched for a dark layer
COARSE_MM = 2.0

NOT_STRIPPED_HELP = (
    "the brain model expects skull-stripped FLAIR and would call skull and scalp anomalous. "
    "Give a brain mask: in Slicer, a brain segment from a skull-stripping extension (e.g. SwissSkullStripper "
    "or HD-BET) picked as the mask; on the command line --mask BRAIN_MASK, or --skull-strip hd-bet where "
    "HD-BET is installed. If the input is skull-stripped after all, turn the check off (--no-skull-check).")


@dataclass
class SkullStripFeatures:
    constant_background: float
    dark_layer: float

    @property
    def skull_stripped(self) -> bool:
        return self.constant_background >= CONSTANT_BACKGROUND_MIN and self.dark_layer <= DARK_LAYER_MAX

    def to_dict(self) -> dict:
        return dict(asdict(self), skull_stripped=self.skull_stripped)


def _coarse(volume: np.ndarray, geometry: Geometry):
    """Every n-th voxel along each axis, n making voxels about COARSE_MM: the measurement is about
    centimetre-scale layers, and a coarse copy keeps it to a fraction of a second on a full head."""
    spacing_zyx = np.array(list(reversed(geometry.spacing)), dtype=float)
    stride = np.maximum(1, np.floor(COARSE_MM / spacing_zyx)).astype(int)
    coarse = volume[::stride[0], ::stride[1], ::stride[2]].astype(np.float32)
    return coarse, spacing_zyx * stride


def _outline(volume: np.ndarray, background: float) -> np.ndarray:
    from scipy import ndimage

    from synomaly.inference.postprocessing import support_box
    from synomaly.inference.preprocessing import fill_holes_per_slice, foreground_mask

    foreground = foreground_mask(volume)
    reference = float(np.median(volume[foreground])) if foreground.any() else float(volume.max())
    outline = volume > background + OUTLINE_FRACTION * (reference - background)
    if not outline.any():
        return outline
    box = support_box(outline, (0,) * outline.ndim)  # labels of the box alone: the same pieces, less memory
    labels, n = ndimage.label(outline[box])
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        outline[box] = labels == sizes.argmax()
    return fill_holes_per_slice(outline)


def skull_strip_features(volume: np.ndarray, geometry: Geometry) -> SkullStripFeatures:
    """The two measurements described in the module docstring."""
    from scipy import ndimage

    from synomaly.files.volume_io import background_level
    from synomaly.inference.postprocessing import support_box
    from synomaly.inference.preprocessing import background_lowest

    coarse, spacing = _coarse(np.asarray(volume), geometry)
    coarse = background_lowest(coarse)
    background = background_level(coarse)
    outline = _outline(coarse, background)
    outside = outline.size - np.count_nonzero(outline)
    # Counted in place, without a copy of the voxels outside (nearly all of a small head's field of view).
    at_background = coarse <= background + 1e-6 * max(1.0, abs(background))
    at_background &= ~outline
    constant = float(np.count_nonzero(at_background) / outside) if outside else 0.0
    del at_background
    if not outline.any():
        return SkullStripFeatures(constant, 0.0)
    reference = float(np.median(coarse[outline]))
    # Depths only matter inside the outline: on its bounding box the distances are the same (the padding
    # is background just outside the box), and the transform, the costliest step, works on less.
    box = support_box(outline, (0,) * outline.ndim)
    outline, coarse = outline[box], coarse[box]
    # Padding makes the field of view's border a surface too, as for a head cut by the slab.
    depth = ndimage.distance_transform_edt(np.pad(outline, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    dark = coarse < background + DARK_FRACTION * (reference - background)
    start, stop, step = LAYERS_MM
    fractions = []
    for top in np.arange(start, stop, step):
        layer = outline & (depth > top) & (depth <= top + step)
        if layer.sum() >= 50:
            fractions.append(float(dark[layer].mean()))
    return SkullStripFeatures(constant, max(fractions) if fractions else 0.0)


def check_skull_stripped(volume: np.ndarray, geometry: Geometry) -> SkullStripFeatures:
    """Raise InputError, saying how to get a brain mask, unless the volume looks skull-stripped."""
    features = skull_strip_features(volume, geometry)
    if not features.skull_stripped:
        raise InputError(
            f"the input does not look skull-stripped ({features.constant_background:.0%} of the background is "
            f"constant, skull-stripped volumes have at least {CONSTANT_BACKGROUND_MIN:.0%}; a dark layer like "
            f"skull fills {features.dark_layer:.0%} of a layer under the surface, at most {DARK_LAYER_MAX:.0%} "
            f"in skull-stripped volumes): " + NOT_STRIPPED_HELP)
    return features


HD_BET_COMMAND = "hd-bet"
SKULL_STRIPPERS = ("hd-bet",)


def hd_bet_brain_mask(volume: np.ndarray, geometry: Geometry, device: str = "cpu") -> np.ndarray:
    """The brain mask HD-BET (version 2, the ``hd-bet`` command) finds in ``volume``, in its grid.

    HD-BET's own output (messages, files) stays in a temporary folder; a failure becomes one InputError.
    """
    from synomaly.files.volume_io import read_volume, write_volume

    command = shutil.which(HD_BET_COMMAND)
    if command is None:
        raise InputError("--skull-strip hd-bet was asked for but HD-BET is not installed (no 'hd-bet' command "
                         "found); install it with: pip install hd-bet (it downloads its network weights on first "
                         "use), or give a brain mask with --mask.")
    hd_device = "cuda" if str(device).startswith("cuda") else "cpu"
    with tempfile.TemporaryDirectory(prefix="synomaly-hd-bet-") as tmp:
        source, target = Path(tmp) / "input.nii.gz", Path(tmp) / "brain.nii.gz"
        write_volume(source, volume, geometry)
        args = [command, "-i", str(source), "-o", str(target), "-device", hd_device, "--save_bet_mask",
                "--no_bet_image"]
        if hd_device == "cpu":
            args.append("--disable_tta")
        try:
            run = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ))
        except OSError as exc:
            raise InputError(f"HD-BET could not be started ({exc}); reinstall it (pip install hd-bet) "
                             "or give a brain mask with --mask.") from None
        mask_path = Path(tmp) / "brain_bet.nii.gz"
        if run.returncode != 0 or not mask_path.exists():
            said = [line.strip() for line in (run.stderr + run.stdout).splitlines() if line.strip()]
            raise InputError(f"HD-BET failed (exit {run.returncode}: {said[-1] if said else 'no message'}); "
                             "give a brain mask with --mask instead.")
        mask, _ = read_volume(mask_path)
    if mask.shape != volume.shape:
        raise InputError(f"HD-BET returned a mask of size {tuple(reversed(mask.shape))} for an input of "
                         f"{tuple(reversed(volume.shape))}; give a brain mask with --mask instead.")
    if not (mask > 0).any():
        raise InputError("HD-BET found no brain in the input; check that it is a head MRI, or give --mask.")
    return (mask > 0).astype(np.uint8)
