"""nftables through netlink, with pyroute2's message classes: the few statements stackd's firewall needs,
tables made and deleted in one transaction, and tables read back from the kernel as `nft list` prints them.

A rule is a list of statements, and every statement here carries both its text, as `nft list` prints it,
and the kernel expressions it compiles to (what the `nft` program would send):

    iifname("sd-1a2b3c4d")        'iifname "sd-1a2b3c4d"'   meta load iifname => reg 1; cmp eq reg 1 "sd-1a2b3c4d"
    ip_daddr(gateway, negate=True) 'ip daddr != 10.213.7.1'  meta load nfproto; cmp eq ipv4;
                                                              payload load 4b @ network header + 16; cmp neq
    drop()                         'drop'                    immediate reg 0 drop

so the text in the docs, in the tests and in an error message is the text of what the kernel got. The
`nft` program itself is not needed (nor installed here): `describe_table` reads a table back through
netlink and prints it the same way, from the kernel's own expressions as pyroute2 decodes them.

Messages are pyroute2 message objects (nft_table_msg, nft_chain_msg, nft_rule_msg), except a rule's
expressions, which are encoded here (a few lines of `struct`, attribute numbers taken from pyroute2's
classes): pyroute2 spends about 0.4 ms of Python on one rule's nested expressions, so a stack's table
took 4-6 ms to encode against well under 1 ms for the kernel to apply it.

Changes go to the kernel as one transaction (`transaction`): NFNL_MSG_BATCH_BEGIN, the messages and
NFNL_MSG_BATCH_END in one sendmsg; the kernel applies all of them or none, and answers every message
that asked for an acknowledgement (all of ours), an error included. Replacing a table atomically is
the classic `add table; delete table; add table ...` in one transaction: the first `add` makes sure
there is something to delete, so the same messages work whether the table exists or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFPROTO_INET,
    NFT_MSG_DELTABLE,
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETRULE,
    NFT_MSG_GETTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    AsyncNFTSocket,
    Cmp,
    Meta,
    nft_chain_msg,
    nft_contains_expr,
    nft_data,
    nft_rule_msg,
    nft_table_msg,
)
from pyroute2.netlink.nlsocket import NetlinkRequest

from stackd.errors import NetworkError
from stackd.runtime.network.rtnl import Reply, batch, netlink_error

__all__ = [
    "Chain",
    "Rule",
    "Statement",
    "Table",
    "accept",
    "counter",
    "ct_state",
    "delete_table_message",
    "describe_expressions",
    "describe_table",
    "drop",
    "dump_chains_message",
    "dump_tables_message",
    "get_table_message",
    "iifname",
    "ip_daddr",
    "ip_saddr",
    "masquerade",
    "new_table_message",
    "nfproto",
    "nft_socket",
    "oifname",
    "query",
    "replace_table_messages",
    "transaction",
]

#: Every message of ours: a request, acknowledged.
_REQUEST = NLM_F_REQUEST | NLM_F_ACK
#: nfnetlink's transaction markers (linux/netfilter/nfnetlink.h).
_NFNL_MSG_BATCH_BEGIN = 0x10
_NFNL_MSG_BATCH_END = 0x11
#: How long a transaction may wait for the kernel's answers (they are there when sendmsg returns).
_ANSWER_TIMEOUT = 5.0

_HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
#: The names nft prints for the standard priorities of the chain types used here.
_PRIORITY_NAMES = {("filter", 0): "filter", ("nat", 100): "srcnat", ("nat", -100): "dstnat"}
_NFPROTO_NAMES = {2: "ipv4", 10: "ipv6"}
#: conntrack state bits (NF_CT_STATE_BIT): what `ct state` matches.
_CT_STATES = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}
_NF_DROP, _NF_ACCEPT = 0, 1
_REG_VERDICT, _REG_1 = 0, 1
_NFT_CT_STATE = 0
_PAYLOAD_NETWORK_HEADER = 1
_IP_SADDR_OFFSET, _IP_DADDR_OFFSET = 12, 16
_IFNAMSIZ = 16

#: NFTA_LIST_ELEM (linux/netfilter/nf_tables.h): each expression of a rule is one.
_NFTA_LIST_ELEM = 1
_NLA_F_NESTED = 0x8000


def _attribute_numbers(*classes: Any) -> dict[str, int]:
    """Attribute name -> number, from pyroute2's nla classes (an attribute's number is its place in
    the class's nla_map)."""
    return {entry[0]: number for cls in classes for number, entry in enumerate(cls.nla_map)}


