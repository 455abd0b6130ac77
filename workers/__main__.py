"""``python -m workers`` runs one worker, like ``tierpool worker``."""

import sys

from workers.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
