"""Searches a solver for one pipeline, step count and guidance, and writes the pipeline with it as its scheduler.

The `pixelrepa-search-solver` command of an installed package; its code is pixelrepa_diffusers/commands/search_solver.py.
"""

import sys

from pixelrepa_diffusers.commands.search_solver import main

if __name__ == "__main__":
    sys.exit(main())
