"""A Redis client that sends the commands of one event-loop tick as one pipeline.

A stage handles a batch of messages concurrently (smi.kafka.handling), and each
handler awaits its own job-table calls: a GET here, a transition script there.
Sent one by one, every call is a round trip and a trip through the connection
pool. This client queues every command issued during one pass of the event loop
and sends them together, pipelined (not as a MULTI transaction: each command stays
its own atomic step, as it was), on one connection; each caller gets its own reply
or its own error. A lone command costs one extra loop pass, nothing more.

The idea is ioredis's ``enableAutoPipelining``. Order is kept: commands leave in
the order they were issued, and one coroutine's commands are awaited one after
another anyway."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis


class AutoPipelineRedis(Redis):
    """``redis.asyncio.Redis`` whose single commands are pipelined per loop tick.

    Explicit pipelines (``.pipeline()``) work as before and are sent as they are."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._queued: list[tuple[tuple, dict, asyncio.Future]] = []
        self._sending: set[asyncio.Task] = set()  # the loop keeps only weak references

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((args, options, reply))
        return await reply

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        task = asyncio.ensure_future(self._send(queued))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, queued: list[tuple[tuple, dict, asyncio.Future]]) -> None:
        pipe = self.pipeline(transaction=False)
        for args, options, _ in queued:
            pipe.execute_command(*args, **options)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every caller sees it
            for _, _, reply in queued:
                if not reply.done():
                    reply.set_exception(exc if isinstance(exc, Exception) else ConnectionError(repr(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, reply), result in zip(queued, replies):
            if reply.done():  # its caller was cancelled
                continue
            if isinstance(result, Exception):
                reply.set_exception(result)
            else:
                reply.set_result(result)
