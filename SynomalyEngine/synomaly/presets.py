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
                       description="Liver CT clipped to [0, 150] HU; blobs restricted to the liver mask (LiTS)."),
    "carotid-us": Preset("carotid-us", 7.0, 150.0, 0.5, (1,), "robust",
                         description="Carotid ultrasound; blobs restricted to a disc around the vessel."),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
