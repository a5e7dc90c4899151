"""The worker pool: hand-off, results, abandonment and wake-ups, without a broker."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from openchecker_agent.dispatch import Delivery, DeliveryState, Outcome, WorkerPool
from openchecker_agent.errors import ConfigError
from openchecker_agent.handlers import UndecodableMessageError, decode_message, load_handler


class Gate:
    """An execute function whose calls block until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.started = threading.Semaphore(0)

    def __call__(self, delivery: Delivery) -> Outcome:
        self.started.release()
        self.opened.wait(10)
        return Outcome.REJECT if delivery.body == b"fail" else Outcome.ACK


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def wakeups() -> list[int]:
    return []


@pytest.fixture
def pool(gate: Gate, wakeups: list[int]) -> Iterator[WorkerPool]:
    workers = WorkerPool(2, gate, lambda: wakeups.append(1))
    yield workers
    gate.opened.set()
    workers.close()


def delivery(tag: int, body: bytes = b"{}") -> Delivery:
    return Delivery(channel=None, delivery_tag=tag, redelivered=False, body=body)


@pytest.mark.timeout(10)
def test_results_come_back_with_outcomes(pool: WorkerPool, gate: Gate) -> None:
    pool.submit(delivery(1))
    pool.submit(delivery(2, b"fail"))
    gate.opened.set()

    results: list[Delivery] = []
    while len(results) < 2:
        results.extend(pool.wait_for_results(5))

    outcomes = {item.delivery_tag: item.outcome for item in results}
    assert outcomes == {1: Outcome.ACK, 2: Outcome.REJECT}
    assert pool.busy_count() == 0


@pytest.mark.timeout(10)
def test_runs_at_most_pool_size_at_once(pool: WorkerPool, gate: Gate) -> None:
    for tag in (1, 2, 3):
        pool.submit(delivery(tag))
    assert gate.started.acquire(timeout=5)
    assert gate.started.acquire(timeout=5)

    assert not gate.started.acquire(timeout=0.3)
    assert pool.busy_count() == 3


@pytest.mark.timeout(10)
def test_abandoned_deliveries_never_report(pool: WorkerPool, gate: Gate) -> None:
    for tag in (1, 2, 3):
        pool.submit(delivery(tag))
    assert gate.started.acquire(timeout=5)
    assert gate.started.acquire(timeout=5)

    queued = pool.abandon_queued()
    running = pool.abandon_running()
    gate.opened.set()

    assert [item.delivery_tag for item in queued] == [3]
    assert sorted(item.delivery_tag for item in running) == [1, 2]
    assert all(item.state is DeliveryState.ABANDONED for item in queued + running)
    assert pool.wait_idle(5)
    assert pool.take_completed() == []


@pytest.mark.timeout(10)
def test_socket_wait_triggers_one_wakeup(pool: WorkerPool, gate: Gate, wakeups: list[int]) -> None:
    assert pool.begin_socket_wait()
    pool.submit(delivery(1))
    pool.submit(delivery(2))
    gate.opened.set()
    assert pool.wait_idle(5)

    assert wakeups == [1]
    pool.end_socket_wait()
    assert not pool.begin_socket_wait()
    assert len(pool.take_completed()) == 2


@pytest.mark.timeout(10)
def test_interrupt_ends_wait(pool: WorkerPool) -> None:
    pool.interrupt()

    assert pool.wait_for_results(5) == []


def test_decode_message_accepts_object() -> None:
    assert decode_message(b'{"a": 1}') == {"a": 1}


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_decode_message_rejects_others(body: bytes) -> None:
    with pytest.raises(UndecodableMessageError):
        decode_message(body)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("no_such_module_here:run", "cannot import module 'no_such_module_here'"),
        ("openchecker_agent.checks:no_such_function", "has no function 'no_such_function'"),
    ],
)
def test_load_handler_errors(reference: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_handler(reference, source="c.ini")
