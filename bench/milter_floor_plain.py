"""bench/milter_floor.py without asyncio: how much of the floor is the event loop.

The same floor (the optneg reply after a connection's first read, one AM.PDP
round trip on a kept non-blocking socket to the fake daemon and the canned
verdict when a read ends with the end of message, reads into one shared
buffer, close on quit) driven by a minimal hand-written loop: one
level-triggered select.epoll, one accept a listener event, no tasks,
futures, handles or transports. A daemon link stays registered while it is
kept, so its round trip is a send and, when epoll says so, a recv (asyncio's
sock_recv tries a recv first and adds then removes a reader each time).
Replies are a few dozen bytes into an empty socket buffer: no write
buffering (sendall raises rather than blocks if that ever fails). The
difference to milter_floor.py is what asyncio costs a message:

    .venv/bin/python bench/milter_replay.py --a-floor --b-floor plain -n 1000

(argv: SOCKET DAEMON_SOCKET CONVERSATION.json, as the replay starts it)
"""

from __future__ import annotations

import select
import socket
import sys

from milter_floor import canned  # run as a script: bench/ is on the path

OPTNEG_REPLY = b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x00\x3d\x00\x1f\xf3\x80"
EOM, QUIT = b"\x00\x00\x00\x01E", b"\x00\x00\x00\x01Q"


def serve(path: str, daemon: str, request: bytes, verdict: bytes) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(100)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    buffer = memoryview(bytearray(256 * 1024))
    conns: dict[int, list] = {}  # MTA fd: [socket, first read still to come]
    asking: dict[int, list] = {}  # daemon link fd: [link, MTA socket, reply so far]
    links: list[socket.socket] = []
    listen_fd = listener.fileno()
    while True:
        for fd, _ in poller.poll():
            if fd == listen_fd:
                conn, _ = listener.accept()
                conn.setblocking(False)
                poller.register(conn.fileno(), select.EPOLLIN)
                conns[conn.fileno()] = [conn, True]
            elif fd in conns:
                state = conns[fd]
                nbytes = state[0].recv_into(buffer)
                tail = bytes(buffer[max(0, nbytes - 5):nbytes])
                if not nbytes or tail == QUIT:
                    del conns[fd]
                    state[0].close()  # also leaves the epoll set
                elif state[1]:
                    state[1] = False
                    state[0].sendall(OPTNEG_REPLY)
                elif tail == EOM:
                    link = links.pop() if links else None
                    if link is None:
                        link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        link.connect(daemon)
                        link.setblocking(False)
                        poller.register(link.fileno(), select.EPOLLIN)
                    link.sendall(request)
                    asking[link.fileno()] = [link, state[0], b""]
            elif fd in asking:
                ask = asking[fd]
                ask[2] += ask[0].recv(65536)
                if b"\r\n\r\n" in ask[2]:
                    del asking[fd]
                    links.append(ask[0])
                    ask[1].sendall(verdict)
            else:  # the daemon closed a kept link
                link = next(link for link in links if link.fileno() == fd)
                links.remove(link)
                link.close()


def main() -> int:
    path, daemon, conv_file = sys.argv[1:4]
    serve(path, daemon, *canned(conv_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
