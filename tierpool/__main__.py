"""``python -m tierpool``: the ``tierpool`` command."""

from tierpool.workers.cli import main

raise SystemExit(main())
