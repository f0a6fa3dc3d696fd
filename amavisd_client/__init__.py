"""amavisd's stdlib-only side: the `amavisd-client` command and the pieces it is
made of, which the daemon and the milter shim share.

    wire/          sans-IO wire codecs (AM.PDP) and socket addresses
    connection.py  one AM.PDP connection to the daemon; the scan request
    spool.py       the private spool dir the daemon reads a message from
    edits.py       the daemon's header edits, applied to raw bytes
    delivery.py    the local delivery agent, by fork/exec
    client.py      the command line (arguments, file mode, mailer mode)

Standard library only, and nothing imported here: the client starts once per
mail, and the daemon imports `wire` without the rest.
"""
