"""Kubernetes pod source (``POD_SOURCE=kubernetes``): an edge, like ``schemas``.

It translates pod readiness into the contract's pod transitions and calls
the same core; ``core`` never imports it. Needs the ``kubernetes`` extra
(``pip install 'tierpool[kubernetes]'``, lightkube).
"""

from tierpool.kube.source import KubePodSource, load_config

__all__ = ["KubePodSource", "load_config"]
