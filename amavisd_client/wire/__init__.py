"""Wire formats: the bytes of each protocol we speak, and nothing else.

One module a protocol (`ampdp`; the milter codec comes next) and `address`,
the one parser of the socket addresses we listen on and connect to. They are
shared by the daemon and the stdlib-only client (and the milter shim), so
every module here is sans-IO: it turns bytes into messages and messages into
bytes, and never touches a socket, a file or a clock; a blocking loop, an
asyncio loop or a fuzzer drives it alike. Standard library only, and only
modules the interpreter has loaded anyway: the client imports these on every
mail.

This file imports nothing, so importing one codec costs that codec alone.
"""
