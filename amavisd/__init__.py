"""amavisd: a pre-forked AMaViS mail virus-scanning daemon."""

__version__ = "0.1.0"
