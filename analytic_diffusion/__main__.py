"""``python -m analytic_diffusion ...`` runs the command line (what ``torchrun -m analytic_diffusion`` starts)."""

from .cli import entry_point

if __name__ == "__main__":
    entry_point()
