"""spandrel without torchvision, and a tiny random ESRGAN (RRDBNet) checkpoint builder.

Why a torchvision stand-in: the upscaler models of sdworker are loaded with spandrel
(``pip install 'sdworker[upscale]'``), and spandrel 0.4.2 imports torchvision at import
time. torchvision has no CPU build for this machine's torch (2.13 CPU), so it cannot be
installed here. spandrel's ESRGAN architecture, the one these tests use, never touches
torchvision: only two other architectures import three names from
``torchvision.transforms.functional`` at module level::

    spandrel/architectures/LaMa/__arch/LaMa.py:       InterpolationMode, rotate
    spandrel/architectures/RestoreFormer/__init__.py:  normalize

``tests/support/torchvision_standin`` provides exactly those names (the functions raise
NotImplementedError). It is on ``sys.path`` only while spandrel is being imported and is
dropped from ``sys.modules`` afterwards: transformers and diffusers decide whether
torchvision is installed with ``importlib.util.find_spec("torchvision")``, and must keep
answering "no" (a visible stand-in would send them down torchvision code paths).
Where a real torchvision is installed, it is used and the stand-in is never visible.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch

STANDIN_DIR = str(Path(__file__).parent / "torchvision_standin")


def _drop_torchvision_modules() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_spandrel() -> ModuleType:
    """Import spandrel; without torchvision, with the stand-in visible only during the import.

    Afterwards the stand-in is neither on sys.path nor in sys.modules, so transformers' and
    diffusers' find_spec("torchvision") checks keep answering "not installed". spandrel's
    LaMa and RestoreFormer modules keep references to the stand-in functions, which raise
    NotImplementedError if ever called.
    """
    if "spandrel" in sys.modules and sys.modules["spandrel"] is not None:
        return sys.modules["spandrel"]
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        return importlib.import_module("spandrel")
    sys.path.insert(0, STANDIN_DIR)
    try:
        return importlib.import_module("spandrel")
    finally:
        sys.path.remove(STANDIN_DIR)
        _drop_torchvision_modules()
        importlib.invalidate_caches()


GROW_CHANNELS = 32  # spandrel's RRDBNet hard-codes gc=32


def tiny_esrgan_state_dict(
    scale: int, nf: int = 8, nb: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random Real-ESRGAN (basicsr RRDBNet, "new arch") state dict.

    Real-ESRGAN's network always upsamples x4 (conv_up1 + conv_up2); x2 models
    pixel-unshuffle the input by 2 first, which shows only as conv_first having
    3*2*2 = 12 input channels. spandrel detects that (in_nc == 4 * out_nc ->
    shuffle_factor 2) and reports scale 4 // 2 = 2.
    """
    if scale not in (1, 2, 4):
        raise ValueError("Real-ESRGAN layout supports scale 1 (unshuffle 4), 2 (unshuffle 2) or 4")
    in_ch = 3 * {4: 1, 2: 4, 1: 16}[scale]
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int, bias: float = 0.0) -> None:
        # fan-in scaled weights keep activations O(1); conv_last's bias centres the output
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) / (cin * 9) ** 0.5
        sd[f"{name}.bias"] = torch.full((cout,), bias)

    conv("conv_first", in_ch, nf)
    for b in range(nb):
        for r in (1, 2, 3):
            for c in range(1, 6):
                cin = nf + (c - 1) * GROW_CHANNELS
                conv(f"body.{b}.rdb{r}.conv{c}", cin, nf if c == 5 else GROW_CHANNELS)
    conv("conv_body", nf, nf)
    conv("conv_up1", nf, nf)
    conv("conv_up2", nf, nf)
    conv("conv_hr", nf, nf)
    conv("conv_last", nf, 3, bias=0.5)
    return sd


def build_tiny_esrgan(path: str | Path, scale: int, seed: int = 0) -> Path:
    """Save a tiny random ESRGAN to `path` (.safetensors or .pth/.pt) and return the path."""
    path = Path(path)
    sd = {k: v.contiguous() for k, v in tiny_esrgan_state_dict(scale, seed=seed).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif path.suffix in (".pth", ".pt", ".ckpt"):
        # Real-ESRGAN release checkpoints wrap the weights as {"params_ema": ...};
        # spandrel unwraps it.
        torch.save({"params_ema": sd}, path)
    else:
        raise ValueError(f"unsupported extension {path.suffix!r}")
    return path
