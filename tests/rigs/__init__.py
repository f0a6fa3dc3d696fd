"""Test rigs that only the checkout's test suite (and bench/) uses.

They stay out of the installed package: some need root or Debian's
amavisd-new (amavisd_new.py, sealed.py), some run the daemon from this
checkout (daemon.py), some are fakes for faults a real part cannot produce
on demand (faults.py), the rest are fixtures only tests build (archivers.py's
damaged and encrypted archives, codec_messages.py) or a test part
(smtpsink.py). What a user or `make check` needs when installed is in
`amavisd.testing`.
"""
