"""Hosts made of Linux network namespaces, joined by one bridge, for multi-host tests.

Each host is a namespace with one veth whose peer is enslaved to a bridge that lives in a
namespace of its own (the "switch"): the addresses (10.213.0.0/24) exist only inside the
namespaces made here, so no packet reaches the test machine's own interfaces or any other
network. ``cut(host)`` downs the host's port on the switch; ``restore(host)`` brings it back.
``close()`` deletes every namespace (and with them their veths and the bridge).

Needs root (or CAP_NET_ADMIN) and the ``ip`` command (iproute2); ``netns_unavailable()`` says
why not when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

SUBNET = "10.213.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"butd-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` is not allowed here: {exc.stderr.strip()}"
    try:
        _ip("link", "add", f"p{probe[-6:]}a", "netns", probe, "type", "veth", "peer", "name", "b")
    except subprocess.CalledProcessError as exc:
        return f"veth pairs are not allowed here: {exc.stderr.strip()}"
    finally:
        _ip("netns", "del", probe)
    return None


@dataclass
class Hosts:
    """Namespaces as hosts on one switch; ``add(name)`` returns the host's address."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    addresses: dict[str, str] = field(default_factory=dict)
    _made: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.switch = f"butd-{self.tag}-sw"
        self._netns_add(self.switch)
        self._in(self.switch, "link", "add", "br0", "type", "bridge")
        self._in(self.switch, "link", "set", "br0", "up")

    def ns(self, host: str) -> str:
        """The namespace name of ``host``."""
        return f"butd-{self.tag}-{host}"

    def _netns_add(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        self._in(name, "link", "set", "lo", "up")

    def _in(self, ns: str, *args: str) -> None:
        _ip("-n", ns, *args)

    def add(self, host: str) -> str:
        """A new host on the switch; returns its IPv4 address."""
        ns, n = self.ns(host), len(self.addresses) + 1
        self._netns_add(ns)
        port = f"p{self.tag}{n}"  # the switch side (interface names are at most 15 chars)
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port)
        _ip("link", "set", port, "netns", self.switch)
        self._in(self.switch, "link", "set", port, "master", "br0", "up")
        address = f"{SUBNET}.{n}"
        self._in(ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self._in(ns, "link", "set", "eth0", "up")
        self.addresses[host] = address
        return address

    def _port(self, host: str) -> str:
        return f"p{self.tag}{list(self.addresses).index(host) + 1}"

    def cut(self, host: str) -> None:
        """Unplug ``host``: its switch port goes down (its processes keep running)."""
        self._in(self.switch, "link", "set", self._port(host), "down")

    def restore(self, host: str) -> None:
        """Plug ``host`` back in."""
        self._in(self.switch, "link", "set", self._port(host), "up")

    def exec_argv(self, host: str) -> tuple[str, ...]:
        """Prefix that runs a command on ``host``."""
        return ("ip", "netns", "exec", self.ns(host))

    def close(self) -> None:
        """Delete every namespace made (processes still inside must be stopped first)."""
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()
