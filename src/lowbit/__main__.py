"""`python -m lowbit ...` runs the CLI (where the `lowbit` script is not on PATH)."""

import sys

from lowbit.cli import main

sys.exit(main())
