"""`python -m custody_verify` is the same as `custody-verify`."""

import sys

from custody_verify.cli import main

sys.exit(main())
