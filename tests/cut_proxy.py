"""A TCP relay on 127.0.0.1 whose connections a test can cut, as a dropped network cuts them.

Clients connect to the proxy instead of the server; ``cut()`` aborts every relayed connection on both
sides at once, so the client and the server each see their TCP connection end without a WebSocket
close frame (code 1006), exactly what a lost Wi-Fi or a mobile hand-over produces. While ``refusing``
is set, new connections are dropped at once (the network is still down). Used by the resume tests of
the client examples and of the browser page.
"""

from __future__ import annotations

import asyncio
import threading


class CutProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.num_connections = 0  # relayed (not refused) connections so far
        self.num_cut = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cut-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the server is down: the client sees its connection fail
            writer.transport.abort()
            return
        self.num_connections += 1
        pair = {writer, upstream_writer}
        self._writers |= pair
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            self._writers -= pair
            for each in pair:
                each.close()  # after what is buffered; a no-op on an aborted one

    def cut(self) -> int:
        """Abort every relayed connection (both sides, no close frame); how many connections that was."""

        async def cut_all() -> int:
            writers = list(self._writers)
            for writer in writers:
                writer.transport.abort()
            return len(writers) // 2

        num = self._call(cut_all())
        self.num_cut += num
        return num

    def close(self) -> None:
        self.refusing = True
        self.cut()
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes one way; an end of stream is passed on as one (after the bytes before it), an error as an abort."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
            await writer.drain()
    except (ConnectionError, OSError):
        writer.transport.abort()
