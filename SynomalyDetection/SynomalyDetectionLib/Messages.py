"""Engine messages in the panel's words.

The engine's errors are written for its command line ("use --device cpu", "pass a label map as
--mask"); in Slicer the same advice names the panel's controls instead. Messages without a command-line
flag pass unchanged.
"""
import re

# (pattern, replacement), applied in order; the first ones catch whole sentences, the last single flags.
_REPLACEMENTS = [
    (r"Give a brain mask: in Slicer, (.*?) picked as the mask; on the command line --mask \S+, or --skull-strip "
     r"hd-bet where HD-BET is installed\. If the input is skull-stripped after all, turn the check off "
     r"\(--no-skull-check\)\.",
     r"Pick a brain mask as the Mask: \1. If the input is skull-stripped after all, "
     r"logic.detect(..., skull_check=False) in the Python console skips the check."),
    (r"pass --no-fit-check \(fit_check=False in Python\) to run it anyway\.",
     "logic.detect(..., fit_check=False) in the Python console runs it anyway."),
    (r"--device (\w+) was asked for but", r"The device '\1' was chosen but"),
    (r"use --device cpu or auto", "choose 'cpu' or 'auto' as the device (Advanced)"),
    (r"pass a label map as --mask", "choose a label map or segmentation as the Mask"),
    (r"resume it \(--resume\) or delete the folder", "click Resume to continue it, or delete the folder"),
    (r"--precision (\w+)", r"precision='\1' (Python console)"),
    (r"--device\b", "the device setting"),
    (r"--mask\b", "the Mask"),
    (r"--resume\b", "Resume"),
    (r"--threshold\b", "the threshold setting"),
    (r"--stages\b", "the stages setting"),
    (r"--noise-level\b", "the noise level setting"),
    (r"--ensemble\b", "the ensemble setting"),
    (r"--steps\b", "the steps setting"),
    (r"--preset\b", "the preset"),
    (r"--overwrite\b", "a new model name"),
    (r"(?<![\w-])(?:-o|--output)\b", "another folder"),
]


def panel_wording(message: str) -> str:
    """``message`` with command-line advice turned into the panel's wording."""
    for pattern, replacement in _REPLACEMENTS:
        message = re.sub(pattern, replacement, message)
    return message
