"""`python -m flows.cli ...`: the same as `tes ...`."""

import sys

from flows.cli import main

sys.exit(main())