_EXPR = nft_contains_expr.nft_expr
_ATTRIBUTES = _attribute_numbers(
    _EXPR,
    _EXPR.nft_bitwise,
    _EXPR.nft_cmp,
    _EXPR.nft_ct,
    _EXPR.nft_immediate,
    _EXPR.nft_meta,
    _EXPR.nft_payload,
    nft_data.nfta_data,
    nft_data.nfta_data.verdict,
)


# --- statements -----------------------------------------------------------------------------------------
#
# Expressions are encoded here, as bytes (see the module's docstring for why). What the kernel holds is
# read back through pyroute2's own decoder (describe_table): the tests compare that with what was meant.


@dataclass(frozen=True)
class Statement:
    """One piece of a rule: its text as `nft list` prints it, and the kernel expressions it becomes."""

    text: str
    expressions: bytes = field(compare=False)


def _attr(name: str, payload: bytes) -> bytes:
    """One netlink attribute (header, payload, padding to 4 bytes)."""
    return _nla(_ATTRIBUTES[name], payload)


def _nla(number: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), number) + payload + bytes(-len(payload) % 4)


def _nested(name: str, *attributes: bytes) -> bytes:
    return _nla(_ATTRIBUTES[name] | _NLA_F_NESTED, b"".join(attributes))


def _u32(name: str, value: int) -> bytes:
    return _attr(name, struct.pack(">i" if value < 0 else ">I", value))  # nftables' numbers are big-endian


def _value(name: str, data: bytes) -> bytes:
    return _nested(name, _attr("NFTA_DATA_VALUE", data))


def _expr(name: str, *data: bytes) -> bytes:
    """One expression of a rule: its name and its attributes."""
    body = _attr("NFTA_EXPR_NAME", name.encode() + b"\0")
    if data:
        body += _nested("NFTA_EXPR_DATA", *data)
    return _nla(_NFTA_LIST_ELEM | _NLA_F_NESTED, body)


def _cmp(value: bytes, *, negate: bool = False) -> bytes:
    op = Cmp.NFT_CMP_NEQ if negate else Cmp.NFT_CMP_EQ
    return _expr("cmp", _u32("NFTA_CMP_SREG", _REG_1), _u32("NFTA_CMP_OP", op), _value("NFTA_CMP_DATA", value))


def _meta(key: Meta) -> bytes:
    return _expr("meta", _u32("NFTA_META_DREG", _REG_1), _u32("NFTA_META_KEY", key))


def _bitwise(mask: bytes) -> bytes:
    return _expr(
        "bitwise",
        _u32("NFTA_BITWISE_SREG", _REG_1),
        _u32("NFTA_BITWISE_DREG", _REG_1),
        _u32("NFTA_BITWISE_LEN", len(mask)),
        _value("NFTA_BITWISE_MASK", mask),
        _value("NFTA_BITWISE_XOR", bytes(len(mask))),
    )


def _verdict(code: int) -> bytes:
    verdict = _nested("NFTA_DATA_VERDICT", _u32("NFTA_VERDICT_CODE", code))
    return _expr("immediate", _u32("NFTA_IMMEDIATE_DREG", _REG_VERDICT), _nested("NFTA_IMMEDIATE_DATA", verdict))


def _ifname(key: Meta, word: str, name: str, negate: bool) -> Statement:
    encoded = name.encode()
    if not encoded or len(encoded) >= _IFNAMSIZ:
        raise ValueError(f"{name!r} is not an interface name")
    op = "!= " if negate else ""
    return Statement(f'{word} {op}"{name}"', _meta(key) + _cmp(encoded.ljust(_IFNAMSIZ, b"\0"), negate=negate))


