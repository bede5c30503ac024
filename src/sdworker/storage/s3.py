"""S3-compatible storage (AWS S3, Cloudflare R2, MinIO, Supabase Storage's S3 endpoint)
through boto3. Same key layout as local storage, under an optional prefix. Clients get a
public/CDN URL when one is configured, else a presigned GET URL with an expiry."""

from __future__ import annotations

from typing import Any

from sdworker.storage.base import AssetNotFoundError, StoredObject, content_type_of, validate_key


class S3Storage:
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        region: str | None = None,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        public_base_url: str | None = None,
        url_expiry_s: int = 3600,
        addressing_style: str = "auto",
    ) -> None:
        import boto3
        from botocore.config import Config

        self._bucket = bucket
        self._prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._public = public_base_url.rstrip("/") if public_base_url else None
        self._expiry = url_expiry_s
        # Credentials: explicit ones, else boto3's own chain (env, profile, instance role).
        self._client: Any = boto3.client(
            "s3",
            region_name=region,
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                s3={"addressing_style": addressing_style},
                retries={"max_attempts": 5, "mode": "standard"},
                signature_version="s3v4",
            ),
        )

    def _object(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> str:
        self._client.put_object(
            Bucket=self._bucket, Key=self._object(key), Body=data, ContentType=content_type
        )
        return self.url(key)

    def get(self, key: str) -> StoredObject:
        from botocore.exceptions import ClientError

        try:
            reply = self._client.get_object(Bucket=self._bucket, Key=self._object(key))
        except ClientError as exc:
            # Without s3:ListBucket a missing key answers 403, not 404.
            if exc.response.get("Error", {}).get("Code") in {
                "NoSuchKey",
                "404",
                "AccessDenied",
                "403",
            }:
                raise AssetNotFoundError(f"no asset {key!r}", field="key") from None
            raise
        content_type = reply.get("ContentType") or content_type_of(key)
        return StoredObject(reply["Body"].read(), content_type)

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self._bucket, Key=self._object(key))

    def url(self, key: str) -> str:
        if self._public:
            return f"{self._public}/{self._object(key)}"
        url: str = self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": self._object(key)},
            ExpiresIn=self._expiry,
        )
        return url
