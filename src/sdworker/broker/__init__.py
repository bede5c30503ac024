"""Job queues: a Broker protocol and its backends (SQLite embedded; Redis next)."""
