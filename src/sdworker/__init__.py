"""sdworker: self-hosted diffusion inference."""

__version__ = "0.1.0"
