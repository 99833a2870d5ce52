"""The risk matrix (custody-domain §6.3): level = band(likelihood x impact), raised to a floor.

Score = L (1-5) x I (1-5): 1-4 GREEN, 5-9 YELLOW, 10-15 ORANGE, 16-25 RED. Some findings carry
a floor that overrides the score (chain or statement integrity, an uncured shortfall, repeated
segregation attempts: always RED). Impact scales are integers in minor units and counts.
"""

from __future__ import annotations

from typing import Final

LEVELS: Final = ("GREEN", "YELLOW", "ORANGE", "RED")
RANK: Final = {level: i for i, level in enumerate(LEVELS)}

# regulatory severity (an impact indicator)
SEVERITY_INTERNAL: Final = 2
SEVERITY_REPORTABLE: Final = 4  # LVT/STR late, disclosure miss
SEVERITY_SEGREGATION: Final = 5  # segregation, shortfall, tampering


def band(score: int) -> str:
    if not 1 <= score <= 25:
        raise ValueError("a score is 1..25")
    if score <= 4:
        return "GREEN"
    if score <= 9:
        return "YELLOW"
    if score <= 15:
        return "ORANGE"
    return "RED"


def level(likelihood: int, impact: int, floor: str = "GREEN") -> str:
    """The level of a finding: the matrix band, never below `floor`."""
    if not (1 <= likelihood <= 5 and 1 <= impact <= 5):
        raise ValueError("likelihood and impact are 1..5")
    found = band(likelihood * impact)
    return found if RANK[found] >= RANK[floor] else floor


def amount_impact(amount_minor: int, custody_minor: int = 0) -> int:
    """Amount at risk: < 1,000,000 -> 1; < 10^7 -> 2; < 10^8 -> 3; < 10^9 -> 4; else (or >= 1 %
    of the custody balance) -> 5."""
    if custody_minor > 0 and amount_minor * 100 >= custody_minor:
        return 5
    for impact, bound in enumerate((1_000_000, 10_000_000, 100_000_000, 1_000_000_000), 1):
        if amount_minor < bound:
            return impact
    return 5


def customers_impact(count: int) -> int:
    """Customers affected: 1 -> 1; <= 10 -> 2; <= 100 -> 3; <= 1,000 -> 4; more -> 5."""
    if count <= 1:
        return 1
    for impact, bound in enumerate((10, 100, 1000), 2):
        if count <= bound:
            return impact
    return 5


def highest(*levels: str) -> str:
    return max(levels, key=RANK.__getitem__) if levels else "GREEN"
