"""`python -m amavisd` runs the command line."""

import sys

from amavisd.cli import main

sys.exit(main())
