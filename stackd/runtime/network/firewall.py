"""A stack's firewall: one nftables table per stack that keeps its services to their own bridge, their
gateway and (with `[network] outbound = true`) the way out through NAT; installed and removed in one
netlink transaction each, from plain data (a state record is enough after a SIGKILL).

    firewall = StackFirewall.for_network(network, outbound=stack.network.outbound)
    # write firewall.to_record() to the state record; create_network(...) (the bridge must exist); then:
    await install_firewall(firewall)           # idempotent: replaces the stack's table atomically
    ...
    await remove_firewall(firewall.bridge)     # idempotent; also from the record alone

The table, `inet stackd_<the bridge's 8 hex digits>` (`nft list table inet stackd_1a2b3c4d` shows it):

- chain `input` (filter, hook input): from the bridge, only IPv4 to the gateway address reaches the
  host. Without it a service reaches every address of the host (the kernel delivers a packet to any
  local address whatever interface it came in on), the host's eth0 address and the other stacks'
  gateways included.
- chain `forward` (filter, hook forward): nothing is routed into or out of the stack. The bridge's own
  `forwarding` 0 (bridge.py) already stops routing out of it, but the host's `ip_forward` turns every
  interface's `forwarding` on when it is set (an outbound stack sets it), so the rule is what keeps
  stacks apart. Traffic between the stack's own services is accepted first: with br_netfilter loaded
  (`bridge-nf-call-iptables` = 1) bridged packets pass this hook too, in and out on the bridge.
- with outbound: the forward chain accepts the stack's own addresses going out and the replies coming
  back (conntrack: established, related), and chain `postrouting` (nat, hook postrouting) masquerades
  the stack's subnet leaving through any other interface. A new connection into the stack is still
  dropped, so an outbound stack reaches other stacks no more than any other.

A drop in any table's base chain is final, so no other table's accept (an outbound stack's, or a
host firewall's) can open what this table closes.

Outbound also needs routing on: the host's `net.ipv4.ip_forward` (if it is 0) and the bridge's
`forwarding`. stackd turns `ip_forward` on only when it is off, and then records that it did in a table
of its own with no chain (`inet stackd_ip_forward`, costing packets nothing), in the same transaction
as the stack's table, before it writes the sysctl. When a stack's table is removed (or replaced by one
without outbound) and no stackd table with a `postrouting` chain is left, `ip_forward` goes back to
what the record says and the record goes. Why in the kernel and not in a file: the record must be
one per host, like the sysctl (every state root, every test's, sees the same one), survive the
supervisor's SIGKILL, and vanish with the sysctl's value at reboot; a table does all three.
Installs and removals on the host are serialised by an flock(2) on /proc/sys/net/ipv4/ip_forward
itself: the lock guards the sysctl and needs no file of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2.netlink.nfnetlink.nftsocket import AsyncNFTSocket

from stackd.errors import NetworkError
from stackd.runtime.network.addresses import gateway_of, parse_subnet
from stackd.runtime.network.names import NFT_TABLE_PREFIX, nft_table_name
from stackd.runtime.network.nft import (
    Chain,
    Rule,
    Table,
    accept,
    counter,
    ct_state,
    delete_table_message,
    describe_table,
    drop,
    dump_chains_message,
    dump_tables_message,
    get_table_message,
    iifname,
    ip_daddr,
    ip_saddr,
    masquerade,
    new_table_message,
    nfproto,
    nft_socket,
    oifname,
    query,
    replace_table_messages,
    transaction,
)
from stackd.runtime.network.rtnl import check
from stackd.runtime.network.stack import StackNetwork

__all__ = [
    "FORWARDING_RECORD",
    "StackFirewall",
    "bridged_traffic_warning",
    "firewall_table",
    "forward_dropping_chains",
    "install_firewall",
    "list_stackd_tables",
    "remove_firewall",
    "show_firewall",
]

#: The table that records that stackd turned the host's ip_forward on (and what it was before).
FORWARDING_RECORD = NFT_TABLE_PREFIX + "ip_forward"
#: The chain only an outbound stack's table has.
_OUTBOUND_CHAIN = "postrouting"
_IPV4_SYSCTL = Path("/proc/sys/net/ipv4")


@dataclass(frozen=True, slots=True)
class StackFirewall:
    """What a stack's firewall is made of: plain data, kept in the state record."""

    project: str
    bridge: str
    subnet: IPv4Network
    outbound: bool = False

    @classmethod
    def for_network(cls, network: StackNetwork, *, outbound: bool = False) -> StackFirewall:
        return cls(network.project, network.bridge, network.subnet, outbound)

    @property
    def table(self) -> str:
        """The name of the stack's table (family inet)."""
        return nft_table_name(self.bridge)

    @property
    def gateway(self) -> IPv4Address:
        return gateway_of(self.subnet)

    def to_record(self) -> dict[str, Any]:
        """The same keys as the network's record (StackNetwork.to_record), plus outbound."""
        return {"bridge": self.bridge, "subnet": str(self.subnet), "outbound": self.outbound}

    @classmethod
    def from_record(cls, project: str, record: Mapping[str, Any]) -> StackFirewall:
        """From `to_record()`'s keys; a network record with an `outbound` key does as well."""
        return cls(project, record["bridge"], parse_subnet(record["subnet"]), bool(record.get("outbound", False)))


