"""The per-connection delivery state the consumer's threads share, without a broker."""

from __future__ import annotations

import pytest
from openchecker_agent.dispatch import (
    Completion,
    Delivery,
    DeliveryState,
    Outcome,
    Session,
    TaskSlots,
)
from openchecker_agent.errors import ConfigError
from openchecker_agent.handlers import UndecodableMessageError, decode_message, load_handler


def delivery(tag: int) -> Delivery:
    return Delivery(channel=None, delivery_tag=tag, redelivered=False, body=b"{}")


# More slots than any test here starts tasks.
SLOTS = TaskSlots(100)


def session_with(*tags: int) -> Session:
    session = Session(connection=None, channel=None)
    for tag in tags:
        session.receive(delivery(tag))
    return session


def test_deliveries_start_in_arrival_order() -> None:
    session = session_with(1, 2)

    first = session.start_next(SLOTS)
    second = session.start_next(SLOTS)

    assert first is not None and second is not None
    assert (first.delivery_tag, second.delivery_tag) == (1, 2)
    assert first.state is DeliveryState.RUNNING
    assert session.start_next(SLOTS) is None
    assert not session.has_pending()


def test_no_delivery_starts_without_a_free_slot() -> None:
    slots = TaskSlots(1)
    session = session_with(1, 2)

    first = session.start_next(slots)
    assert first is not None
    assert session.start_next(slots) is None
    assert session.has_pending()

    slots.give_back()
    second = session.start_next(slots)
    assert second is not None and second.delivery_tag == 2


def test_slots_are_shared_across_sessions() -> None:
    # The tasks of a lost connection keep their slots while the next
    # connection receives deliveries.
    slots = TaskSlots(2)
    old, new = session_with(1, 2), session_with(1, 2)
    assert old.start_next(slots) is not None
    assert old.start_next(slots) is not None

    assert new.start_next(slots) is None
    slots.give_back()
    assert new.start_next(slots) is not None
    assert slots.in_use == 2


def test_completed_deliveries_wait_for_settlement() -> None:
    session = session_with(1, 2, 3)
    first, second = session.start_next(SLOTS), session.start_next(SLOTS)
    assert first is not None and second is not None

    assert session.complete(first, Outcome.ACK, 0.1) is Completion.RECORDED
    assert session.complete(second, Outcome.REJECT, 0.1) is Completion.RECORDED

    # One still pending, two finished but not settled.
    assert session.busy_count() == 3
    results = session.take_results()
    assert [(item.delivery_tag, item.outcome) for item in results] == [
        (1, Outcome.ACK),
        (2, Outcome.REJECT),
    ]
    # Taken results count as busy until the consumer settles them.
    assert session.busy_count() == 3
    for item in results:
        del session.unsettled[item.delivery_tag]
    assert session.busy_count() == 1


def test_abandoned_deliveries_never_report() -> None:
    session = session_with(1, 2)
    running = session.start_next(SLOTS)
    assert running is not None

    pending = session.abandon_pending()
    abandoned = session.abandon_running()

    assert [item.delivery_tag for item in pending] == [2]
    assert abandoned == [running]
    assert running.outcome is Outcome.REQUEUE
    assert session.running_count() == 0
    assert session.complete(running, Outcome.ACK, 0.1) is Completion.ABANDONED
    assert running.outcome is Outcome.REQUEUE
    assert session.take_results() == []


def test_results_after_session_end_dropped() -> None:
    session = session_with(1, 2)
    early, late = session.start_next(SLOTS), session.start_next(SLOTS)
    assert early is not None and late is not None
    session.complete(early, Outcome.ACK, 0.1)

    assert session.end() == [early]
    assert session.complete(late, Outcome.ACK, 0.1) is Completion.SESSION_ENDED
    assert late.outcome is Outcome.ACK
    assert session.take_results() == []


def test_holder_settles_at_once_when_idle() -> None:
    session = session_with(1, 2)
    first, second = session.start_next(SLOTS), session.start_next(SLOTS)
    assert first is not None and second is not None
    session.complete(first, Outcome.ACK, 0.1)

    completion, results = session.complete_holding(second, Outcome.REJECT, 0.1)

    assert completion is Completion.RECORDED
    assert results == [first, second]
    assert session.take_results() == []


def test_holder_defers_results_while_pending() -> None:
    # With a delivery waiting to start, the holder starts it first and the
    # result waits, so that acks fold into one.
    session = session_with(1, 2)
    first = session.start_next(SLOTS)
    assert first is not None

    completion, results = session.complete_holding(first, Outcome.ACK, 0.1)

    assert completion is Completion.RECORDED
    assert results == []
    assert session.take_results() == [first]


def test_session_end_returns_failed_settlements() -> None:
    # A result taken for settlement stays unsettled until its ack is sent.
    # If the connection fails first, the session's end returns it.
    session = session_with(1, 2)
    unacked, running = session.start_next(SLOTS), session.start_next(SLOTS)
    assert unacked is not None and running is not None
    session.complete(unacked, Outcome.ACK, 0.1)
    assert session.take_results() == [unacked]

    assert session.end() == [unacked]
    assert session.unsettled == {}
    assert session.complete(running, Outcome.ACK, 0.1) is Completion.SESSION_ENDED


def test_one_wakeup_outstanding_until_it_runs() -> None:
    session = session_with(1, 2)
    first, second = session.start_next(SLOTS), session.start_next(SLOTS)
    assert first is not None and second is not None

    session.complete(first, Outcome.ACK, 0.1)
    assert session.claim_wake()
    session.complete(second, Outcome.ACK, 0.1)
    assert not session.claim_wake()

    assert len(session.take_results_when_woken()) == 2
    assert session.claim_wake()


@pytest.mark.parametrize("body", [b'{"a": 1}', b' \r\n{"a": 1}\t\n', b'{"a": 1} '])
def test_decode_message_accepts_object(body: bytes) -> None:
    assert decode_message(body) == {"a": 1}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b"\xff\xfe",
        b'"text"',
        # Anything but whitespace after the object.
        b'{"a": 1} x',
        b'{"a": 1}{"b": 2}',
        b'{"a": 1}\x00',
        # Nested past the decoder's recursion limit: RecursionError.
        b"[" * 100_000,
        # An integer past Python's digit limit for int(): ValueError.
        b'{"n": ' + b"1" * 5_000 + b"}",
    ],
)
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
