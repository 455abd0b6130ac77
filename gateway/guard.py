"""The webhook checks of :mod:`gateway.security`, configured from the settings.

:class:`Guard` answers each step with ``None`` (go on) or a :class:`Refusal`
(the status, message and headers of the answer); the handlers call the
steps in order. Refusals are counted in ``tierpool_http_refused_total`` by
reason and logged at most once a second per reason, naming the source and
the path, never a token or a signature.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Final, Literal

from starlette.types import Scope

from tierpool.core.settings import Settings
from tierpool.gateway import metrics, security

log = logging.getLogger(__name__)

Provider = Literal["twilio", "plivo", "exotel"]
FORM: Final = "application/x-www-form-urlencoded"
LOG_EVERY_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str
    reason: str
    headers: dict[str, str] = field(default_factory=dict)


class Guard:
    """Source allow-list, budgets, signatures and basic auth for the webhooks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.trusted = security.networks(settings.gateway_trusted_proxies)
        self.allow_from = security.networks(settings.gateway_allow_from)
        self.by_source = security.Budget(
            settings.gateway_source_rate, settings.gateway_source_burst
        )
        self.by_merchant = security.Budget(
            settings.gateway_merchant_rate, settings.gateway_merchant_burst
        )
        self._logged: dict[str, float] = {}

    def warnings(self) -> list[str]:
        """What is open to anyone who finds the URL: said once at start."""
        out = []
        s = self.settings
        if not s.twilio_auth_token:
            out.append(
                "TWILIO_AUTH_TOKEN is not set: /api/v1/twilio/allocate accepts unsigned "
                "requests (anyone who finds the URL can take pods)"
            )
        if not s.plivo_auth_token:
            out.append(
                "PLIVO_AUTH_TOKEN is not set: /api/v1/plivo/allocate accepts unsigned "
                "requests (anyone who finds the URL can take pods)"
            )
        if not s.exotel_basic_auth and not s.gateway_allow_from:
            out.append(
                "neither EXOTEL_BASIC_AUTH nor GATEWAY_ALLOW_FROM is set: "
                "/api/v1/exotel/allocate is unauthenticated"
            )
        return out

    # --- the steps -------------------------------------------------------------------
    def source_of(self, scope: Scope) -> str:
        addr = security.source(scope, self.trusted)
        return str(addr) if addr is not None else "unknown"

    def admit(self, scope: Scope, source: str) -> Refusal | None:
        """Before the body is read: the allow-list, then the source's budget."""
        if self.allow_from and not security.in_networks(
            security.source(scope, self.trusted), self.allow_from
        ):
            return self._refuse(scope, source, Refusal(403, "source not allowed", "allow_from"))
        wait = self.by_source.take(source)
        if wait > 0:
            return self._refuse(
                scope,
                source,
                Refusal(
                    429,
                    "too many requests",
                    "source_budget",
                    {"Retry-After": security.retry_after(wait)},
                ),
            )
        return None

    def verify(
        self, scope: Scope, source: str, provider: Provider, body: bytes, content_type: str
    ) -> Refusal | None:
        """The provider's own proof that the request is theirs, when a secret is set."""
        s = self.settings
        form = content_type.split(";", 1)[0].strip().lower() == FORM
        if provider == "twilio" and s.twilio_auth_token:
            url = security.public_url(scope, s.gateway_public_url, self.trusted)
            params = security.form_params(body) if form else {}
            signature = security.header(scope, b"x-twilio-signature")
            if not security.twilio_valid(s.twilio_auth_token, url, params, body, signature):
                return self._refuse(scope, source, Refusal(403, "invalid signature", "signature"))
        elif provider == "plivo" and s.plivo_auth_token:
            url = security.public_url(scope, s.gateway_public_url, self.trusted)
            params = security.form_params(body) if form else {}
            if not security.plivo_valid(
                s.plivo_auth_token,
                url,
                params,
                security.header(scope, b"x-plivo-signature-v3-nonce"),
                security.header(scope, b"x-plivo-signature-v3"),
            ):
                return self._refuse(scope, source, Refusal(403, "invalid signature", "signature"))
        elif (
            provider == "exotel"
            and s.exotel_basic_auth
            and not security.basic_auth_valid(
                s.exotel_basic_auth, security.header(scope, b"authorization")
            )
        ):
            return self._refuse(
                scope,
                source,
                Refusal(
                    401,
                    "authentication required",
                    "basic_auth",
                    {"WWW-Authenticate": 'Basic realm="tierpool"'},
                ),
            )
        return None

    def merchant(self, scope: Scope, source: str, merchant: str) -> Refusal | None:
        """The merchant's budget, once the request names one."""
        wait = self.by_merchant.take(merchant or "-")
        if wait > 0:
            return self._refuse(
                scope,
                source,
                Refusal(
                    429,
                    "too many requests",
                    "merchant_budget",
                    {"Retry-After": security.retry_after(wait)},
                ),
            )
        return None

    def _refuse(self, scope: Scope, source: str, refusal: Refusal) -> Refusal:
        metrics.refused.labels(refusal.reason).inc()
        now = time.monotonic()
        if now - self._logged.get(refusal.reason, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[refusal.reason] = now
            log.warning(
                "webhook refused: %s",
                refusal.message,
                extra={"reason": refusal.reason, "source": source, "path": scope["path"]},
            )
        return refusal