def firewall_table(firewall: StackFirewall) -> Table:
    """The stack's table: what install_firewall sends (`.text` is what `nft list table` prints)."""
    bridge, subnet = firewall.bridge, firewall.subnet
    input_rules = (
        Rule(
            (iifname(bridge), ip_daddr(firewall.gateway, negate=True), counter(), drop()),
            "services reach the host only at their gateway",
        ),
        Rule((iifname(bridge), nfproto("ipv6"), counter(), drop()), "the stack has no IPv6"),
    )
    forward_rules = [Rule((iifname(bridge), oifname(bridge), accept()), "between the stack's own services")]
    if firewall.outbound:
        forward_rules.append(Rule((iifname(bridge), ip_saddr(subnet), accept()), "outbound"))
    forward_rules.append(Rule((iifname(bridge), counter(), drop()), "nothing else leaves the stack"))
    if firewall.outbound:
        forward_rules.append(Rule((oifname(bridge), ct_state("established", "related"), accept()), "replies"))
    forward_rules.append(Rule((oifname(bridge), counter(), drop()), "nothing else enters the stack"))
    chains = [
        Chain("input", "filter", "input", 0, input_rules),
        Chain("forward", "filter", "forward", 0, tuple(forward_rules)),
    ]
    if firewall.outbound:
        masq = Rule((ip_saddr(subnet), oifname(bridge, negate=True), masquerade()), "outbound")
        chains.append(Chain(_OUTBOUND_CHAIN, "nat", "postrouting", 100, (masq,)))
    comment = f"stackd project {firewall.project}" + (", outbound" if firewall.outbound else "")
    return Table(firewall.table, tuple(chains), comment)


