"""Where output images go: a Storage protocol and its backends (local disk; S3 next)."""
