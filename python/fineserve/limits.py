"""Open-files and ephemeral-port limits: raised where allowed, stated, and checked against
the connections a run plans to hold."""

from __future__ import annotations

from . import _engine


def connection_limits(connections_per_endpoint: int, n_sources: int, mock: bool) -> list[str]:
    """Raises the open-files limit; returns a line stating the limits, plus a warning for
    each one that the planned connections (warm connections or the concurrency cap, per
    endpoint) would exceed. ``mock``: the in-process mock holds the other end of each
    connection, which doubles the descriptors."""
    before, after = _engine.raise_open_files_limit()
    files = f"open files: limit {after}" + (f" (raised from {before})" if after > before else "")
    lines = [files]
    ports = _engine.ephemeral_port_range()
    per_source = 0
    if ports is not None:
        per_source = ports[1] - ports[0] + 1
        lines[0] += (
            f"; ephemeral ports {ports[0]}-{ports[1]} "
            f"({per_source} connections per source address and server)"
        )
    needed_files = connections_per_endpoint * (2 if mock else 1)
    if after and needed_files > after:
        lines.append(
            f"warning: {needed_files} descriptors planned, more than the open-files limit "
            f"{after}; raise `ulimit -n` (hard limit) or connections will fail"
        )
    if per_source and connections_per_endpoint > per_source * max(n_sources, 1):
        lines.append(
            f"warning: {connections_per_endpoint} connections per server planned, more than "
            f"{per_source} ephemeral ports × {max(n_sources, 1)} source address(es); "
            "widen net.ipv4.ip_local_port_range or add --source-ip addresses"
        )
    return lines
