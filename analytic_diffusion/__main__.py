"""``python -m analytic_diffusion ...`` runs the command line (what ``torchrun -m analytic_diffusion`` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
