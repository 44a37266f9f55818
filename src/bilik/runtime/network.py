"""Sandbox networking: one network namespace per sandbox, a veth to a host bridge, NAT for egress.

The host side is one bridge per bilik instance with the gateway address, and one nftables table
that always refuses traffic from sandboxes to the host itself (but for DNS on the gateway, see
``dns``), to other sandboxes, to link-local and to private ranges, and all traffic of sandboxes
whose internet is off. Bridge ports are isolated, so sandboxes cannot reach each other even at
layer 2.

Namespaces are made with unshare in a worker thread and configured over netlink (pyroute2),
without spawning ``ip``: that costs ~45 ms per sandbox.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyroute2 import IPRoute

from . import syscalls
from .errors import StepFailed
from .fsutil import file_lock

# Never reachable from a sandbox, whatever else is allowed.
BLOCKED_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
)


def veth_name(sandbox_id: str) -> str:
    """Host-side veth name: ``bk`` + a hash, within the 15 bytes Linux allows."""
    return "bk" + hashlib.sha1(sandbox_id.encode()).hexdigest()[:11]


class HostNetwork:
    """The host side of sandbox networking for one bilik instance."""

    def __init__(self, instance: str, subnet: str) -> None:
        self.instance = instance
        self.bridge = f"{instance}0"
        self.network = ipaddress.IPv4Network(subnet)
        self.gateway = next(self.network.hosts())
        self.table = instance
        # Namespaces are pinned under bilik's own run directory, not /run/netns: `ip netns`
        # bind-mounts that directory onto itself, which hides pins made before it and leaves
        # them impossible to remove.
        self.netns_dir = Path("/run") / instance / "netns"

    def netns_path(self, sandbox_id: str) -> Path:
        return self.netns_dir / sandbox_id

    # -- host setup ---------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the bridge and load the rules (idempotent; called at every start)."""
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        with _iproute() as ipr:
            # Checked before anything is made, so a clash changes nothing on the host.
            for addr in ipr.get_addr(family=2):
                cidr = f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}"
                owner = addr.get_attr("IFA_LABEL")
                if owner != self.bridge and self.network.overlaps(
                    ipaddress.IPv4Network(cidr, strict=False)
                ):
                    raise StepFailed(
                        "setup-network",
                        f"subnet {self.network} overlaps {cidr} on {owner};"
                        " choose another with BILIK_SUBNET",
                    )
            if not ipr.link_lookup(ifname=self.bridge):
                ipr.link("add", ifname=self.bridge, kind="bridge")
            idx = ipr.link_lookup(ifname=self.bridge)[0]
            addrs = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
            if str(self.gateway) not in addrs:
                ipr.addr(
                    "add", index=idx, address=str(self.gateway), prefixlen=self.network.prefixlen
                )
            ipr.link("set", index=idx, state="up")
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{self.bridge}/disable_ipv6").write_text("1")
        with self._rules_lock():
            self._load_rules()

    def _rules_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held while the offline set is read or changed, by any bilik process of the instance:
        a reload must not lose an address another process adds meanwhile."""
        return file_lock(self.netns_dir.parent / "locks" / "nftables")

    def _load_rules(self) -> None:
        br, net = self.bridge, str(self.network)
        blocked = ", ".join(BLOCKED_V4)
        # Declaring the table first makes the delete valid when it does not exist yet, so the whole
        # file replaces the table atomically. The sets' elements (the sandboxes' own rules)
        # survive through re-adding.
        kept = {name: self._elements(name) for name in PER_SANDBOX_SETS}

        def elements(name: str) -> str:
            return f"elements = {{ {', '.join(kept[name])} }};" if kept[name] else ""

        rules = f"""
