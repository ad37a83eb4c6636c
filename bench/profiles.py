"""Named bandwidth profiles for the namespace swarm (``bench/netem.py``, ``bench/swarm.py``).

A profile lists one :class:`Link` per peer (download / upload Mbit/s); peer ``i`` gets
``links[i % len(links)]``, so a profile of four links describes any number of peers. Links are
shaped with ``tc ... tbf`` only (no ``netem`` on this kernel): the rates are real, the round-trip
time is the host's (~0.1 ms), and a full queue drops packets after ``queue_ms``.

=================  ==============================================================================
``uniform-100``    every peer 100 / 100 Mbit/s (a good office or datacenter-ish link)
``uniform-20``     every peer 20 / 20 Mbit/s (a modest symmetric home fibre link)
``volunteer``      200/50, 50/10, 50/10, 20/5 Mbit/s down/up, cycled: asymmetric home uplinks
=================  ==============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INFRA_LINK", "PROFILES", "Link", "Profile", "get_profile"]


@dataclass(frozen=True)
class Link:
    """One peer's access link.

    Attributes:
        down_mbit: download rate (the switch side of the veth sends at this rate), Mbit/s.
        up_mbit: upload rate (the peer side of the veth sends at this rate), Mbit/s.
    """

    down_mbit: float
    up_mbit: float

    def __post_init__(self) -> None:
        for name, value in (("down_mbit", self.down_mbit), ("up_mbit", self.up_mbit)):
            if not 0.01 <= value <= 100_000:
                raise ValueError(f"Link.{name} must be in [0.01, 100000] Mbit/s, got {value}")


@dataclass(frozen=True)
class Profile:
    """A named set of peer links.

    Attributes:
        name: what ``--profile`` calls it.
        description: one line for tables and RESULTS.md.
        links: peer ``i`` gets ``links[i % len(links)]``.
        queue_ms: tbf ``latency``: the longest a packet may wait in a shaper's queue before it is
            dropped (the queue holds ``rate × queue_ms`` bytes).
    """

    name: str
    description: str
    links: tuple[Link, ...]
    queue_ms: float = 50.0

    def __post_init__(self) -> None:
        if not self.links:
            raise ValueError(f"profile {self.name!r} needs at least one link")
        if not 1.0 <= self.queue_ms <= 10_000.0:
            raise ValueError(f"profile {self.name!r}: queue_ms must be in [1, 10000], got {self.queue_ms}")

    def link(self, peer: int) -> Link:
        """The link of peer ``peer`` (0-based)."""
        if peer < 0:
            raise ValueError(f"peer index must be >= 0, got {peer}")
        return self.links[peer % len(self.links)]


#: The bootstrap DHT node's link: infrastructure, not a volunteer; fast enough never to matter.
INFRA_LINK = Link(down_mbit=1000.0, up_mbit=1000.0)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("uniform-100", "every peer 100/100 Mbit/s down/up", (Link(100, 100),)),
        Profile("uniform-20", "every peer 20/20 Mbit/s down/up", (Link(20, 20),)),
        Profile(
            "volunteer",
            "200/50, 50/10, 50/10, 20/5 Mbit/s down/up, cycled over the peers",
            (Link(200, 50), Link(50, 10), Link(50, 10), Link(20, 5)),
        ),
    )
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; the error lists the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
