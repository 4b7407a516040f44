"""``python -m imclass ...`` is the ``imclass`` command line (so that ``torchrun -m imclass train ...`` works)."""
from imclass.cli import main

if __name__ == "__main__":
    main()
