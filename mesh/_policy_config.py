"""The declaration of a named API policy: ``[policies.<name>]`` in an agent config.

A policy is one target's limits (a rate in requests per second with a burst, a concurrency and a
daily quota) shared by every agent and replica that names it (``policy = "<name>"`` on a REST
sink or a System API REST operation). See README "Shared rate limits and quotas (API policy)".
"""

from __future__ import annotations

import zoneinfo
from typing import Annotated

import msgspec

from mesh._config_base import ConfigStruct, PositiveFloat, PositiveInt

__all__ = ["PolicyConfig"]


class PolicyConfig(ConfigStruct, frozen=True):
    """One policy. Every agent naming it should declare the same numbers: the coordinator
    keeps the first declaration it hears of per leader term (a control-plane restart re-reads)."""

    rate: PositiveFloat
    """Requests per second, across every agent and replica that names the policy."""
    burst: PositiveInt | None = None
    """Requests allowed at once above the rate (default: ``rate`` rounded up)."""
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    """Requests in flight at once across the callers; each active caller gets an equal part
    (at least 1)."""
    daily_quota: PositiveInt | None = None
    """Requests per calendar day (in ``timezone``) across the callers; none: no quota."""
    timezone: str = "UTC"
    """IANA time zone whose midnight resets the daily quota."""
    local_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.25
    """When the coordinator cannot be reached, each caller goes on alone at
    ``rate * local_share`` (and ``burst * local_share``, at least 1) until it answers again."""

    def __post_init__(self) -> None:
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone {self.timezone!r} is not an IANA time zone (e.g. 'Europe/London')"
            ) from None

    @property
    def effective_burst(self) -> int:
        """``burst``, or ``rate`` rounded up (at least 1)."""
        return self.burst if self.burst is not None else max(1, -int(-self.rate // 1))
