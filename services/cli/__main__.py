"""`python -m services.cli`: the same command line as `xrayq`."""

import sys

from services.cli.main import main

sys.exit(main())
