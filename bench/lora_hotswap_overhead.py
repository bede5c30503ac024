"""What the LoRA hotswap slots cost a full-size SDXL UNet on every job.

The slots (engine/hotswap.py) put `slots` zero adapters of rank `rank` on every linear
layer of the UNet's transformer blocks, so a compiled UNet never recompiles for a new
LoRA set. This measures their price on the real SDXL architecture (shipped config,
random weights): FLOPs of one CFG UNet call (counted, device-independent) and its time,
slots enabled vs the same UNet with its adapter layers disabled, interleaved.

    python bench/lora_hotswap_overhead.py --rank 64 --slots 2 --size 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_fast_path import _fill, _unet_inputs

from sdworker.engine.hotswap import HotswapLoras
from sdworker.engine.models import CONFIGS_DIR
from sdworker.engine.tiny import build_tiny_pipeline


def full_size_pipe() -> Any:
    """The tiny pipeline (for its loaders) around a full-size random SDXL UNet."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(CONFIGS_DIR / "sdxl-base" / "unet")
        )
    unet.to_empty(device="cpu")
    _fill(unet, 0.02, torch.Generator().manual_seed(0))
    pipe = build_tiny_pipeline("tiny-sdxl")
    pipe.register_modules(unet=unet.eval())
    # _unet_inputs reads the pooled width from the second text encoder: SDXL's 1280.
    config = CLIPTextConfig(hidden_size=64, projection_dim=1280, num_hidden_layers=1,
                            num_attention_heads=1, intermediate_size=64)  # fmt: skip
    pipe.register_modules(text_encoder_2=CLIPTextModelWithProjection(config))
    return pipe


def flops(pipe: Any, inputs: dict[str, Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        pipe.unet(**inputs)
    return int(counter.get_total_flops())


def seconds(pipe: Any, inputs: dict[str, Any]) -> float:
    with torch.inference_mode():
        started = time.perf_counter()
        pipe.unet(**inputs)
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = full_size_pipe()
    inputs = _unet_inputs(pipe, args.size, 1)
    plain_flops = flops(pipe, inputs)
    HotswapLoras(pipe, slots=args.slots, max_rank=args.rank, cache_size=4)
    slot_flops = flops(pipe, inputs)
    plain_s: list[float] = []
    slot_s: list[float] = []
    seconds(pipe, inputs)  # warm-up
    for _ in range(args.repeats):  # interleaved: the same machine state for both
        pipe.unet.disable_lora()
        plain_s.append(seconds(pipe, inputs))
        pipe.unet.enable_lora()
        slot_s.append(seconds(pipe, inputs))
    result = {
        "rank": args.rank,
        "slots": args.slots,
        "size": args.size,
        "unet_tflops_plain": plain_flops / 1e12,
        "unet_tflops_slots": slot_flops / 1e12,
        "flops_ratio": slot_flops / plain_flops,
        "seconds_plain_median": statistics.median(plain_s),
        "seconds_slots_median": statistics.median(slot_s),
        "time_ratio": statistics.median(slot_s) / statistics.median(plain_s),
        "device": "cpu",
        "dtype": "fp32",
    }
    print(
        f"| {args.slots} x rank {args.rank} | {result['unet_tflops_plain']:.2f} | "
        f"{result['unet_tflops_slots']:.2f} | {result['flops_ratio']:.3f} | "
        f"{result['seconds_plain_median']:.2f} | {result['seconds_slots_median']:.2f} | "
        f"{result['time_ratio']:.3f} |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
