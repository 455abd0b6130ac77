"""tierpool wire messages: msgspec Structs decoded from flat stream field maps.

Import from here; the submodules are an implementation detail:
``fields`` holds the rules, ``requests``/``pods``/``replies`` the types,
``flat`` the codec, ``messages`` the decode/encode functions.
"""

from tierpool.schemas.errors import InvalidMessage
from tierpool.schemas.messages import (
    decode_pod_event,
    decode_reply,
    decode_request,
    encode,
    request_kind,
)
from tierpool.schemas.pods import PodDeregister, PodEvent, PodHeartbeat, PodRegister
from tierpool.schemas.replies import Reason, Reply, ReplyKind, Status
from tierpool.schemas.requests import (
    REQUEST_KINDS,
    AllocateRequest,
    ConfigRequest,
    DrainRequest,
    MerchantPolicy,
    ReleaseRequest,
    Request,
    RequestKind,
)

__all__ = [
    "REQUEST_KINDS",
    "AllocateRequest",
    "ConfigRequest",
    "DrainRequest",
    "InvalidMessage",
    "MerchantPolicy",
    "PodDeregister",
    "PodEvent",
    "PodHeartbeat",
    "PodRegister",
    "Reason",
    "ReleaseRequest",
    "Reply",
    "ReplyKind",
    "Request",
    "RequestKind",
    "Status",
    "decode_pod_event",
    "decode_reply",
    "decode_request",
    "encode",
    "request_kind",
]
