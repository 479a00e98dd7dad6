"""`python -m inbox_schema FILE`: validate a manifest (see inbox_schema.cli).

Only an entry point; it must not hold logic of its own.
"""

import sys

from inbox_schema.cli import main

sys.exit(main())
