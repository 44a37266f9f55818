"""What a create asks for, validated against the operator's caps before anything is touched."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import secrets
import string

from .errors import InvalidSpec

_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_RE = re.compile(r"[a-z0-9]{8,32}")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# E2B's defaults.
DEFAULT_CPU = 1
DEFAULT_MEMORY_MB = 512
DEFAULT_DISK_MB = 1024
DEFAULT_PIDS = 1024
DEFAULT_TIMEOUT_S = 300

MIN_MEMORY_MB = 32
MIN_DISK_MB = 16


def new_sandbox_id() -> str:
    """A fresh id in E2B's shape: 20 lowercase letters and digits."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def is_sandbox_id(text: object) -> bool:
    """Whether ``text`` has the shape of an id bilik makes: 8-32 of ``[a-z0-9]`` (ASCII only,
    nothing else, not even a trailing newline). Every id from outside passes here before it
    names a file, a lock or a route: such an id is safe as one path component."""
    return isinstance(text, str) and _ID_RE.fullmatch(text) is not None


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox."""

    cpu: float = DEFAULT_CPU
    memory_mb: int = DEFAULT_MEMORY_MB
    disk_mb: int = DEFAULT_DISK_MB
    pids: int = DEFAULT_PIDS


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    """Everything a create needs. ``validate`` raises :class:`InvalidSpec` on nonsense."""

    template: str = "base"
    limits: Limits = dataclasses.field(default_factory=Limits)
    timeout_s: float = DEFAULT_TIMEOUT_S
    internet: bool = True
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    sandbox_id: str | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # What envd asks of every client but for health and files (none: it asks nothing).
    access_token: str = ""
    # Egress rules beyond internet on/off: addresses and CIDRs (and, to allow, domain names)
    # this sandbox may or may not reach. An allow wins over a deny and over internet off.
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()
    # Made ahead for the warm pool: no one's until ``LocalRuntime.hand_over`` gives it to a
    # create, and unreachable through the sandbox plane until then.
    pooled: bool = False

    def validate(
        self,
        *,
        max_cpu: int,
        max_memory_mb: int,
        max_disk_mb: int,
        max_pids: int,
        max_lifetime_s: int,
    ) -> None:
        lim = self.limits
        _check_range("cpu", lim.cpu, 0.1, max_cpu)
        _check_range("memory_mb", lim.memory_mb, MIN_MEMORY_MB, max_memory_mb)
        _check_range("disk_mb", lim.disk_mb, MIN_DISK_MB, max_disk_mb)
        _check_range("pids", lim.pids, 16, max_pids)
        _check_range("timeout", self.timeout_s, 0, max_lifetime_s)
        if self.sandbox_id is not None and not is_sandbox_id(self.sandbox_id):
            raise InvalidSpec(f"sandbox id {self.sandbox_id!r} must be 8-32 of [a-z0-9]")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$", self.template):
            raise InvalidSpec(f"template name {self.template!r} is not valid")
        for rules, domains_ok in ((self.allow_out, True), (self.deny_out, False)):
            if len(rules) > MAX_EGRESS_RULES:
                raise InvalidSpec(f"at most {MAX_EGRESS_RULES} egress rules of each kind")
            for rule in rules:
                egress_rule(rule, domains_ok=domains_ok)
        for name, value in self.env.items():
            if not _ENV_NAME_RE.match(name):
                raise InvalidSpec(f"environment variable name {name!r} is not valid")
            if "\0" in value:
                raise InvalidSpec(f"environment variable {name!r} contains a NUL byte")


MAX_EGRESS_RULES = 100
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
# A name, or "*." and a name (its subdomains).
_DOMAIN_RE = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")


def egress_rule(rule: object, *, domains_ok: bool) -> tuple[str, str]:
    """``("cidr", "a.b.c.d/n")`` or ``("domain", "name")`` for one allow or deny entry."""
    if not isinstance(rule, str) or not rule:
        raise InvalidSpec(f"egress rule {rule!r} must be an address, a CIDR or a domain name")
    try:
        network = ipaddress.ip_network(rule, strict=False)
    except ValueError:
        network = None
    if network is None:
        name = rule.lower().rstrip(".")
        if not domains_ok:
            raise InvalidSpec(f"deny rules take addresses and CIDRs only, not {rule!r}")
        if len(name) > 253 or not _DOMAIN_RE.match(name):
            raise InvalidSpec(f"egress rule {rule!r} is not an address, CIDR or domain name")
        return "domain", name
    if network.version != 4:
        raise InvalidSpec(f"egress rule {rule!r}: sandboxes have no IPv6 to filter")
    return "cidr", str(network)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidSpec(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidSpec(f"{name} must be between {low:g} and {high:g}, got {value:g}")
