"""Per family: sdworker's Engine.run against the plain diffusers pipeline call on the same
weights (the tiny model of each family), interleaved in one process; then model switch
time in the registry: a load (model not resident) against a get of a loaded model, and
a job that needs a switch against one that does not. Prints tables and writes JSON.

    python bench/families_vs_diffusers.py [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sdworker.engine.arguments import pipeline_arguments
from sdworker.engine.engine import Engine, EngineResult
from sdworker.jobs import JobSpec
from sdworker.settings import Settings

CASES: dict[str, dict[str, Any]] = {
    "tiny-sd15": {"size": "256x256", "steps": 20},
    "tiny-sd21": {"size": "256x256", "steps": 20},
    "tiny-sdxl": {"size": "256x256", "steps": 20},
    "tiny-sd3": {"size": "256x256", "steps": 20},
    "tiny-wan": {"width": 128, "height": 128, "num_frames": 17, "steps": 10},
}


def _time(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _ratio_rows(engine: Engine, repeats: int, models: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        case = CASES[name]
        spec = JobSpec(model=name, prompt="a lighthouse on a cliff at dusk", seed=1, **case)
        plan = engine.plan(spec)
        loaded = engine.load(name)
        pipe = loaded.pipelines.for_task(plan.task)

        def baseline(pipe: Any = pipe, plan: Any = plan) -> None:
            with torch.inference_mode():
                pipe(**pipeline_arguments(plan), output_type="pil")

        def ours(spec: JobSpec = spec) -> None:
            assert isinstance(engine.run(spec), EngineResult)

        baseline(), ours()  # warm-up
        times: dict[str, list[float]] = {"diffusers": [], "sdworker": []}
        for _ in range(repeats):  # interleaved so drift hits both alike
            times["diffusers"].append(_time(baseline))
            times["sdworker"].append(_time(ours))
        medians = {key: statistics.median(values) for key, values in times.items()}
        rows.append({
            "model": name, "family": loaded.source.family, "case": case,
            "diffusers_s": medians["diffusers"], "sdworker_s": medians["sdworker"],
            "ratio": medians["sdworker"] / medians["diffusers"], "runs": times,
        })  # fmt: skip
    return rows


def _switch_rows(settings: Settings, repeats: int) -> list[dict[str, Any]]:
    """Load (not resident) vs get (resident), and a job after a switch vs without."""
    rows = []
    engine = Engine(settings)
    job = {"prompt": "x", "size": "128x128", "steps": 4, "seed": 1}
    for name in ("tiny-sd15", "tiny-sdxl", "tiny-sd3"):
        source = engine.source(name)
        engine.load(name)  # builds the tiny folder once, outside the timings
        cold: list[float] = []
        warm: list[float] = []
        job_cold: list[float] = []
        job_warm: list[float] = []

        def load(name: str = name) -> None:
            engine.load(name)

        def run(name: str = name) -> None:
            engine.run(JobSpec(model=name, **job))

        for _ in range(repeats):
            engine.models.unload(source)
            cold.append(_time(load))
            warm.append(_time(load))
            engine.models.unload(source)
            job_cold.append(_time(run))
            job_warm.append(_time(run))
        rows.append({
            "model": name,
            "load_s": statistics.median(cold), "loaded_get_s": statistics.median(warm),
            "job_with_switch_s": statistics.median(job_cold),
            "job_loaded_s": statistics.median(job_warm),
            "job_ratio": statistics.median(job_cold) / statistics.median(job_warm),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/families.json"))
    parser.add_argument("--models", default=",".join(CASES), help="Comma-separated tiny models.")
    parser.add_argument("--no-switch", action="store_true", help="Skip the switch timings.")
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    settings = Settings()
    engine = Engine(settings)
    ratios = _ratio_rows(engine, args.repeats, args.models.split(","))
    print(f"device={engine.device} dtype={engine.dtype} repeats={args.repeats}")
    print(f"{'model':10} {'family':8} {'diffusers s':>12} {'sdworker s':>11} {'ratio':>7}")
    for row in ratios:
        print(
            f"{row['model']:10} {row['family']:8} {row['diffusers_s']:12.3f} "
            f"{row['sdworker_s']:11.3f} {row['ratio']:7.3f}"
        )
    switches = [] if args.no_switch else _switch_rows(settings, args.repeats)
    print(f"{'model':10} {'load s':>8} {'get s':>9} {'job+switch s':>13} {'job s':>7} {'ratio':>6}")
    for row in switches:
        print(
            f"{row['model']:10} {row['load_s']:8.3f} {row['loaded_get_s']:9.6f} "
            f"{row['job_with_switch_s']:13.3f} {row['job_loaded_s']:7.3f} {row['job_ratio']:6.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "device": str(engine.device), "dtype": str(engine.dtype), "torch": torch.__version__,
        "machine": platform.machine(), "threads": torch.get_num_threads(),
        "ratios": ratios, "switches": switches,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
