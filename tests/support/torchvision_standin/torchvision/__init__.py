"""Minimal torchvision stand-in so that `import spandrel` (0.4.2) works without torchvision.

spandrel imports torchvision at module level in exactly two places:
  spandrel/architectures/LaMa/__arch/LaMa.py:
      from torchvision.transforms.functional import InterpolationMode, rotate
  spandrel/architectures/RestoreFormer/__init__.py:
      from torchvision.transforms.functional import normalize
Only those names exist here; calling them raises NotImplementedError. Use it only for the
import (see tests/support/spandrel_support.import_spandrel), never leave it on sys.path:
transformers/diffusers decide "is torchvision available" with
importlib.util.find_spec("torchvision") and would believe this is it.
"""

__version__ = "0.0.0+standin"
STANDIN = True