async def install_firewall(firewall: StackFirewall) -> None:
    """Make the stack's table exactly `firewall_table(firewall)`, in one transaction: created, or
    replaced as a whole (never a moment without rules, never a rule twice).

    With outbound: the bridge must exist (its `forwarding` is set to 1 here; bridge.ensure_bridge sets
    it to 0, so call this after it); the host's ip_forward is turned on if it is off, and recorded.
    Without: the bridge's `forwarding` goes to 0 if the bridge exists, and ip_forward is given back if
    this was the last outbound stack."""
    if firewall.outbound and not _bridge_forwarding(firewall.bridge).exists():
        raise NetworkError(
            f"firewall {firewall.table}: bridge {firewall.bridge} does not exist (create the network first)"
        )
    table = firewall_table(firewall)
    async with _forwarding_lock(), nft_socket() as sock:
        messages = replace_table_messages(table)
        turn_on = firewall.outbound and _read_sysctl("ip_forward") != "1"
        if turn_on:
            record = new_table_message(FORWARDING_RECORD, comment=_forwarding_record_comment())
            messages.append((f"table {FORWARDING_RECORD}: add", record))
        what = f"firewall {table.name}: install"
        replies = await transaction(sock, [message for _, message in messages], what=what)
        check(replies, [f"{what}: {label}" for label, _ in messages])
        if turn_on:
            _write_sysctl("ip_forward", "1")  # every interface's forwarding follows, this bridge's too
        if firewall.outbound:
            _write_sysctl(f"conf/{firewall.bridge}/forwarding", "1")
        else:
            _write_bridge_forwarding_off(firewall.bridge)
            await _give_back_forwarding(sock)


async def remove_firewall(bridge: str) -> bool:
    """Remove the table of the stack whose bridge is `bridge`; False when there was none. Tolerates
    anything already gone, so it can run again and after a SIGKILL (the bridge's name from the state
    record is enough). Gives the host's ip_forward back when no outbound stack is left (see module doc).
    Shield it from cancellation, as every cleanup."""
    table = nft_table_name(bridge)
    async with _forwarding_lock(), nft_socket() as sock:
        (reply,) = await transaction(sock, [delete_table_message(table)], what=f"firewall {table}: remove")
        check([reply], [f"firewall {table}: remove"], ignore=[errno.ENOENT])
        _write_bridge_forwarding_off(bridge)
        await _give_back_forwarding(sock)
    return reply.error is None


async def list_stackd_tables() -> list[str]:
    """The names of stackd's nftables tables on the host (family inet), sorted: one per stack with a
    firewall, and FORWARDING_RECORD while stackd has ip_forward on."""
    async with nft_socket() as sock:
        dump = await query(sock, dump_tables_message())
    check([dump], ["nftables: list the tables"])
    names = (m.get_attr("NFTA_TABLE_NAME") for m in dump.messages)
    return sorted(n for n in names if n and n.startswith(NFT_TABLE_PREFIX))


async def show_firewall(bridge: str, *, counters: bool = True) -> str | None:
    """The stack's table as `nft list table inet stackd_...` prints it, read back from the kernel (no
    `nft` needed); None when there is none."""
    async with nft_socket() as sock:
        return await describe_table(sock, nft_table_name(bridge), counters=counters)


# --- the host's own firewall -------------------------------------------------------------------------------

_NFPROTO_FAMILY_NAMES = {1: "inet", 2: "ip"}
_FORWARD_HOOK = 2
_NF_DROP = 0
_BRIDGE_NF_CALL_IPTABLES = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


async def forward_dropping_chains() -> list[str]:
    """The host's base chains on the forward hook, of families ip and inet, whose policy is drop, as
    `ip filter FORWARD` (iptables-nft's, a running dockerd sets it; an nft ruleset's). Read-only.
    iptables-legacy's chains are not seen (they are not nftables)."""
    async with nft_socket() as sock:
        dump = await query(sock, dump_chains_message(family=0))  # NFPROTO_UNSPEC: every family
    check([dump], ["nftables: list the chains"])
    found = []
    for message in dump.messages:
        family = _NFPROTO_FAMILY_NAMES.get(message["nfgen_family"])
        hook = message.get_attr("NFTA_CHAIN_HOOK")
        if family is None or hook is None or hook.get_attr("NFTA_HOOK_HOOKNUM") != _FORWARD_HOOK:
            continue
        if message.get_attr("NFTA_CHAIN_POLICY") == _NF_DROP:
            found.append(f"{family} {message.get_attr('NFTA_CHAIN_TABLE')} {message.get_attr('NFTA_CHAIN_NAME')}")
    return sorted(found)


