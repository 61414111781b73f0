"""Published Synomaly presets: noise parameters bundled with the intensity handling they assume."""
from dataclasses import asdict, dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Preset:
    name: str
    sigma: float
    threshold: float
    offset: float
    direction: Tuple[int, ...]
    intensity: str  # "robust": per-volume robust scaling; "window": fixed window, e.g. CT HU
    window: Optional[Tuple[float, float]] = None
    description: str = ""
    skull_stripped: bool = False  # the input must be skull-stripped (brain): whole heads are refused
    # The organ whose mask detection and training need ("" = a mask is optional): the blobs were placed,
    # and the map is kept, inside it only. Where such a mask comes from, on the command line and in Slicer:
    organ: str = ""
    mask_source: str = ""
    mask_source_slicer: str = ""

    def noise_params(self) -> dict:
        direction = self.direction[0] if len(self.direction) == 1 else list(self.direction)
        return {"sigma": self.sigma, "threshold": self.threshold, "offset": self.offset, "direction": direction}

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "brain-flair": Preset("brain-flair", 3.0, 175.0, 0.5, (1,), "robust",
                          description="Brain MRI FLAIR: tumours are hyperintense (BraTS preset). "
                                      "Input: skull-stripped FLAIR.", skull_stripped=True),
    "liver-ct": Preset("liver-ct", 3.0, 175.0, 1.0, (-1,), "window", (0.0, 150.0),
                       description="Liver CT clipped to [0, 150] HU; blobs restricted to the liver mask (LiTS). "
                                   "Input: CT in HU with a liver mask; tumours are darker than liver.",
                       organ="liver",
                       mask_source="TotalSegmentator (`TotalSegmentator -i ct.nii.gz -o seg --roi_subset liver` "
                                   "writes seg/liver.nii.gz)",
                       mask_source_slicer="the TotalSegmentator extension, whose segmentation has a 'liver' segment"),
    "carotid-us": Preset("carotid-us", 7.0, 150.0, 0.5, (1,), "robust",
                         description="Carotid ultrasound; blobs restricted to a disc around the vessel."),
}


def missing_mask_message(preset_name: str, where: str = "detect") -> Optional[str]:
    """What to say when a preset that needs an organ mask gets none; None when a mask is optional.

    ``where``: "detect" (the command line and the Python API), "train" (every training case needs one),
    "slicer" (the module's panel)."""
    preset = PRESETS.get(preset_name)
    if preset is None or not preset.organ:
        return None
    organ = preset.organ
    why = (f"the {preset.name} model needs a {organ} mask: its training blobs were placed, and its anomaly map "
           f"is kept, inside the {organ} only")
    if where == "train":
        return (f"the {preset.name} preset needs a {organ} mask for every case: the training blobs are placed inside "
                f"the {organ} only. Pair every training image with its {organ} mask: in a CSV list with the columns image,mask, "
                f"or by a file name holding 'mask' (pat1_ct_{organ}mask.nii.gz beside pat1_ct.nii.gz); masks come "
                f"e.g. from {preset.mask_source}.")
    if where == "slicer":
        return (f"The {preset.name} model needs a {organ} mask: pick a segmentation with a '{organ}' segment, or a "
                f"{organ} label map, as the Mask (e.g. from {preset.mask_source_slicer}). Its training blobs were "
                f"placed, and its anomaly map is kept, inside the {organ} only.")
    return f"{why}; give one with --mask (a {organ} label map on the image's grid), e.g. from {preset.mask_source}."


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
