"""Exit codes from sysexits.h, the only language an MTA's pipe mailer speaks.

Shared by the command line and the delivery agent runner; a module of its
own so that neither has to import the other.
"""

EX_OK = 0
EX_USAGE = 64
EX_NOINPUT = 66
EX_NOUSER = 67  # no such mailbox: the MTA bounces
EX_UNAVAILABLE = 69  # rejected: the MTA bounces
EX_TEMPFAIL = 75  # every doubt: the MTA keeps the message and retries
EX_DISCARD = 99  # file mode only: the daemon said discard
