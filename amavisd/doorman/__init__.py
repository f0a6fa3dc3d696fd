"""The doorman: accepts every connection; a worker gets one only once its request is in.

Why: a worker serves one connection at a time, so a local user of the
socket's group who opens more silent connections than there are workers
would hold every worker for `client_idle_timeout`, again and again, and
real clients would starve. The doorman, a thread of the master, owns the
listening sockets, accepts, and holds each AM.PDP connection until its
whole first request has arrived (AM.PDP clients speak first; a request ends
with an empty line). SMTP/LMTP clients wait for our greeting, so theirs are
passed at once. Then it passes the connection (SCM_RIGHTS), with the index
of its listener, into one SOCK_SEQPACKET queue that every idle worker waits
on: the kernel gives each message to exactly one worker, in order.

How long it holds, and what it costs (`door`): a silent connection costs
one descriptor, not a worker, and is closed after `client_idle_timeout`; one
that trickles its request after `request_timeout` from its first byte; at
most `max_pending_connections` are held. A request whole at the first look
(MSG_PEEK, the usual case) is passed unread, so the worker's session reads
every byte itself; one not whole yet is read on (`reading`) and passed with
what was read in a memfd (`handout`), under one byte budget for all the
doorman read: a peek cannot tell a request that never ends from a big one
whose client waits for us to read.
Only a connection's first request is waited for here: later ones on the
same connection are the worker's (client_idle_timeout between requests,
max_connection_requests, max_connection_time bound them).

Why a thread of the master and not a process of its own: it does nothing
but accept, poll and pass descriptors (no parsing), it must live exactly as
long as the master (the listening sockets die with it, and the workers see
end-of-file on the queue), and it adds no process to supervise, count or
mistake for a worker. The one cost of a thread beside fork(): a worker must
not inherit a held connection (closing it in the doorman would then not
hang up), so `forking()` keeps the doorman still across the fork and
`forget_in_child()` closes, in the new worker, every descriptor the doorman
held at that instant. If the thread dies of a bug, the master starts a new
one (`watch`); the connections it held are closed, their clients retry.

What a worker is given it serves, even if it was asked to leave meanwhile:
it only takes from the queue while it is alive and idle. Connections still
in the queue belong to the queue (the master holds its reading end), so a
worker killed while idle loses nothing.

Modules: `door` (the thread: accept, the first look, the holding rules, the
summary), `reading` (a request not whole at the first look, the byte
budget), `handout` (the queue: both its ends, the retry when it is full),
`first_request` (where a protocol's first request ends: all the doorman
knows of protocols), `held` (a held connection).
"""

from amavisd.doorman.door import Doorman

__all__ = ["Doorman"]
