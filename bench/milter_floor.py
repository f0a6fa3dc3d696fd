"""The floor of an asyncio milter: what one message costs with no milter work.

Serves the recorded Postfix conversation of bench/milter_replay.py with
canned replies: an asyncio BufferedProtocol a connection (as mta.py), the
optneg reply after the first read, one AM.PDP round trip on a kept
non-blocking socket to the replay's fake daemon (sock_sendall/sock_recv, as
daemon.py) and the canned verdict when a read ends with the end of message,
close on quit. No codec, state machine, spool, log line or timers. Its CPU
a message is what the event loop, the transports and the system calls cost
before any of ours:

    .venv/bin/python bench/milter_replay.py --a /tmp/before --b-floor -n 1000

(argv: SOCKET DAEMON_SOCKET CONVERSATION.json, as the replay starts it)
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys

OPTNEG_REPLY = b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x00\x3d\x00\x1f\xf3\x80"


class Floor(asyncio.BufferedProtocol):
    def __init__(self, server: FloorServer):
        self.server = server
        self.buffer = server.buffer
        self.first = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        tail = bytes(self.buffer[max(0, nbytes - 5):nbytes])
        if self.first:
            self.first = False
            self.transport.write(OPTNEG_REPLY)
        elif tail == b"\x00\x00\x00\x01E":
            self.server.loop.create_task(self.ask())
        elif tail == b"\x00\x00\x00\x01Q":
            self.transport.close()

    async def ask(self) -> None:
        loop = self.server.loop
        link = self.server.links.pop() if self.server.links else self.server.connect()
        await loop.sock_sendall(link, self.server.request)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += await loop.sock_recv(link, 65536)
        self.server.links.append(link)
        self.transport.write(self.server.verdict)


class FloorServer:
    def __init__(self, daemon: str, request: bytes, verdict: bytes):
        self.daemon = daemon
        self.request = request
        self.verdict = verdict
        self.buffer = memoryview(bytearray(256 * 1024))
        self.links: list[socket.socket] = []

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.daemon)
        sock.setblocking(False)
        return sock

    async def serve(self, path: str) -> None:
        self.loop = asyncio.get_running_loop()
        server = await self.loop.create_unix_server(lambda: Floor(self), path)
        async with server:
            await server.serve_forever()


def canned(conv_file: str) -> tuple[bytes, bytes]:
    """The recorded AM.PDP request and the MTA's last packet (the verdict)."""
    conv = [(op, fd, bytes.fromhex(data))
            for op, fd, data in json.loads(open(conv_file).read())["packets"]]
    mta_fd = conv[0][1]
    request = next(d for op, fd, d in conv if op == "sendto" and fd != mta_fd)
    verdict = [d for op, fd, d in conv if op == "sendto" and fd == mta_fd][-1]
    return request, verdict


def main() -> int:
    path, daemon, conv_file = sys.argv[1:4]
    asyncio.run(FloorServer(daemon, *canned(conv_file)).serve(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
