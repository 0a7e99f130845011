"""`python -m lofa ARGS` is the `lofa ARGS` command (lofa.cli)."""
import sys

from lofa.cli import main

sys.exit(main())