def iifname(name: str, *, negate: bool = False) -> Statement:
    """The packet came in through interface `name` (by name: the interface need not exist yet)."""
    return _ifname(Meta.NFT_META_IIFNAME, "iifname", name, negate)


def oifname(name: str, *, negate: bool = False) -> Statement:
    """The packet goes out through interface `name`."""
    return _ifname(Meta.NFT_META_OIFNAME, "oifname", name, negate)


def nfproto(name: str) -> Statement:
    """An IPv4 ("ipv4") or IPv6 ("ipv6") packet (a table of family inet sees both)."""
    (number,) = (n for n, text in _NFPROTO_NAMES.items() if text == name)
    return Statement(f"meta nfproto {name}", _meta(Meta.NFT_META_NFPROTO) + _cmp(bytes([number])))


def _ip_address(word: str, offset: int, network: IPv4Network, negate: bool) -> Statement:
    # In a table of family inet, `ip ...` implies `meta nfproto ipv4` (nft adds it and does not print it).
    expressions = [
        _meta(Meta.NFT_META_NFPROTO),
        _cmp(bytes([socket.AF_INET])),
        _expr(
            "payload",
            _u32("NFTA_PAYLOAD_DREG", _REG_1),
            _u32("NFTA_PAYLOAD_BASE", _PAYLOAD_NETWORK_HEADER),
            _u32("NFTA_PAYLOAD_OFFSET", offset),
            _u32("NFTA_PAYLOAD_LEN", 4),
        ),
    ]
    if network.prefixlen < 32:
        expressions.append(_bitwise(network.netmask.packed))
    expressions.append(_cmp(network.network_address.packed, negate=negate))
    shown = network.network_address if network.prefixlen == 32 else network
    op = "!= " if negate else ""
    return Statement(f"ip {word} {op}{shown}", b"".join(expressions))


def ip_saddr(network: IPv4Network | IPv4Address, *, negate: bool = False) -> Statement:
    """An IPv4 packet from `network` (or from one address)."""
    return _ip_address("saddr", _IP_SADDR_OFFSET, IPv4Network(network), negate)


def ip_daddr(network: IPv4Network | IPv4Address, *, negate: bool = False) -> Statement:
    """An IPv4 packet to `network` (or to one address)."""
    return _ip_address("daddr", _IP_DADDR_OFFSET, IPv4Network(network), negate)


def ct_state(*states: str) -> Statement:
    """The packet's connection is in one of these conntrack states ("established", "related", ...)."""
    mask = 0
    for state in states:
        mask |= _CT_STATES[state]
    return Statement(
        f"ct state {','.join(states)}",
        _expr("ct", _u32("NFTA_CT_DREG", _REG_1), _u32("NFTA_CT_KEY", _NFT_CT_STATE))
        + _bitwise(struct.pack("=I", mask))  # the state bits are in host byte order
        + _cmp(bytes(4), negate=True),
    )


def counter() -> Statement:
    """Count the packets and bytes that get this far (`nft list` prints the counts)."""
    return Statement("counter", _expr("counter"))


def accept() -> Statement:
    return Statement("accept", _verdict(_NF_ACCEPT))


def drop() -> Statement:
    return Statement("drop", _verdict(_NF_DROP))


def masquerade() -> Statement:
    """Source NAT to the address of the interface the packet leaves through (nat postrouting only)."""
    return Statement("masquerade", _expr("masq"))


# --- tables, chains, rules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Statements in order, and an optional comment (shown by `nft list`)."""

    statements: tuple[Statement, ...]
    comment: str = ""

    @property
    def text(self) -> str:
        words = [s.text for s in self.statements]
        if self.comment:
            words.append(f'comment "{self.comment}"')
        return " ".join(words)