table inet {self.table} {{}}
delete table inet {self.table}
table inet {self.table} {{
  set blocked4 {{ type ipv4_addr; flags interval; elements = {{ {blocked} }}; }}
  # sandboxes with internet off
  set offline4 {{ type ipv4_addr; {elements("offline4")} }}
  # sandboxes that may ask DNS even so (they allow some domains)
  set dns4 {{ type ipv4_addr; {elements("dns4")} }}
  # sandbox . destination: allowed (wins over internet off and denies), denied
  set allow4 {{ type ipv4_addr . ipv4_addr; flags interval; {elements("allow4")} }}
  set deny4 {{ type ipv4_addr . ipv4_addr; flags interval; {elements("deny4")} }}
  # sandbox . address its DNS answered for an allowed domain, for the answer's lifetime
  set learned4 {{ type ipv4_addr . ipv4_addr; flags timeout; {elements("learned4")} }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname "{br}" ct state established,related accept
    # Segments conntrack cannot place (stray ones of a connection already gone, say) are
    # dropped quietly rather than answered.
    iifname "{br}" ct state invalid drop
    iifname "{br}" ip saddr @dns4 ip daddr {self.gateway} udp dport 53 accept
    iifname "{br}" ip saddr @dns4 ip daddr {self.gateway} tcp dport 53 accept
    iifname "{br}" ip saddr @offline4 reject with icmp type admin-prohibited
    iifname "{br}" ip daddr {self.gateway} udp dport 53 accept
    iifname "{br}" ip daddr {self.gateway} tcp dport 53 accept
    iifname "{br}" reject with icmp type admin-prohibited;
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{br}" oifname "{br}" drop
    iifname "{br}" ip daddr @blocked4 reject with icmp type admin-prohibited
    iifname "{br}" meta nfproto ipv6 drop
    # A connection allowed when it began stays allowed (a learned address may expire meanwhile).
    iifname "{br}" ct state established,related accept
    iifname "{br}" ip saddr . ip daddr @allow4 accept
    iifname "{br}" ip saddr . ip daddr @learned4 accept
    iifname "{br}" ip saddr @offline4 reject with icmp type admin-prohibited
    iifname "{br}" ip saddr . ip daddr @deny4 reject with icmp type admin-prohibited
    iifname "{br}" accept
    oifname "{br}" ct state established,related accept
    oifname "{br}" drop;
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {net} oifname != "{br}" masquerade;
  }}
}}
"""
        _nft(rules)

    def _elements(self, name: str) -> list[str]:
        """The elements of one of the table's sets, as nft writes them (none: no table yet)."""
        try:
            out = json.loads(_nft_capture(f"-j list set inet {self.table} {name}"))
        except StepFailed as e:
            if "No such file or directory" in e.detail:
                return []
            raise
        found = []
        for item in out["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                timeout = ""
                if isinstance(element, dict) and "elem" in element:
                    timeout = f" timeout {max(1, element['elem'].get('expires', 1))}s"
                    element = element["elem"]["val"]
                found.append(_element_text(element) + timeout)
        return found

    def offline_addresses(self) -> list[str]:
        return self._elements("offline4")

    def teardown(self) -> None:
        """Remove the bridge and the rules (used when an instance is removed, e.g. by tests)."""
        with contextlib.suppress(StepFailed):
            _nft(f"table inet {self.table} {{}}\ndelete table inet {self.table}\n")
        with _iproute() as ipr:
            for idx in ipr.link_lookup(ifname=self.bridge):
                ipr.link("del", index=idx)

    # -- per sandbox --------------------------------------------------------------------------

    def address(self, index: int) -> str:
        """The sandbox address with allocation index ``index`` (0: the first after the gateway)."""
        addr = self.network.network_address + 2 + index
        if addr >= self.network.broadcast_address:
            raise StepFailed("allocate-address", f"subnet {self.network} is full")
        return str(addr)

    def is_sandbox_address(self, address: str) -> bool:
        """Whether ``address`` is one a sandbox of the instance may have (in the subnet; not
        the gateway, the network's or its broadcast address)."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        reserved = (self.gateway, self.network.network_address, self.network.broadcast_address)
        return ip in self.network and ip not in reserved

    def create(self, sandbox_id: str, address: str, internet: bool) -> Path:
        """Make the sandbox's namespace, plug it into the bridge and give it ``address``."""
        path = self.netns_path(sandbox_id)
        veth = veth_name(sandbox_id)
        try:
            inner = _new_netns(path)
            try:
                with _iproute() as ipr:
                    ipr.link(
                        "add",
                        ifname=veth,
                        kind="veth",
                        peer={"ifname": "eth0", "net_ns_fd": str(path)},
                    )
                    idx = ipr.link_lookup(ifname=veth)[0]
                    bridge = ipr.link_lookup(ifname=self.bridge)[0]
                    ipr.link("set", index=idx, master=bridge)
                    ipr.brport("set", index=idx, isolated=1)
                    ipr.link("set", index=idx, state="up")
                    _forget_neighbour(ipr, address, bridge)
                lo = inner.link_lookup(ifname="lo")[0]
                eth0 = inner.link_lookup(ifname="eth0")[0]
                inner.link("set", index=lo, state="up")
                inner.addr("add", index=eth0, address=address, prefixlen=self.network.prefixlen)
                inner.link("set", index=eth0, state="up")
                inner.route("add", dst="0.0.0.0/0", gateway=str(self.gateway))
            finally:
                inner.close()
            if not internet:
                self.set_internet(address, False)
        except Exception as e:
            self.delete(sandbox_id, address)
            raise StepFailed("setup-network", str(e)) from e
        return path

    def set_internet(self, address: str, on: bool) -> None:
        """Turn a sandbox's internet on or off. Turning it off fails loudly (it must never fail
        open); turning it on for an address that is not off is not an error."""
        with self._rules_lock():
            if not on:
                _nft(f"add element inet {self.table} offline4 {{ {address} }}\n")
            elif address in self.offline_addresses():
                _nft(f"delete element inet {self.table} offline4 {{ {address} }}\n")

    def set_egress(
        self, address: str, allow: list[str], deny: list[str], domains: bool, *, on: bool
    ) -> None:
        """Add (or remove) a sandbox's own allow and deny CIDRs; ``domains``: it allows some
        domain names, so may ask DNS even with internet off. Adding fails loudly."""
        parts = [
            f"{'add' if on else 'delete'} element inet {self.table} {name} {{ {items} }}\n"
            for name, items in (
                ("allow4", ", ".join(f"{address} . {c}" for c in allow)),
                ("deny4", ", ".join(f"{address} . {c}" for c in deny)),
                ("dns4", address if domains else ""),
            )
            if items
        ]
        if not parts:
            return
        with self._rules_lock():
            if on:
                _nft("".join(parts))
            else:
                for part in parts:  # each independently: what is already gone is no error
                    with contextlib.suppress(StepFailed):
                        _nft(part)
                learned = [e for e in self._elements("learned4") if e.startswith(f"{address} .")]
                if learned:
                    items = ", ".join(e.split(" timeout")[0] for e in learned)
                    with contextlib.suppress(StepFailed):
                        _nft(f"delete element inet {self.table} learned4 {{ {items} }}\n")

    def learn(self, address: str, destinations: list[str], ttl_s: int) -> None:
        """Let the sandbox at ``address`` reach ``destinations`` (the answer of a DNS query for
        a domain it allows) for ``ttl_s`` seconds."""
        items = ", ".join(f"{address} . {d} timeout {ttl_s}s" for d in destinations)
        if items:
            _nft(f"add element inet {self.table} learned4 {{ {items} }}\n")

    def delete(self, sandbox_id: str, address: str | None) -> None:
        """Release everything ``create`` made; safe to call on a half-made or missing sandbox."""
        path = self.netns_path(sandbox_id)
        if address:
            self.set_internet(address, True)
        with _iproute() as ipr:
            for idx in ipr.link_lookup(ifname=veth_name(sandbox_id)):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=idx)
            if address:
                for bridge in ipr.link_lookup(ifname=self.bridge):
                    _forget_neighbour(ipr, address, bridge)
        syscalls.umount(str(path))
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def leftover_ids(self) -> list[str]:
        """Sandbox ids that still have a network namespace of this instance."""
        if not self.netns_dir.is_dir():
            return []
        return sorted(p.name for p in self.netns_dir.iterdir())


