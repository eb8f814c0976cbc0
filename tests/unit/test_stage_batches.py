"""How a stage agent takes and settles batches (smi/kafka/handling.py: _Intake and
_BatchWindow), on stand-in events: up to two batches in hand, a key's messages in
offset order across them, acks in the order taken, a second batch only when a
whole one waits or the one in hand is old enough, and nothing acked after a stop.
The same agent on a real broker: tests/integration/test_kafka_plumbing.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from smi.kafka.handling import SourceMessage, _BatchWindow, _Intake
from smi.kafka.names import DEFAULT

pytestmark = pytest.mark.timeout(10)


def event(offset: int, key: str | None) -> SimpleNamespace:
    """What the window reads of a Faust event: its message's record."""
    return SimpleNamespace(message=SimpleNamespace(
        topic="jobs.requested", partition=0, offset=offset, key=None if key is None else key.encode(),
        value=b"{}"))


class Stage:
    """A handler whose messages finish when the test says so, and the acks it saw."""

    def __init__(self, *, hold: set[int] = frozenset()):
        self.hold = {offset: asyncio.Event() for offset in hold}
        self.started: list[int] = []
        self.finished: list[int] = []
        self.acked: list[int] = []

    async def settle(self, message: SourceMessage) -> None:
        self.started.append(message.offset)
        if message.offset in self.hold:
            await self.hold[message.offset].wait()
        else:
            await asyncio.sleep(0)
        self.finished.append(message.offset)

    async def ack(self, batch: list) -> None:
        self.acked.extend(e.message.offset for e in batch)

    def release(self, offset: int) -> None:
        self.hold[offset].set()

    def window(self, size: int = 2, second_after: float | None = None) -> _BatchWindow:
        return _BatchWindow(self.settle, self.ack, DEFAULT, size, second_after)


async def settled() -> None:
    """Let every runnable task run until all wait on something."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_later_batch_that_settles_first_is_acked_only_after_the_one_before():
    stage = Stage(hold={0})
    async with stage.window() as window:
        window.launch([event(0, "a")])
        window.launch([event(1, "b"), event(2, "c")])
        await settled()
        assert stage.finished == [1, 2]  # the second batch ran while the first waited ...
        assert stage.acked == []  # ... and waits, unacked, behind it
        stage.release(0)
        await window.drained()
    assert stage.acked == [0, 1, 2]


async def test_a_keys_message_in_the_next_batch_waits_for_the_one_before():
    stage = Stage(hold={0})
    async with stage.window() as window:
        window.launch([event(0, "job-1")])
        window.launch([event(1, "job-1"), event(2, "job-2")])
        await settled()
        assert stage.started == [0, 2]  # job-1's second message has not started
        stage.release(0)
        await window.drained()
    assert stage.finished.index(0) < stage.finished.index(1)


async def test_messages_without_a_key_are_not_held_behind_each_other():
    stage = Stage(hold={0})
    async with stage.window() as window:
        window.launch([event(0, None)])
        window.launch([event(1, None)])
        await settled()
        assert stage.finished == [1]
        stage.release(0)
        await window.drained()


async def test_a_second_batch_is_taken_only_when_a_whole_one_waits_and_a_third_not_at_all():
    stage = Stage(hold={0})
    full = asyncio.Event()
    async with stage.window(size=2) as window:
        await asyncio.wait_for(window.turn(full), 1)  # none in hand: at once
        window.launch([event(0, "a")])
        turn = asyncio.ensure_future(window.turn(full))
        await settled()
        assert not turn.done()  # one in hand and no whole batch waiting
        full.set()
        await asyncio.wait_for(turn, 1)
        window.launch([event(1, "b")])
        third = asyncio.ensure_future(window.turn(full))
        await settled()
        assert not third.done()  # two in hand: no room, however full the queue
        stage.release(0)
        await asyncio.wait_for(third, 1)


async def test_a_batch_in_hand_long_enough_no_longer_holds_back_the_next():
    stage = Stage(hold={0, 1})
    full = asyncio.Event()  # never set: the stage keeps up
    async with stage.window(size=2, second_after=0.2) as window:
        await asyncio.wait_for(window.turn(full), 1)  # none in hand: at once
        window.launch([event(0, "a")])
        launched = asyncio.get_running_loop().time()
        turn = asyncio.ensure_future(window.turn(full))
        await asyncio.sleep(0.1)
        assert not turn.done()  # the batch in hand is young: what arrives waits for it
        await asyncio.wait_for(turn, 1)
        assert asyncio.get_running_loop().time() - launched >= 0.19
        window.launch([event(1, "b")])
        third = asyncio.ensure_future(window.turn(full))
        await asyncio.sleep(0.3)
        assert not third.done()  # however old they are, two in hand fill the window
        stage.release(0)
        await asyncio.wait_for(third, 1)  # the second, launched 0.3 s ago, is old enough
        stage.release(1)


async def test_with_one_in_hand_the_next_batch_waits_until_it_is_acked():
    stage = Stage(hold={0})
    async with stage.window(size=2) as window:
        await window.turn(asyncio.Event())
        window.launch([event(0, "a")])
        turn = asyncio.ensure_future(window.turn(asyncio.Event()))
        await settled()
        assert not turn.done()
        stage.release(0)
        await asyncio.wait_for(turn, 1)
        assert stage.acked == [0]


async def test_a_stopped_window_acks_nothing_in_hand_and_cancels_its_handlers():
    stage = Stage(hold={0, 2})
    async with stage.window() as window:
        window.launch([event(0, "a"), event(1, "b")])
        window.launch([event(2, "c")])
        await settled()
        running = set(window._running)
    assert stage.acked == []  # all three are redelivered, the finished one too
    assert stage.finished == [1]
    assert len(running) == 2 and all(task.cancelled() for task in running)  # both batches' held ones


async def test_a_failing_ack_stops_the_agent_instead_of_hanging_it():
    class Broken(Stage):
        async def ack(self, batch: list) -> None:
            raise RuntimeError("consumer gone")

    stage = Broken()
    async with stage.window(size=1) as window:
        window.launch([event(0, "a")])
        with pytest.raises(RuntimeError, match="consumer gone"):
            await asyncio.wait_for(window.turn(asyncio.Event()), 1)


async def events_from(queue: asyncio.Queue):
    while (item := await queue.get()) is not None:
        yield item


async def test_the_intake_takes_what_waits_up_to_a_batch_and_says_when_a_whole_one_waits():
    source: asyncio.Queue = asyncio.Queue()
    async with _Intake(events_from(source), batch_size=3) as intake:
        source.put_nowait("e0")
        assert await asyncio.wait_for(intake.take(), 1) == ["e0"]  # a lone event at once
        for n in range(1, 6):
            source.put_nowait(f"e{n}")
        await settled()
        assert intake.full.is_set()  # three wait; two more wait for room
        assert await intake.take() == ["e1", "e2", "e3"]
        assert not intake.full.is_set()
        await settled()
        assert await intake.take() == ["e4", "e5"]
        source.put_nowait(None)  # the stream ends
        assert await asyncio.wait_for(intake.take(), 1) is None