@dataclass(frozen=True)
class Chain:
    """A base chain: attached to a hook, with policy accept (a packet no rule drops goes on)."""

    name: str
    type: str  # "filter" or "nat"
    hook: str  # "input", "forward", "postrouting", ...
    priority: int
    rules: tuple[Rule, ...] = ()

    @property
    def header(self) -> str:
        priority = _PRIORITY_NAMES.get((self.type, self.priority), str(self.priority))
        return f"type {self.type} hook {self.hook} priority {priority}; policy accept;"


@dataclass(frozen=True)
class Table:
    """A table of family inet (IPv4 and IPv6 both pass its chains)."""

    name: str
    chains: tuple[Chain, ...] = ()
    comment: str = ""

    @property
    def text(self) -> str:
        """The table as `nft list table inet NAME` prints it (counters without their numbers)."""
        return _render(self.name, self.comment, [(c.name, c.header, [r.text for r in c.rules]) for c in self.chains])


def _render(name: str, comment: str, chains: Sequence[tuple[str, str, Sequence[str]]]) -> str:
    lines = [f"table inet {name} {{"]
    if comment:
        lines.append(f'\tcomment "{comment}"')
    for index, (chain, header, rules) in enumerate(chains):
        if index:
            lines.append("")
        lines += [f"\tchain {chain} {{", f"\t\t{header}", *(f"\t\t{rule}" for rule in rules), "\t}"]
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- messages ---------------------------------------------------------------------------------------------


