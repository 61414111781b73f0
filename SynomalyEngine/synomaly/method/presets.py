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
    # 2D images (a volume of one slice) are valid input; 3D presets refuse them (see ``two_d_refusal``).
    two_d: bool = False
    # > 0: the mask given is a vessel's lumen and the organ region is a disc around it, this far from the
    # lumen in pixels, or in mm where the pixel spacing is known (``vessel_disc``); the mask is then required.
    disc_margin_px: float = 0.0
    disc_margin_mm: float = 0.0

    def noise_params(self) -> dict:
        direction = self.direction[0] if len(self.direction) == 1 else list(self.direction)
        return {"sigma": self.sigma, "threshold": self.threshold, "offset": self.offset, "direction": direction}

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "brain-flair": Preset("brain-flair", 3.0, 175.0, 0.5, (1,), "robust",
                          description="Brain MRI FLAIR: tumours are hyperintense (BraTS preset). "
                                      "Input: skull-stripped FLAIR.", skull_stripped=True),
    # Both directions: liver tumours are darker or brighter than the liver by lesion and contrast phase
    # (the published LiTS preset had darker blobs only, and missed enhancing tumours).
    "liver-ct": Preset("liver-ct", 3.0, 175.0, 1.0, (-1, 1), "window", (0.0, 150.0),
                       description="Liver CT clipped to [0, 150] HU; blobs restricted to the liver mask, darker "
                                   "or brighter. Input: CT in HU with a liver mask.",
                       organ="liver",
                       mask_source="TotalSegmentator (`TotalSegmentator -i ct.nii.gz -o seg --roi_subset liver` "
                                   "writes seg/liver.nii.gz)",
                       mask_source_slicer="the TotalSegmentator extension, whose segmentation has a 'liver' segment"),
    "carotid-us": Preset("carotid-us", 7.0, 150.0, 0.5, (1,), "window", (0.0, 255.0),
                         description="Carotid ultrasound, 2D B-mode images (grey levels 0-255); blobs restricted "
                                     "to a disc around the vessel, made from the lumen mask (required).",
                         two_d=True, disc_margin_px=40.0, disc_margin_mm=2.5),
}


def missing_mask_message(preset_name: str, where: str = "detect") -> Optional[str]:
    """What to say when a preset that needs an organ mask gets none; None when a mask is optional.

    ``where``: "detect" (the command line and the Python API), "train" (every training case needs one),
    "slicer" (the module's panel), "slicer-train" (training from volumes loaded in Slicer)."""
    preset = PRESETS.get(preset_name)
    if preset is not None and preset.disc_margin_px > 0:
        return _missing_lumen_message(preset, where)
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
    if where == "slicer-train":
        return (f"the {preset.name} preset needs a {organ} mask for every training volume: its training blobs are placed "
                f"inside the {organ} only. Segment the {organ} on each volume (e.g. with {preset.mask_source_slicer}): "
                f"a segmentation made on the volume, with a '{organ}' segment or a single one, is taken as its mask. "
                "Or train from a folder or CSV list that pairs every image with its mask.")
    if where == "slicer":
        return (f"The {preset.name} model needs a {organ} mask: pick a segmentation with a '{organ}' segment, or a "
                f"{organ} label map, as the Mask (e.g. from {preset.mask_source_slicer}). Its training blobs were "
                f"placed, and its anomaly map is kept, inside the {organ} only.")
    return f"{why}; give one with --mask (a {organ} label map on the image's grid), e.g. from {preset.mask_source}."


def _missing_lumen_message(preset: Preset, where: str) -> str:
    """A vessel preset's mask is the lumen: the model looks only at a disc around it."""
    why = (f"the {preset.name} model needs the vessel's lumen mask: it looks only at a disc around the vessel "
           f"(the lumen grown by {preset.disc_margin_px:g} pixels, {preset.disc_margin_mm:g} mm where the pixel size "
           "is known)")
    if where == "train":
        return (f"the {preset.name} preset needs the vessel's lumen mask for every image: the training blobs are "
                "placed in a disc around it. Give a CSV list with the columns image,mask[,group].")
    if where == "slicer-train":
        return (f"the {preset.name} preset needs the vessel's lumen mask for every training image: its training "
                "blobs are placed in a disc around it. Segment the lumen on each image: a segmentation made on the "
                "image, with a 'lumen' segment or a single one, is taken as its mask. Or train from a CSV list with "
                "the columns image,mask[,group].")
    if where == "slicer":
        return f"The {why[4:]}: pick the lumen's segmentation or label map as the Mask."
    return f"{why}; give it with --mask (a lumen label image on the image's grid)."


def mask_role(preset_name: str) -> str:
    """What a preset's required mask shows ("liver", "lumen"), the name a segment of it is expected to
    have; "" when the preset needs no mask."""
    preset = PRESETS.get(preset_name)
    if preset is None:
        return ""
    return "lumen" if preset.disc_margin_px > 0 else preset.organ


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def two_d_refusal(preset_name: Optional[str], what: str, size_xy) -> str:
    """Why a 3D preset (or a model of unknown preset) refuses a 2D image, and what to do instead: the one
    line every front end shows."""
    two_d = ", ".join(name for name, p in PRESETS.items() if p.two_d)
    model = f"the {preset_name} preset works" if preset_name else "this model works"
    return (f"{what} is a 2D image ({size_xy[0]} x {size_xy[1]} pixels), and {model} on 3D volumes: its "
            "intensity normalisation, checks and post-processing need the whole volume, and its model has seen "
            f"only slices of volumes. Give the 3D volume, or use a model of a 2D preset ({two_d}).")
