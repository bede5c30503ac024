"""The HTTP API (FastAPI). Never imports torch: it validates, enqueues and reports."""
