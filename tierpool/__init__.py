"""tierpool: places live sessions on pods drawn from tiered pools, over Redis Streams.

The repository's top-level folders are this package's subpackages (the links
in this folder point at them): ``tierpool.schemas`` decodes messages at the
edge, ``tierpool.core`` decides (Lua scripts and thin Python),
``tierpool.workers`` moves messages and runs loops, ``tierpool.client`` is
what producers and pods run, ``tierpool.bench`` measures.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tierpool")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
