"""amavisd-milter: a thin milter in front of the amavisd daemon (stdlib only).

The MTA (Postfix, Sendmail) speaks the milter protocol to us; we spool the
message under the daemon's temp base as it arrives, ask the daemon over
AM.PDP at end of message, and turn its verdict into milter replies. All mail
work is the daemon's; a doubt of ours is a tempfail, never an accept.

    codec.py     sans-IO wire format: bytes <-> typed packets
    state.py     one MTA connection as a state machine (no sockets, no files)
    spool.py     the private spool file the daemon reads the message from
    daemon.py    one AM.PDP question to the daemon, on the event loop
    links.py     the AM.PDP connections to the daemon, kept between questions
    server.py    the asyncio server: listeners, connections, progress packets
    options.py   settings: defaults, the [milter] section of amavisd.toml, flags
    main.py      the command line: bind, drop root, detach, run
"""
