"""Capped exponential backoff with full jitter: the one reconnect delay of the appliance.

Used by every layer that reconnects (acquisition's device links, the MQTT uplink, and the
uplink's pause after an MQTT 5 "quota exceeded"). Full jitter (AWS Architecture Blog,
"Exponential Backoff And Jitter") spreads the attempts of many peers that failed together over
the whole window, so a cell of machines that lost power together, or a fleet of appliances after
a broker restart, does not reconnect in lockstep.
"""

from __future__ import annotations


def backoff_delay_s(attempt: int, base_s: float, cap_s: float, u: float) -> float:
    """Seconds to wait before retry ``attempt + 1`` (``attempt`` 0-based: failures so far).

    ``u * min(cap_s, base_s * 2**attempt)``: the window doubles from ``base_s`` per attempt and
    is capped at ``cap_s``; ``u`` is a uniform random number in [0, 1) (the caller's ``rng()``,
    a seam for tests).
    """
    return u * min(cap_s, base_s * 2.0 ** min(attempt, 32))
