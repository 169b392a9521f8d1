"""The store's retries: transient failures wait out an outage within a time budget."""

from __future__ import annotations

import time

import pytest

from difftrain.storage import retry


def test_transient_failures_are_retried_until_the_store_is_back():
    back_at = time.monotonic() + 1.0
    calls = []

    def call() -> str:
        calls.append(time.monotonic())
        if time.monotonic() < back_at:
            raise ConnectionError("connection refused")
        return "ok"

    assert retry(call, "put", budget_s=10, max_delay=0.3) == "ok"
    assert len(calls) > 2 and calls[-1] >= back_at


def test_retries_stop_when_the_budget_is_spent():
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        retry(lambda: (_ for _ in ()).throw(ConnectionError("down")), "put", budget_s=0.8)
    assert 0.8 <= time.monotonic() - started < 3


def test_a_permanent_error_is_not_retried():
    calls = []

    def call() -> None:
        calls.append(1)
        raise ValueError("bad request")

    with pytest.raises(ValueError, match="bad request"):
        retry(call, "put", budget_s=10)
    assert calls == [1]
