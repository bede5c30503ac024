"""Step reports and cancellation across the pipeline calls of one job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdworker.options import RefinerMode
from sdworker.planning import RefinerPlan

StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class CancelRequested(Exception):
    """Raised from the step callback: the job was cancelled after `step` steps."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(step, total)
        self.step, self.total = step, total


def refiner_step_count(scheduler: Any, refiner: RefinerPlan) -> int:
    """The steps diffusers' SDXL img2img will run for the refiner (for progress totals),
    counted on a copy of its scheduler the way the pipeline selects its timesteps."""
    counter = type(scheduler).from_config(scheduler.config)
    counter.set_timesteps(refiner.steps)
    timesteps = counter.timesteps
    if refiner.mode is RefinerMode.ENSEMBLE:
        train = counter.config.num_train_timesteps
        cutoff = round(train - refiner.high_noise_frac * train)
        count = int((timesteps < cutoff).sum().item())
        if counter.order == 2 and count % 2 == 0:
            count += 1  # diffusers keeps second-order pairs whole
        return count
    start = max(refiner.steps - min(int(refiner.steps * refiner.strength), refiner.steps), 0)
    return len(timesteps[start * counter.order :])


class Progress:
    """Step reports across the pipeline calls of one job (base, then refiner): steps
    count on, and the total is what has run, plus this call's, plus the estimate of
    the calls still to come."""

    def __init__(self, on_step: StepCallback | None, is_cancelled: CancelCheck | None) -> None:
        self._on_step = on_step
        self._is_cancelled = is_cancelled
        self._done_before = 0
        self._later = 0
        self.latents: torch.Tensor | None = None

    def call(self, pipe: Any, arguments: dict[str, Any], *, later: int) -> Any:
        """One pipeline call; `later`: steps the job's following calls will run."""
        self._later = later
        arguments = {"output_type": "pil"} | arguments
        with torch.inference_mode():
            output = pipe(**arguments, callback_on_step_end=self._step_end)
        self._done_before += int(pipe.num_timesteps)
        return output

    def _step_end(
        self, pipeline: Any, index: int, _t: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        self.latents = kwargs["latents"]
        done = self._done_before + index + 1
        total = self._done_before + int(pipeline.num_timesteps) + self._later
        if self._on_step is not None:
            self._on_step(done, total)
        if self._is_cancelled is not None and self._is_cancelled() and done < total:
            # Raised rather than diffusers' `interrupt` flag, which still runs the VAE
            # decode over the partial latents: cancel should free the device now.
            raise CancelRequested(done, total)
        return kwargs
