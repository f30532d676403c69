"""The `storage:` block of a job or app YAML: how every URL it opens is reached (pipeline.data.storage)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    """Unknown keys are errors, as in pipeline.config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Settings(_Strict):
    """How to reach an S3 API (AWS, MinIO, Ceph, a local test server) for s3:// URLs. Unset fields fall back
    to what s3fs/botocore read themselves: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
    AWS_PROFILE, AWS_DEFAULT_REGION, ~/.aws, an instance role."""

    endpoint_url: str | None = None
    """The S3 API's address, e.g. `http://minio.internal:9000` (default: AWS, or AWS_ENDPOINT_URL)."""
    region: str | None = None
    key: str | None = None
    """Access key id. Prefer the environment or a profile: these travel to every worker with the job."""
    secret: str | None = None
    profile: str | None = None
    """A named profile from ~/.aws/credentials (it must exist on every node)."""
    anon: bool = False
    """Public buckets: send no credentials at all."""

    @model_validator(mode="after")
    def _pair(self) -> "S3Settings":
        if (self.key is None) != (self.secret is None):
            raise ValueError("storage.s3: set both key and secret, or neither (then the environment's are used)")
        return self


class GCSSettings(_Strict):
    """How to reach Google Cloud Storage for gs:// URLs (default: gcsfs's own lookup of credentials)."""

    project: str | None = None
    token: str | None = None
    """A service-account JSON path, `anon`, `google_default` or `cloud` (gcsfs `token=`)."""
    endpoint_url: str | None = None
    """Another GCS API address (an emulator)."""


class StorageConfig(_Strict):
    """Settings for every URL a job or app opens (model, input, output, controller checkpoint), as the YAML's
    `storage:` block. They travel to the Ray workers with the job (pipeline.data.storage)."""

    s3: S3Settings = Field(default_factory=S3Settings)
    gcs: GCSSettings = Field(default_factory=GCSSettings)
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Raw fsspec storage options by protocol (`az`, `hdfs`, ...) or by URL prefix (`s3://other-bucket`);
    the longest matching prefix wins, over the typed `s3` / `gcs` settings."""
    cache_dir: str | None = None
    """Node-local directory where artifacts read from URLs are cached (default: $OFFRAMP_CACHE_DIR, else
    ~/.cache/offramp)."""
