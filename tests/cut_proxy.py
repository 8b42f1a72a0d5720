"""A TCP relay on 127.0.0.1 whose connections a test can cut, as a dropped network cuts them.

Clients connect to the proxy instead of the server; ``cut()`` aborts every relayed connection on both
sides at once, so the client and the server each see their TCP connection end without a WebSocket
close frame (code 1006), exactly what a lost Wi-Fi or a mobile hand-over produces. While ``refusing``
is set, new connections are dropped at once (the network is still down). ``cut_at_next_text_frame``
cuts at the client's next WebSocket text frame (a command), just before or just after it reaches the
server: the two sides of the one case a resume cannot see directly. Used by the resume tests of the
client examples and of the browser page.
"""

from __future__ import annotations

import asyncio
import threading


class CutProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.num_connections = 0  # relayed (not refused) connections so far
        self.num_refused = 0  # connections refused while ``refusing``
        self.num_cut = 0
        self._text_cut: bool | None = None  # armed: cut at the client's next text frame, after delivering it or not
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
            self.num_refused += 1
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
            await asyncio.gather(self._pipe_client(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            self._writers -= pair
            for each in pair:
                each.close()  # after what is buffered; a no-op on an aborted one

    async def _pipe_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to server, frame by frame once the HTTP upgrade is through, so a cut can fall at a text frame."""
        try:
            writer.write(await reader.readuntil(b"\r\n\r\n"))  # the upgrade request
            while True:
                head = await reader.readexactly(2)
                size = head[1] & 0x7F
                extended = b""
                if size >= 126:
                    extended = await reader.readexactly(2 if size == 126 else 8)
                    size = int.from_bytes(extended, "big")
                mask = await reader.readexactly(4 if head[1] & 0x80 else 0)
                frame = head + extended + mask + await reader.readexactly(size)
                is_text, deliver = head[0] & 0x0F == 0x1, self._text_cut
                if is_text and deliver is not None:
                    self._text_cut = None
                    if deliver:  # and give the server a moment to read it: an abort drops what is still unread
                        writer.write(frame)
                        await writer.drain()
                        await asyncio.sleep(0.05)
                    self._cut_all()
                    return
                writer.write(frame)
                await writer.drain()
        except asyncio.IncompleteReadError:  # the client's end of stream: passed on
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()

    def cut_at_next_text_frame(self, deliver: bool) -> None:
        """Cut every connection at the client's next text frame, after passing it to the server or instead."""
        self._text_cut = deliver

    def _cut_all(self) -> int:
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        self.num_cut += len(writers) // 2
        return len(writers) // 2

    def cut(self) -> int:
        """Abort every relayed connection (both sides, no close frame); how many connections that was."""

        async def cut_all() -> int:
            return self._cut_all()

        return self._call(cut_all())

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
