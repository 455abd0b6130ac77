"""How tierpool reaches Redis: one standalone server, a Sentinel-named master,
or the master of a namespace's slot in a Redis Cluster.

An edge, like ``schemas`` and ``gateway``: the domain core never imports it.
The core is handed connected clients and asks them only what
:mod:`tierpool.core.redistarget` defines (where Redis is, and whether a
client's server is a cluster).
"""
