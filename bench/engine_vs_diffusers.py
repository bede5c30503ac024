"""Engine overhead: sdworker's Engine.run against the plain diffusers pipeline call on the
same weights, inputs and generators, interleaved in one process. Prints a table and
writes JSON. A ratio near 1.0 means the engine adds nothing measurable.

    python bench/engine_vs_diffusers.py [--model tiny-sdxl] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdworker.engine.arguments import pipeline_arguments
from sdworker.engine.engine import Engine
from sdworker.engine.inputs import prepare_inputs
from sdworker.jobs import JobSpec
from sdworker.settings import Settings

CASES: dict[str, dict[str, Any]] = {
    "text2img 512x512 20 steps": {"size": "512x512", "steps": 20},
    "text2img 256x256 20 steps x4": {"size": "256x256", "steps": 20, "num_images": 4},
    "img2img 512x512 20 steps s=0.6": {"size": "512x512", "steps": 20, "strength": 0.6},
    "inpaint 512x512 20 steps": {"size": "512x512", "steps": 20, "mask": True},
}


def _inputs(folder: Path) -> tuple[str, str]:
    ramp = np.linspace(0, 255, 512, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (512, 1))] * 3, axis=2)).save(folder / "init.png")
    mask = np.zeros((512, 512), dtype=np.uint8)
    mask[:, :256] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return str(folder / "init.png"), str(folder / "mask.png")


def _spec(case: dict[str, Any], init: str, mask: str) -> JobSpec:
    fields = {key: value for key, value in case.items() if key != "mask"}
    if "strength" in case or case.get("mask"):
        fields["image"] = init
    if case.get("mask"):
        fields["mask"] = mask
    return JobSpec(prompt="a lighthouse on a cliff at dusk", seed=1, **fields)


def _time(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/engine_vs_diffusers.json"))
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    settings = Settings(model=args.model)
    engine = Engine(settings)
    loaded = engine.load()
    # The baseline: diffusers' own pipelines on the very same modules.
    work = Path(".bench-inputs")
    work.mkdir(exist_ok=True)
    init, mask = _inputs(work)
    rows = []
    for name, case in CASES.items():
        spec = _spec(case, init, mask)
        plan = engine.plan(spec)
        pipe = loaded.pipelines.for_task(plan.task)
        images = prepare_inputs(plan, settings, allow_paths=True)  # same inputs for the baseline

        def baseline(pipe: Any = pipe, plan: Any = plan, images: Any = images) -> None:
            with torch.inference_mode():
                pipe(**pipeline_arguments(plan), **images, output_type="pil")

        def ours(spec: JobSpec = spec) -> None:
            engine.run(spec)

        baseline(), ours()  # warm-up
        times: dict[str, list[float]] = {"diffusers": [], "sdworker": []}
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            times["diffusers"].append(_time(baseline))
            times["sdworker"].append(_time(ours))
        medians = {key: statistics.median(values) for key, values in times.items()}
        rows.append({
            "case": name,
            "diffusers_s": medians["diffusers"],
            "sdworker_s": medians["sdworker"],
            "ratio": medians["sdworker"] / medians["diffusers"],
            "runs": times,
        })  # fmt: skip
    print(f"model={args.model} device={engine.device} dtype={engine.dtype} repeats={args.repeats}")
    print(f"{'case':34} {'diffusers s':>12} {'sdworker s':>11} {'ratio':>7}")
    for row in rows:
        times = f"{row['diffusers_s']:12.3f} {row['sdworker_s']:11.3f} {row['ratio']:7.3f}"
        print(f"{row['case']:34} {times}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "model": args.model, "device": str(engine.device), "dtype": str(engine.dtype),
        "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(), "rows": rows,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
