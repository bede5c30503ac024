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
    """S3-compatible storage when a bucket is set, else local disk served by the API."""
    if settings.s3_bucket:
        from sdworker.storage.s3 import S3Storage

        secret = settings.s3_secret_access_key
        return S3Storage(
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            region=settings.s3_region,
            endpoint_url=settings.s3_endpoint_url,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
            public_base_url=settings.public_assets_url,
            url_expiry_s=settings.s3_url_expiry_s,
            addressing_style=settings.s3_addressing_style,
        )
    return LocalStorage(settings.assets_dir, settings.base_url)
