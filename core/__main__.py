"""``python -m tokenloom`` (and ``torchrun ... -m tokenloom``) runs the CLI."""

from .running.cli import main

if __name__ == "__main__":
    main()
