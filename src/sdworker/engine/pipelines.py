"""Task -> diffusers pipeline for a loaded model, all sharing one set of components."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdworker.families import Task


class PipelineSet:
    """The pipelines of one loaded model, one per task, sharing weights.

    img2img and inpaint are made with diffusers' `from_pipe`, which reuses the base
    pipeline's modules: switching task never loads or copies weights.
    """

    def __init__(
        self,
        base: Any,
        family: str,
        on_switch: Callable[[Any], None] | None = None,
        on_derive: Callable[[Any], None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        """`on_switch(pipe)` runs when a different task's pipeline becomes active
        (model CPU offload keeps its hooks per pipeline, so they must be re-attached);
        `on_derive(pipe)` runs on each pipeline made from the base; `options` are
        constructor options that SDXL pipelines do not keep in their config (the
        watermark), so from_pipe would otherwise fall back to diffusers' default."""
        self.family = family
        self._pipelines: dict[Task, Any] = {Task.TEXT2IMG: base, Task.TEXT2VIDEO: base}
        self._on_switch = on_switch
        self._on_derive = on_derive
        self._active = Task.TEXT2IMG
        self._options = options or {}

    @property
    def base(self) -> Any:
        return self._pipelines[Task.TEXT2IMG]

    def for_task(self, task: Task) -> Any:
        pipe = self._pipelines.get(task)
        if pipe is None:
            pipe = self._pipelines[task] = self._derive(task)
        if task is not self._active and self._on_switch is not None:
            self._on_switch(pipe)
        self._active = task
        return pipe

    def _derive(self, task: Task) -> Any:
        from sdworker.engine.models import pipeline_class

        slot = {Task.IMG2IMG: 1, Task.INPAINT: 2}[task]
        # from_pipe casts to fp32 unless told the dtype, which would upcast shared weights.
        cls = pipeline_class(self.family, slot)
        pipe = cls.from_pipe(self.base, dtype=self.base.dtype, **self._options)
        pipe.set_progress_bar_config(disable=True)
        if self._on_derive is not None:
            self._on_derive(pipe)
        return pipe
