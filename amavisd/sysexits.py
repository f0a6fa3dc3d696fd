"""Exit codes from sysexits.h, the language Sendmail and Postfix pipe(8) understand.

75 means "keep the mail and retry": every doubt maps to it, never to 70/78,
which make Sendmail bounce and copy the postmaster.
"""

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
# Not in sysexits.h: amavisd-new's "discard" code on AM.PDP (`exit_code=99`).
EX_DISCARD = 99
