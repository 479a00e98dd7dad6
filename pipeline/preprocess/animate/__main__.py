"""`python -m pipeline.preprocess.animate ...`: the animate preprocessing command line.

Only dispatches to cli.main.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
