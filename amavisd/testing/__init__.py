"""Test parts shipped with amavisd: what `make check` and a site's own tests use.

A private real clamd with a tiny signature database (clamd.py), EICAR built
at run time (eicar.py), sample messages (messages.py) and archives made by the
real archivers (archivers.py). None of them needs root, Debian's amavisd-new
or a checkout of the source. Rigs that do, fault proxies and fixtures only the
test suite builds live in the checkout's tests/rigs/ and are not installed.
"""
