"""``tierpool gateway``: the anchor's HTTP API, served as a producer of the stream contract.

The smart-router's users never wrote to Redis: telephony providers called its
webhooks and services called its JSON API. This package serves that API
(``ANCHOR-HTTP-API.md``) byte for byte on ``HTTP_PORT`` and turns each call
into a contract request through one shared :class:`~tierpool.client.TierpoolClient`.
It is an edge, like ``schemas/``: ``core/`` never imports it.
"""
