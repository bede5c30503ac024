"""The `broker` fixture: one parameter per backend; every contract test runs on each.

Adding a backend (Redis next) is one entry in BACKENDS plus its name in the fixture's
params. The fixture yields a BrokerHandle: attribute access goes to the open broker
instance, and `reopen()` / `open_another()` give further instances on the same storage
(durability, several processes or connections sharing one queue).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdworker.broker.base import Broker

MAX_ATTEMPTS = 3

Opener = Callable[[], Broker]


def _sqlite(storage: Path) -> Opener:
    from sdworker.broker.sqlite import SqliteBroker

    path = storage / "jobs.db"
    return lambda: SqliteBroker(path=path, max_attempts=MAX_ATTEMPTS)


def _redis(storage: Path, request: pytest.FixtureRequest) -> Opener:
    from sdworker.broker.redis import RedisBroker

    server = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex}"  # a fresh namespace per test on the shared server
    return lambda: RedisBroker(server.url, prefix=prefix, max_attempts=MAX_ATTEMPTS)


# name -> (a fresh storage folder, the request -> a function that opens a broker on it)
BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Opener]] = {
    "sqlite": lambda storage, _request: _sqlite(storage),
    "redis": _redis,
}


class BrokerHandle:
    """The broker under test, plus ways to open more instances on the same storage."""

    def __init__(self, backend: str, opener: Opener, max_attempts: int) -> None:
        self.backend = backend
        self.max_attempts = max_attempts
        self._opener = opener
        self._open: list[Broker] = []
        self.current: Broker = self.open_another()

    def __getattr__(self, name: str) -> Any:
        # Only called for names the handle does not have: the Broker methods.
        return getattr(self.current, name)

    def open_another(self, *, close_at_teardown: bool = True) -> Broker:
        """A second instance on the same storage."""
        instance = self._opener()
        if close_at_teardown:
            self._open.append(instance)
        return instance

    def reopen(self) -> Broker:
        """Close the current instance and open a new one on the same storage."""
        self.current.close()
        self._open.remove(self.current)
        self.current = self.open_another()
        return self.current

    def close_all(self) -> None:
        errors: list[Exception] = []
        while self._open:
            try:
                self._open.pop().close()
            except Exception as exc:  # close the others too, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(params=list(BACKENDS))
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerHandle]:
    opener = BACKENDS[request.param](tmp_path, request)
    handle = BrokerHandle(request.param, opener, MAX_ATTEMPTS)
    try:
        yield handle
    finally:
        handle.close_all()
