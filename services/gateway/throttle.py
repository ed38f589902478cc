"""Request limits: wrong API keys per client address, requests and a daily quota per API key.

Counted with `limits` (fixed windows) in Redis in services mode, so every gateway process shares one
count, and in process memory in embedded mode. A limiter that cannot reach Redis lets requests through
(and logs it): a counting outage must not take the API down with it.
"""

from __future__ import annotations

import logging
import math
import time

from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter

from shared.core.errors import XrayqError
from shared.core.settings import Settings

log = logging.getLogger(__name__)


class RequestLimits:
    def __init__(self, settings: Settings) -> None:
        self._limiter = FixedWindowRateLimiter(_storage(settings))
        self._failures = _per_minute(settings.auth_failures_per_minute)
        self._per_key = _per_minute(settings.rate_limit_per_key)
        self._daily = RateLimitItemPerDay(settings.daily_quota_per_key) if settings.daily_quota_per_key else None

    async def failed_authentication_wait(self, address: str) -> XrayqError | None:
        """A 429 for an address that failed to authenticate too often lately; None: it may try a key."""
        if self._failures is None or await self._counts(self._failures, "auth-failures", address, hit=False):
            return None
        return await self._refusal(
            self._failures,
            ("auth-failures", address),
            "too_many_failed_authentications",
            "Too many requests with a wrong API key from this address.",
        )

    async def record_failed_authentication(self, address: str) -> None:
        if self._failures is not None:
            await self._counts(self._failures, "auth-failures", address, hit=True)

    async def admit(self, key: str, changes_state: bool) -> XrayqError | None:
        """Counts one request of `key`; a 429 once it is over its rate or (for a change) its daily quota."""
        if self._per_key is not None and not await self._counts(self._per_key, "key", key, hit=True):
            return await self._refusal(
                self._per_key, ("key", key), "rate_limited", "This API key sent too many requests; slow down."
            )
        if changes_state and self._daily is not None and not await self._counts(self._daily, "quota", key, hit=True):
            return await self._refusal(
                self._daily, ("quota", key), "quota_exceeded", "This API key has used its daily quota of submissions."
            )
        return None

    async def _counts(self, item: RateLimitItem, kind: str, identity: str, *, hit: bool) -> bool:
        """True while `identity` is within `item` (after counting this request when `hit`)."""
        try:
            if hit:
                return await self._limiter.hit(item, kind, identity)
            return await self._limiter.test(item, kind, identity)
        except Exception:
            log.warning("request limits unavailable; letting the request through", exc_info=True)
            return True

    async def _refusal(self, item: RateLimitItem, identifiers: tuple[str, str], code: str, detail: str) -> XrayqError:
        try:
            reset_at = (await self._limiter.get_window_stats(item, *identifiers)).reset_time
        except Exception:
            reset_at = time.time() + item.get_expiry()
        return XrayqError(code, detail, retry_after_s=max(1, math.ceil(reset_at - time.time())))


def _per_minute(amount: int) -> RateLimitItem | None:
    return RateLimitItemPerMinute(amount) if amount else None


def _storage(settings: Settings) -> Storage:
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisStorage(
            settings.broker_url, implementation="redispy", key_prefix=f"{settings.broker_key_prefix}xrayq-limits"
        )
    return MemoryStorage()
