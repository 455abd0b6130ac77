"""``python -m tierpool.workers`` runs one worker, like ``tierpool worker``."""

import sys

from tierpool.workers.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