async def bridged_traffic_warning(bridge: str) -> str | None:
    """Why the services on `bridge` may not reach each other, or None: br_netfilter passes bridged
    IPv4 through the forward hook (net.bridge.bridge-nf-call-iptables = 1), where a drop policy of the
    host's firewall is final, whatever the stack's own table accepts."""
    try:
        if _BRIDGE_NF_CALL_IPTABLES.read_text().strip() != "1":
            return None
    except OSError:  # br_netfilter is not loaded: bridged frames never meet the forward hook
        return None
    chains = await forward_dropping_chains()
    if not chains:
        return None
    return (
        f"the host's firewall drops forwarded traffic (policy drop: {', '.join(chains)}) and br_netfilter "
        "passes bridged traffic through it (net.bridge.bridge-nf-call-iptables = 1): the services of this "
        f"stack cannot reach each other until it accepts them, e.g. `iptables -I FORWARD -i {bridge} -o "
        f"{bridge} -j ACCEPT` (docs/networking.md)"
    )


# --- ip_forward ---------------------------------------------------------------------------------------------


def _forwarding_record_comment() -> str:
    return (
        "stackd turned net.ipv4.ip_forward on for outbound stacks; before: "
        f"ip_forward={_read_sysctl('ip_forward')} accept_redirects={_read_sysctl('conf/all/accept_redirects')}"
    )


async def _give_back_forwarding(sock: AsyncNFTSocket) -> None:
    """If stackd turned ip_forward on and no outbound stack is left: put back what the record says
    (ip_forward, and conf/all/accept_redirects, which the kernel flips with it), then drop the record."""
    record = await query(sock, get_table_message(FORWARDING_RECORD))
    if record.errno == errno.ENOENT:
        return
    check([record], [f"nftables: read {FORWARDING_RECORD}"])
    if await _outbound_tables(sock):
        return
    before = dict(re.findall(r"(\w+)=(\d)", record.messages[0].get_attr("NFTA_TABLE_USERDATA") or ""))
    _write_sysctl("ip_forward", before.get("ip_forward", "0"))
    if "accept_redirects" in before:
        _write_sysctl("conf/all/accept_redirects", before["accept_redirects"])
    (reply,) = await transaction(sock, [delete_table_message(FORWARDING_RECORD)], what=f"table {FORWARDING_RECORD}")
    check([reply], [f"nftables: remove {FORWARDING_RECORD}"], ignore=[errno.ENOENT])


async def _outbound_tables(sock: AsyncNFTSocket) -> list[str]:
    """stackd's tables with an outbound (nat postrouting) chain."""
    dump = await query(sock, dump_chains_message())
    check([dump], ["nftables: list the chains"])
    return [
        m.get_attr("NFTA_CHAIN_TABLE")
        for m in dump.messages
        if m.get_attr("NFTA_CHAIN_NAME") == _OUTBOUND_CHAIN
        and (m.get_attr("NFTA_CHAIN_TABLE") or "").startswith(NFT_TABLE_PREFIX)
    ]


def _bridge_forwarding(bridge: str) -> Path:
    return _IPV4_SYSCTL / "conf" / bridge / "forwarding"


def _read_sysctl(name: str) -> str:
    return (_IPV4_SYSCTL / name).read_text().strip()


def _write_sysctl(name: str, value: str) -> None:
    path = _IPV4_SYSCTL / name
    try:
        path.write_text(value)
    except OSError as error:
        raise NetworkError(f"net.ipv4.{name.replace('/', '.')} = {value}: {error.strerror} ({path})") from None


def _write_bridge_forwarding_off(bridge: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # the bridge is gone: nothing to turn off
        _bridge_forwarding(bridge).write_text("0")


@contextlib.asynccontextmanager
async def _forwarding_lock() -> AsyncIterator[None]:
    """Serialise firewall changes host-wide: an flock on the ip_forward sysctl file (see module doc).
    Held for about a millisecond; waited for in a thread when another process holds it."""
    fd = os.open(_IPV4_SYSCTL / "ip_forward", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
