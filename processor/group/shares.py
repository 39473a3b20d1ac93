"""How the group's desired size is split across the live hosts: the same answer on every host.

Hosts are sorted by id. Without ceilings, host ``i`` (from 0) of ``H`` runs
``desired // H + (1 if i < desired % H else 0)``. A host's ceiling (``MAX_CONSUMERS``) caps
its share; what it cannot take goes to the hosts below their ceiling, the same way, until
everything is placed or every host is full (the rest is the shortfall). Every
host computes this from the same registry, so no leader is needed: hosts that briefly see
different registries (a join, an expiry) agree again at their next beat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    shares: dict[str, int]  # host id -> consumers it runs
    shortfall: int  # consumers desired that no host may run


def split(desired: int, ceilings: Mapping[str, int]) -> Split:
    """Shares of ``desired`` consumers over the hosts in ``ceilings`` (host id -> ceiling).

    Dealt one at a time, round after round, to the hosts in id order, skipping full hosts:
    without ceilings that is exactly the formula above, and with them any two hosts below
    their ceiling differ by at most one.
    """
    shares = {host: 0 for host in sorted(ceilings)}
    left = desired
    while left > 0:
        open_hosts = [host for host in shares if shares[host] < ceilings[host]]
        if not open_hosts:
            break
        for host in open_hosts[:left]:
            shares[host] += 1
        left -= min(left, len(open_hosts))
    return Split(shares, left)
