"""Builds the broker and storage a deployment's settings ask for."""

from __future__ import annotations

from sdworker.broker.base import Broker
from sdworker.broker.sqlite import SqliteBroker
from sdworker.settings import Settings
from sdworker.storage.base import Storage
from sdworker.storage.local import LocalStorage


def build_broker(settings: Settings) -> Broker:
    """Redis when SDWORKER_BROKER / REDIS_URL names one, else the embedded SQLite file."""
    if settings.broker:
        from sdworker.broker.redis import RedisBroker

        return RedisBroker(
            settings.broker,
            prefix=settings.redis_prefix,
            max_attempts=settings.max_attempts,
            job_ttl_s=settings.job_ttl_s,
        )
    return SqliteBroker(settings.database_path, max_attempts=settings.max_attempts)


def build_storage(settings: Settings) -> Storage:
    """Local disk under data_dir/assets, served by the API."""
    return LocalStorage(settings.assets_dir, settings.base_url)
