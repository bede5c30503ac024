"""A real worker process for the fault-injection tests, with a fake engine.

    python tests/integration/fault_worker.py WORKER_ID [--parent-pid PID]

Settings come from the environment (SDWORKER_BROKER, SDWORKER_REDIS_PREFIX,
SDWORKER_DATA_DIR, SDWORKER_HEARTBEAT_*, SDWORKER_MAX_ATTEMPTS, ...); the broker is the
real one from `build_broker`, the storage the real LocalStorage, the loop the real
`Worker`. Only the engine is fake:

- a job runs `steps` fake steps of `metadata.step_s` seconds (default FAULT_STEP_S or
  0.02) and returns solid-colour images;
- a job whose prompt is "kill-me" kills its process with SIGKILL at its first step (a
  crash the worker cannot report: segfault, OOM killer, lost node);
- a job whose prompt is "broker-blip" sees its first progress report fail once with
  redis' ConnectionError, the broker working again right after (what a worker meets
  when Redis restarts between two of its calls); every other call reaches the real
  broker unchanged.

The process is ready once its first heartbeat says `model_loaded` (the tests wait for
that in the broker's worker registry). SIGTERM/SIGINT drain like `run_worker_process`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any, cast

import redis.exceptions
from PIL import Image

from sdworker.backends import build_broker, build_storage
from sdworker.broker.base import Broker

# Imported up front (it pulls in torch): the first job must not pay for it.
from sdworker.engine.engine import Cancelled, EngineResult
from sdworker.families import SDXL
from sdworker.jobs import JobSpec
from sdworker.planning import plan_generation
from sdworker.settings import Settings
from sdworker.worker import Worker

KILL_PROMPT = "kill-me"
BLIP_PROMPT = "broker-blip"


class FaultEngine:
    """Sleeps through the steps, then paints solid images; "kill-me" dies at step 1."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.prompt: str | None = None  # of the job running now

    def load(self, model: str | None = None) -> object:
        return object()

    def run(self, spec: JobSpec, on_step: Any = None, is_cancelled: Any = None) -> Any:
        self.prompt = spec.prompt
        plan = plan_generation(spec, SDXL, max_num_images=8)
        step_s = float(spec.metadata.get("step_s", self.step_s))
        total = plan.denoise_steps
        for step in range(1, total + 1):
            if spec.prompt == KILL_PROMPT:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(step_s)
            if on_step is not None:
                on_step(step, total)
            if is_cancelled is not None and is_cancelled() and step < total:
                return Cancelled(step=step, total_steps=total)
        images = [
            Image.new("RGB", (plan.width, plan.height), (20 * i % 256, 120, 200))
            for i in range(plan.num_images)
        ]
        return EngineResult(
            images=images, seeds=plan.seeds, plan=plan, model="fault-fake", family="sdxl",
            device="cpu", dtype="fp32", latents=None, timings={"load_s": 0.0,
            "inference_s": step_s * total},
        )  # fmt: skip


class BlipBroker:
    """The real broker, except for the first progress report of a "broker-blip" job."""

    def __init__(self, broker: Broker, engine: FaultEngine) -> None:
        self._broker, self._engine = broker, engine
        self._blipped: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def progress(self, job_id: str, worker_id: str, step: int, total_steps: int) -> None:
        if self._engine.prompt == BLIP_PROMPT and job_id not in self._blipped:
            self._blipped.add(job_id)
            raise redis.exceptions.ConnectionError(
                "injected: Error 111 connecting to Redis. Connection refused."
            )
        self._broker.progress(job_id, worker_id, step, total_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("worker_id")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.worker_id} pid={os.getpid()} %(levelname)s %(name)s: "
        "%(message)s",
    )
    settings = Settings(_env_file=None)
    broker = build_broker(settings)
    engine = FaultEngine(float(os.environ.get("FAULT_STEP_S", "0.02")))
    faulty = cast(Broker, BlipBroker(broker, engine))
    worker = Worker(
        settings, faulty, build_storage(settings), engine, args.worker_id, device="cpu",
        parent_pid=args.parent_pid,
    )  # fmt: skip

    def on_signal(signum: int, _frame: object) -> None:
        if worker.stopping:
            raise SystemExit(128 + signum)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logging.getLogger(__name__).info("worker %s starting", args.worker_id)
    try:
        worker.run_forever()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
