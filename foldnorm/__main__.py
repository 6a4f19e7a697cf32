"""`python -m foldnorm`: the same as the `foldnorm` command."""
import sys

from .cli import main

sys.exit(main())
