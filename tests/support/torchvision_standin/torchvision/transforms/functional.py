"""Names spandrel 0.4.2 imports from torchvision.transforms.functional at module level."""

from enum import Enum

_MISSING = (
    "torchvision is not installed: torchvision.transforms.functional.{} is only a stand-in "
    "(spandrel's LaMa and RestoreFormer architectures need the real torchvision)"
)


class InterpolationMode(Enum):
    """Same members and values as torchvision's enum (only referenced as constants)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def rotate(*args, **kwargs):
    raise NotImplementedError(_MISSING.format("rotate"))


def normalize(*args, **kwargs):
    raise NotImplementedError(_MISSING.format("normalize"))