def _forget_neighbour(ipr: IPRoute, address: str, bridge: int) -> None:
    """Drop the host's ARP entry for ``address``: addresses pass from killed sandboxes to new
    ones, and until a stale entry (the old sandbox's MAC) expires, nothing reaches the new one."""
    with contextlib.suppress(Exception):  # (none is the usual case)
        ipr.neigh("del", dst=address, ifindex=bridge)


def _new_netns(path: Path) -> IPRoute:
    """Create a network namespace pinned at ``path`` and return a netlink socket inside it.

    unshare(CLONE_NEWNET) moves only the calling thread, so this runs in whatever worker thread
    called it and moves that thread back before returning. The socket keeps talking to the new
    namespace after the thread has left it.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        syscalls.unshare(syscalls.CLONE_NEWNET)
        try:
            syscalls.mount("/proc/thread-self/ns/net", str(path), None, syscalls.MS_BIND)
            # Per-namespace sysctls, written while this thread is inside the namespace.
            sysctl = Path("/proc/sys/net")
            (sysctl / "ipv6/conf/all/disable_ipv6").write_text("1")
            (sysctl / "ipv6/conf/default/disable_ipv6").write_text("1")
            # Root inside a sandbox has no capability over this namespace: let it bind low ports
            # and ping without CAP_NET_RAW.
            (sysctl / "ipv4/ip_unprivileged_port_start").write_text("0")
            (sysctl / "ipv4/ping_group_range").write_text("0 2147483647")
            return _iproute()
        finally:
            syscalls.setns(home, syscalls.CLONE_NEWNET)
    finally:
        os.close(home)


# Sets whose elements belong to sandboxes (kept when the table is reloaded).
PER_SANDBOX_SETS = ("offline4", "dns4", "allow4", "deny4", "learned4")


def _element_text(element: object) -> str:
    """One set element of ``nft -j`` output in nft's own syntax."""
    if isinstance(element, dict) and "concat" in element:
        return " . ".join(_element_text(part) for part in element["concat"])
    if isinstance(element, dict) and "prefix" in element:
        return f"{element['prefix']['addr']}/{element['prefix']['len']}"
    if isinstance(element, dict) and "range" in element:
        low, high = element["range"]
        return f"{low}-{high}"
    return str(element)


def _nft(script: str) -> None:
    proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StepFailed("nftables", proc.stderr.strip())


def _nft_capture(command: str) -> str:
    proc = subprocess.run(["nft", *command.split()], capture_output=True, text=True)
    if proc.returncode != 0:
        raise StepFailed("nftables", proc.stderr.strip())
    return proc.stdout


def _iproute() -> IPRoute:
    """A netlink socket. (pyroute2 loads on first use: a command that only reads the
    sandboxes' records starts without it.)"""
    from pyroute2 import IPRoute

    return IPRoute()