def _header(message: nlmsg, kind: int, flags: int) -> nlmsg:
    message["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | kind
    message["header"]["flags"] = flags
    message["nfgen_family"] = NFPROTO_INET
    return message


def _comment(text: str) -> str:
    # nft keeps comments to 128 bytes with the NUL; pyroute2 encodes a str as nft's "comment" udata.
    return text.encode()[:127].decode(errors="ignore")


def new_table_message(name: str, *, comment: str = "") -> nft_table_msg:
    """Add table `name` (family inet); a table that exists is left as it is, no error."""
    message = nft_table_msg()
    message["attrs"] = [("NFTA_TABLE_NAME", name)]
    if comment:
        message["attrs"].append(("NFTA_TABLE_USERDATA", _comment(comment)))
    return _header(message, NFT_MSG_NEWTABLE, _REQUEST | NLM_F_CREATE)


def delete_table_message(name: str) -> nft_table_msg:
    """Delete table `name` with its chains and rules (ENOENT when there is none)."""
    message = nft_table_msg()
    message["attrs"] = [("NFTA_TABLE_NAME", name)]
    return _header(message, NFT_MSG_DELTABLE, _REQUEST)


def _new_chain_message(table: str, chain: Chain) -> nft_chain_msg:
    message = nft_chain_msg()
    message["attrs"] = [
        ("NFTA_CHAIN_TABLE", table),
        ("NFTA_CHAIN_NAME", chain.name),
        (
            "NFTA_CHAIN_HOOK",
            {"attrs": [("NFTA_HOOK_HOOKNUM", _HOOKS[chain.hook]), ("NFTA_HOOK_PRIORITY", chain.priority)]},
        ),
        ("NFTA_CHAIN_POLICY", _NF_ACCEPT),
        ("NFTA_CHAIN_TYPE", chain.type),
    ]
    return _header(message, NFT_MSG_NEWCHAIN, _REQUEST | NLM_F_CREATE)


class _rule_msg(nft_rule_msg):  # type: ignore[misc]
    """pyroute2's nft_rule_msg, with the expressions given already encoded (bytes)."""

    nla_map = tuple(
        ("NFTA_RULE_EXPRESSIONS", "cdata") if entry[0] == "NFTA_RULE_EXPRESSIONS" else entry
        for entry in nft_rule_msg.nla_map
    )


def _new_rule_message(table: str, chain: str, rule: Rule) -> nft_rule_msg:
    message = _rule_msg()
    message["attrs"] = [
        ("NFTA_RULE_TABLE", table),
        ("NFTA_RULE_CHAIN", chain),
        ("NFTA_RULE_EXPRESSIONS", b"".join(s.expressions for s in rule.statements)),
    ]
    if rule.comment:
        message["attrs"].append(("NFTA_RULE_USERDATA", _comment(rule.comment)))
    return _header(message, NFT_MSG_NEWRULE, _REQUEST | NLM_F_CREATE | NLM_F_APPEND)


def replace_table_messages(table: Table) -> list[tuple[str, nlmsg]]:
    """The messages that make `table` exactly this, whether it exists or not (one transaction), each
    with what it is (for an error message)."""
    messages: list[tuple[str, nlmsg]] = [
        (f"table {table.name}: add", new_table_message(table.name)),
        (f"table {table.name}: delete", delete_table_message(table.name)),
        (f"table {table.name}: add", new_table_message(table.name, comment=table.comment)),
    ]
    for chain in table.chains:
        messages.append((f"chain {chain.name}: add", _new_chain_message(table.name, chain)))
        for rule in chain.rules:
            messages.append(
                (f"chain {chain.name}: add rule {rule.text!r}", _new_rule_message(table.name, chain.name, rule))
            )
    return messages


def get_table_message(name: str) -> nft_table_msg:
    """Ask for table `name` (answered by the table, or ENOENT)."""
    message = nft_table_msg()
    message["attrs"] = [("NFTA_TABLE_NAME", name)]
    return _header(message, NFT_MSG_GETTABLE, _REQUEST)


def dump_tables_message() -> nft_table_msg:
    """Every table of family inet."""
    return _header(nft_table_msg(), NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_DUMP)


def dump_chains_message(family: int = NFPROTO_INET) -> nft_chain_msg:
    """Every chain of every table of `family` (0: of every family)."""
    message = _header(nft_chain_msg(), NFT_MSG_GETCHAIN, NLM_F_REQUEST | NLM_F_DUMP)
    message["nfgen_family"] = family
    return message


def _dump_rules_message(table: str) -> nft_rule_msg:
    message = nft_rule_msg()
    message["attrs"] = [("NFTA_RULE_TABLE", table)]
    return _header(message, NFT_MSG_GETRULE, NLM_F_REQUEST | NLM_F_DUMP)


# --- talking to the kernel --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nft_socket() -> AsyncIterator[AsyncNFTSocket]:
    """An nfnetlink socket for nftables, in the calling thread's network namespace, closed afterwards
    (without waiting for the kernel, see _close_soon). Each message names its family."""
    sock = AsyncNFTSocket(nfgen_family=NFPROTO_INET)
    try:
        yield sock
    finally:
        _close_soon(sock)


def _close_soon(sock: AsyncNFTSocket) -> None:
    """Close `sock`, leaving its last close(2) to a thread of its own.

    The last close of an nftables socket makes the kernel finish freeing what earlier transactions
    replaced or deleted, which waits for an RCU grace period (4-14 ms measured here; nf_tables'
    NETLINK_URELEASE handler). Nothing of ours needs that wait: the rules changed when the transaction
    was acknowledged. So pyroute2 closes a duplicate of the descriptor (at once) and the thread closes
    the original."""
    try:
        last = os.dup(sock.socket.fileno())
    except (OSError, AttributeError, ValueError):  # no socket left to close
        last = -1
    sock.close()
    if last >= 0:
        threading.Thread(target=os.close, args=(last,), name="stackd-nft-close", daemon=True).start()


def _batch_marker(kind: int) -> nfgen_msg:
    message = nfgen_msg()
    message["res_id"] = NFNL_SUBSYS_NFTABLES
    message["header"]["type"] = kind
    message["header"]["flags"] = NLM_F_REQUEST
    return message


async def transaction(sock: AsyncNFTSocket, messages: Sequence[nlmsg], *, what: str = "nftables") -> list[Reply]:
    """Send `messages` as one nftables transaction, in one sendmsg; one Reply per message (`what`
    says what the transaction is, in errors).

    The kernel applies every message or none: when one fails, its Reply has the error and the whole
    transaction is undone (the other Replies may then say nothing went wrong with them). A batch
    refused as a whole (no CAP_NET_ADMIN) or a commit that fails is answered on the BATCH_BEGIN
    marker: NetworkError."""
    begin = NetlinkRequest(sock, _batch_marker(_NFNL_MSG_BATCH_BEGIN))
    end = NetlinkRequest(sock, _batch_marker(_NFNL_MSG_BATCH_END))
    requests = [NetlinkRequest(sock, message) for message in messages]
    prepared = []
    try:
        for request in [begin, *requests, end]:
            await request.prepare()
            prepared.append(request)
        sock.send(b"".join(request.msg.data for request in prepared))
    except BaseException:
        for request in prepared:
            request.cleanup()
        raise
    end.cleanup()  # never answered
    # The kernel has answered by now (it handles a batch within sendmsg): an error on the marker comes
    # before the messages' answers, which then mean nothing.
    refusal = asyncio.ensure_future(_refusal(begin))
    answers = asyncio.ensure_future(_answers(requests))
    try:
        await asyncio.wait([refusal, answers], timeout=_ANSWER_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0)  # the refusal, if any, is read by now
        if refusal.done() and refusal.result() is not None:
            raise netlink_error(f"{what}: transaction", refusal.result())
        if not answers.done():
            raise NetworkError(f"{what}: no answer from the kernel within {_ANSWER_TIMEOUT:g} s")
        return answers.result()
    finally:
        refusal.cancel()
        answers.cancel()


async def _refusal(begin: NetlinkRequest) -> NetlinkError | None:
    """The error the kernel sent for the BATCH_BEGIN marker; waits forever when there is none."""
    try:
        async for _ in begin.response():
            pass
    except NetlinkError as error:
        return error
    return None


async def _answers(requests: Sequence[NetlinkRequest]) -> list[Reply]:
    replies = []
    for request in requests:
        reply = Reply()
        try:
            reply.messages = [m async for m in request.response()]
        except NetlinkError as error:
            reply.error = error
        replies.append(reply)
    return replies


async def query(sock: AsyncNFTSocket, message: nlmsg) -> Reply:
    """Send one get or dump request; its Reply (the messages, or the error)."""
    (reply,) = await batch(sock, [message])
    return reply


# --- reading tables back ----------------------------------------------------------------------------------


async def describe_table(sock: AsyncNFTSocket, name: str, *, counters: bool = True) -> str | None:
    """Table `name` (family inet) as `nft list table inet NAME` prints it, read from the kernel; None
    when there is no such table. Only the statements this module makes are known by name (others
    print as `<expression>`). Without `counters`, a counter prints as just `counter`."""
    table = await query(sock, get_table_message(name))
    if table.error is not None or not table.messages:
        return None
    chains = await query(sock, dump_chains_message())
    rules = await query(sock, _dump_rules_message(name))
    by_chain: dict[str, list[str]] = {}
    for message in rules.messages:
        text = describe_expressions(message.get_attr("NFTA_RULE_EXPRESSIONS") or [], counters=counters)
        comment = message.get_attr("NFTA_RULE_USERDATA")
        if comment:
            text += f' comment "{comment}"'
        by_chain.setdefault(message.get_attr("NFTA_RULE_CHAIN"), []).append(text)
    shown = []
    for message in chains.messages:
        if message.get_attr("NFTA_CHAIN_TABLE") != name:
            continue
        chain = message.get_attr("NFTA_CHAIN_NAME")
        shown.append((chain, _chain_header(message), by_chain.get(chain, [])))
    return _render(name, table.messages[0].get_attr("NFTA_TABLE_USERDATA") or "", shown)


def _chain_header(message: Any) -> str:
    hook = message.get_attr("NFTA_CHAIN_HOOK")
    if hook is None:
        return ""
    hooks = {number: text for text, number in _HOOKS.items()}
    kind = message.get_attr("NFTA_CHAIN_TYPE")
    priority = hook.get_attr("NFTA_HOOK_PRIORITY")
    policy = "accept" if message.get_attr("NFTA_CHAIN_POLICY") == _NF_ACCEPT else "drop"
    shown = _PRIORITY_NAMES.get((kind, priority), str(priority))
    return f"type {kind} hook {hooks.get(hook.get_attr('NFTA_HOOK_HOOKNUM'))} priority {shown}; policy {policy};"


def describe_expressions(expressions: Iterable[Any], *, counters: bool = True) -> str:
    """A rule's kernel expressions (as pyroute2 decodes them) in nft's words."""
    words: list[str] = []
    loaded: tuple[Any, ...] = ()  # what register 1 holds: ("meta", key), ("payload", offset), ("ct", key)
    mask: bytes | None = None
    for expression in expressions:
        name = expression.get_attr("NFTA_EXPR_NAME")
        data = expression.get_attr("NFTA_EXPR_DATA")
        if name == "meta":
            loaded, mask = ("meta", data.get_attr("NFTA_META_KEY")), None
        elif name == "payload":
            loaded, mask = ("payload", data.get_attr("NFTA_PAYLOAD_OFFSET")), None
        elif name == "ct":
            loaded, mask = ("ct", data.get_attr("NFTA_CT_KEY")), None
        elif name == "bitwise":
            mask = data.get_attr("NFTA_BITWISE_MASK").get_attr("NFTA_DATA_VALUE")
        elif name == "cmp":
            value = data.get_attr("NFTA_CMP_DATA").get_attr("NFTA_DATA_VALUE")
            words.append(_describe_cmp(loaded, mask, data.get_attr("NFTA_CMP_OP") == "NFT_CMP_NEQ", value))
        elif name == "counter":
            if counters:
                packets, size = data.get_attr("NFTA_COUNTER_PACKETS"), data.get_attr("NFTA_COUNTER_BYTES")
                words.append(f"counter packets {packets} bytes {size}")
            else:
                words.append("counter")
        elif name == "immediate":
            verdict = data.get_attr("NFTA_IMMEDIATE_DATA").get_attr("NFTA_DATA_VERDICT")
            words.append({"NF_ACCEPT": "accept", "NF_DROP": "drop"}.get(verdict.get_attr("NFTA_VERDICT_CODE"), "?"))
        elif name == "masq":
            words.append("masquerade")
        else:
            words.append(f"<{name}>")
    # nft does not print the `meta nfproto ipv4` that an `ip ...` match needs in an inet table.
    return " ".join(w for i, w in enumerate(words) if not (w == "meta nfproto ipv4" and _next_is_ip(words, i)))


def _next_is_ip(words: list[str], index: int) -> bool:
    return index + 1 < len(words) and words[index + 1].startswith("ip ")


def _describe_cmp(loaded: tuple[Any, ...], mask: bytes | None, negate: bool, value: bytes) -> str:
    op = "!= " if negate else ""
    if loaded in (("meta", "NFT_META_IIFNAME"), ("meta", "NFT_META_OIFNAME")):
        word = "iifname" if loaded[1] == "NFT_META_IIFNAME" else "oifname"
        shown = value.rstrip(b"\0").decode(errors="replace")
        return f'{word} {op}"{shown}"'
    if loaded == ("meta", "NFT_META_NFPROTO"):
        return f"meta nfproto {op}{_NFPROTO_NAMES.get(value[0], value[0])}"
    if loaded in (("payload", _IP_SADDR_OFFSET), ("payload", _IP_DADDR_OFFSET)):
        word = "saddr" if loaded[1] == _IP_SADDR_OFFSET else "daddr"
        address = IPv4Address(value)
        if mask is not None:
            return f"ip {word} {op}{IPv4Network((address, bin(int.from_bytes(mask, 'big')).count('1')))}"
        return f"ip {word} {op}{address}"
    if loaded == ("ct", "NFT_CT_STATE") and mask is not None and negate and not any(value):
        bits = struct.unpack("=I", mask)[0]
        return "ct state " + ",".join(name for name, bit in _CT_STATES.items() if bits & bit)
    return f"<cmp {op}{value.hex()}>"
