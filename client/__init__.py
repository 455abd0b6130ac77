"""The client library: what producers and pods run, outside the workers.

:class:`TierpoolClient` sends requests and awaits their replies over shared
connections (:class:`Mux`); :class:`PodAgent` registers a pod, heartbeats its
calls and drains it before it leaves. None of it is part of the domain core.
"""

from tierpool.client.client import TierpoolClient
from tierpool.client.mux import Mux
from tierpool.client.podagent import PodAgent

__all__ = ["Mux", "PodAgent", "TierpoolClient"]
