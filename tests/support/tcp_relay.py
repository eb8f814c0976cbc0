"""A TCP relay in the test's event loop, between a client and a real server (Redis),
that a test can cut: every relayed connection is dropped and new ones are closed
as soon as they are accepted, until it is mended. The client sees what it sees
when the server goes away ("Connection closed by server"), at a moment the test
chooses, while the server itself keeps its data."""

from __future__ import annotations

import asyncio
import contextlib


class CuttableRelay:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port: int | None = None
        self.cut_count = 0  # connections dropped or refused while cut
        self._is_cut = False
        self._server: asyncio.AbstractServer | None = None
        # Each relayed connection: its client's side and its server's side.
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self) -> CuttableRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        self._is_cut = True
        for sides in self._open:
            for writer in sides:
                writer.transport.abort()
        self.cut_count += len(self._open)
        self._open.clear()

    def mend(self) -> None:
        self._is_cut = False

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._is_cut:
            self.cut_count += 1
            client_writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:  # the server itself is away: the client sees its connection close
            client_writer.transport.abort()
            return
        sides = (client_writer, server_writer)
        self._open.add(sides)
        try:
            await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))
        finally:
            self._open.discard(sides)
            for writer in sides:
                writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()  # one side gone: the other goes too
