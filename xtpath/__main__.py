"""``python -m xtpath`` runs the command line (also under ``torchrun``)."""

from xtpath.cli import main

if __name__ == "__main__":
    main()
