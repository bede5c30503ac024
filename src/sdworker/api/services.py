"""What the routes share, built once in create_app and stored on app.state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from prometheus_client import CollectorRegistry

from sdworker.broker.base import Broker
from sdworker.engine.models import ModelSource, resolve_model
from sdworker.families import FamilyProfile, served_profile
from sdworker.loras import LoraLibrary
from sdworker.model_registry import ModelConfig
from sdworker.planning import Features, features_from_settings
from sdworker.settings import Settings
from sdworker.storage.base import Storage
from sdworker.webhooks import WebhookSender

if TYPE_CHECKING:
    from sdworker.supervisor import WorkerSupervisor


STREAM_THREADS = 64


@dataclass
class Services:
    settings: Settings
    broker: Broker
    storage: Storage
    registry: CollectorRegistry
    webhooks: WebhookSender
    library: LoraLibrary
    supervisor: WorkerSupervisor | None = None
    # Threads for SSE waits (each open stream holds one for up to a second at a time).
    stream_limiter: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(STREAM_THREADS)
    )
    started_at: float = field(default_factory=time.monotonic)

    models: dict[str, ModelConfig] = field(default_factory=dict)  # the model registry
    sources: dict[str, ModelSource] = field(default_factory=dict)

    def source_of(self, model: str | None) -> ModelSource:
        """Where a job's model is and its family (no weights loaded)."""
        name = model or self.settings.model
        if name not in self.sources:
            trusted = name == self.settings.model  # callers' names stay under the root
            self.sources[name] = resolve_model(
                name, self.settings, trusted=trusted, registry=self.models
            )
        return self.sources[name]

    def family_of(self, model: str | None) -> FamilyProfile:
        """The family profile a job's model is validated against."""
        source = self.source_of(model)
        return served_profile(source.family, source.name)

    def features_of(self, model: str | None) -> Features:
        """What the deployment offers a job's model: LoRAs, styles, refiner, upscalers."""
        source = self.source_of(model)
        return features_from_settings(
            self.settings, source.name, self.library, family=source.family, config=source.config
        )
