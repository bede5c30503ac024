"""The errors every layer reports to users: a stable code, one clear line, the field."""

from __future__ import annotations


class SdworkerError(Exception):
    """Base of every error sdworker reports to a user: a stable code and one clear line."""

    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidJobError(SdworkerError):
    """The request is well-formed but asks for something not allowed (names the field)."""

    code = "invalid_request"


class ModelNotFoundError(SdworkerError):
    """No model at any of the places tried (the message lists them)."""

    code = "model_not_found"


class ModelLoadError(SdworkerError):
    """A model was found but cannot be loaded: corrupt, not Stable Diffusion, no network."""

    code = "model_load_failed"


class InputImageError(SdworkerError):
    """An input image or mask cannot be read, fetched or used."""

    code = "invalid_input_image"


class OutOfMemoryError(SdworkerError):
    """The device ran out of memory for this job; memory was freed and the next job runs."""

    code = "out_of_memory"


class JobNotFoundError(SdworkerError):
    """No job with that id."""

    code = "not_found"


class JobConflictError(SdworkerError):
    """The request conflicts with the job's state or an earlier request (idempotency)."""

    code = "conflict"


class ConfigError(SdworkerError):
    """The settings cannot work together (e.g. two dialects mounted on one route)."""

    code = "invalid_settings"
