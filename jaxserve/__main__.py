"""`python -m jaxserve ...` is the `jaxserve` command."""
import sys

from jaxserve.cli import main

sys.exit(main())
