"""The netlink layer of stackd's network: pyroute2 messages, sent in batches through AsyncIPRoute.

pyroute2's high-level calls (`ipr.link("add", ...)`) cost about 0.3 ms of Python each before the kernel
sees anything; a service's network takes five to ten of them. Here every message is built once as a
pyroute2 message object (`ifinfmsg`, `ifaddrmsg`, `rtmsg`), and all the messages for one socket go to
the kernel in ONE sendmsg (pyroute2 `NetlinkRequest`s, as `nlm_request_batch` does); the kernel answers
each in order, and `batch` returns one `Reply` per message, an error included, so the caller can tell
which one failed. pyroute2 encodes, sends, receives and decodes; no `ip`, no hand-made bytes.

docs/networking.md has the measurements behind this.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkRequest
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from stackd.errors import NetworkError

__all__ = [
    "CREATE",
    "REQUEST",
    "Reply",
    "address_message",
    "batch",
    "check",
    "default_route_message",
    "delete_address_message",
    "delete_group_message",
    "delete_link_message",
    "dump_addresses_message",
    "dump_routes_message",
    "get_link_message",
    "host_rtnl",
    "link_up_message",
    "netlink_error",
    "open_rtnl",
]

#: A change the kernel acknowledges.
REQUEST = NLM_F_REQUEST | NLM_F_ACK
#: A new object; EEXIST if it exists.
CREATE = REQUEST | NLM_F_CREATE | NLM_F_EXCL
#: A new object, or replace the one that exists.
REPLACE = REQUEST | NLM_F_CREATE | NLM_F_REPLACE

RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0


@dataclass
class Reply:
    """The kernel's answer to one message of a batch: the messages it returned (for a get or a dump)
    and its error, if any (a pyroute2 NetlinkError: `.code` is the errno)."""

    messages: list[Any] = field(default_factory=list)
    error: NetlinkError | None = None

    @property
    def errno(self) -> int:
        return self.error.code if self.error is not None else 0


@contextlib.asynccontextmanager
async def host_rtnl(ipr: AsyncIPRoute | None = None) -> AsyncIterator[AsyncIPRoute]:
    """`ipr`, or a new AsyncIPRoute on the calling thread's namespace for the duration (then closed)."""
    if ipr is not None:
        yield ipr
        return
    host = open_rtnl()
    try:
        yield host
    finally:
        host.close()


def open_rtnl(fileno: int | None = None) -> AsyncIPRoute:
    """An AsyncIPRoute on the calling thread's network namespace, or on an rtnetlink socket opened
    elsewhere (`fileno`, which it then owns: a socket opened inside another namespace works there)."""
    return AsyncIPRoute(fileno=fileno) if fileno is not None else AsyncIPRoute()


async def batch(ipr: AsyncIPRoute, messages: Sequence[nlmsg]) -> list[Reply]:
    """Send `messages` (type and flags set in their headers) in one sendmsg; one Reply per message.

    The kernel handles the messages in order and answers every one, also after an error, so a failed
    message does not stop the others (which may then fail in turn: a later message that needs what
    the failed one should have made). At most one dump per batch: a socket runs one dump at a time."""
    requests = [NetlinkRequest(ipr, message) for message in messages]
    try:
        data = b""
        for request in requests:
            await request.prepare()
            data += request.msg.data
        ipr.send(data)
    except BaseException:
        for request in requests:
            request.cleanup()
        raise
    replies = []
    for request in requests:
        reply = Reply()
        try:
            async for message in request.response():
                if message["header"]["type"] != NLMSG_ERROR:
                    reply.messages.append(message)
        except NetlinkError as error:
            reply.error = error
        replies.append(reply)
    return replies


def check(replies: Sequence[Reply], what: Sequence[str], *, ignore: Sequence[int] = ()) -> None:
    """Raise NetworkError for the first failed reply (what[i] says what message i was), unless its
    errno is in `ignore`."""
    for reply, label in zip(replies, what, strict=True):
        if reply.error is not None and reply.errno not in ignore:
            raise netlink_error(label, reply.error)


def netlink_error(what: str, error: NetlinkError | OSError) -> NetworkError:
    """A NetworkError "what: EEXIST (File exists)" for a failed netlink request."""
    code = error.code if isinstance(error, NetlinkError) else (error.errno or 0)
    name = errno.errorcode.get(code, str(code))
    result = NetworkError(f"{what}: {name} ({os.strerror(code)})")
    result.errno = code  # type: ignore[attr-defined]
    return result


# --- messages -----------------------------------------------------------------------------------------


def _header(message: nlmsg, kind: int, flags: int) -> nlmsg:
    message["header"]["type"] = kind
    message["header"]["flags"] = flags
    return message


def link_up_message(
    *, index: int = 0, ifname: str | None = None, master: int | None = None, group: int | None = None
) -> ifinfmsg:
    """Set a link up (found by index, or by name when index is 0), optionally enslaving it to `master`
    and putting it in netdev `group`."""
    message = ifinfmsg()
    message["index"] = index
    message["flags"] = IFF_UP
    message["change"] = IFF_UP
    attrs: list[tuple[str, Any]] = []
    if ifname is not None:
        attrs.append(("IFLA_IFNAME", ifname))
    if master is not None:
        attrs.append(("IFLA_MASTER", master))
    if group is not None:
        attrs.append(("IFLA_GROUP", group))
    message["attrs"] = attrs
    return _header(message, RTM_NEWLINK, REQUEST)


def get_link_message(ifname: str | None = None, *, index: int = 0) -> ifinfmsg:
    """Ask for one link by name or index (answered by a RTM_NEWLINK, or ENODEV)."""
    message = ifinfmsg()
    message["index"] = index
    attrs: list[tuple[str, Any]] = [("IFLA_EXT_MASK", 1 << 3)]  # RTEXT_FILTER_SKIP_STATS
    if ifname is not None:
        attrs.insert(0, ("IFLA_IFNAME", ifname))
    message["attrs"] = attrs
    return _header(message, RTM_GETLINK, NLM_F_REQUEST)


def delete_link_message(*, ifname: str | None = None, index: int = 0) -> ifinfmsg:
    """Delete a link by index or name (ENODEV when it is gone)."""
    message = ifinfmsg()
    message["index"] = index
    message["attrs"] = [("IFLA_IFNAME", ifname)] if ifname is not None else []
    return _header(message, RTM_DELLINK, REQUEST)


def delete_group_message(group: int) -> ifinfmsg:
    """Delete every link of netdev `group` (not 0), in one unregister: one wait for RCU grace periods
    for them all, where a link at a time waits once each."""
    if not group:
        raise ValueError("group 0 is every link's default group: never delete it")
    message = ifinfmsg()
    message["index"] = 0
    message["attrs"] = [("IFLA_GROUP", group)]
    return _header(message, RTM_DELLINK, REQUEST)


def address_message(index: int, address: IPv4Address, subnet: IPv4Network, *, replace: bool = False) -> ifaddrmsg:
    """Add `address`/prefix (with the subnet's broadcast address) to link `index`."""
    message = ifaddrmsg()
    message["family"] = AF_INET
    message["prefixlen"] = subnet.prefixlen
    message["index"] = index
    attrs: list[tuple[str, Any]] = [("IFA_LOCAL", str(address)), ("IFA_ADDRESS", str(address))]
    if subnet.prefixlen <= 30:
        attrs.append(("IFA_BROADCAST", str(subnet.broadcast_address)))
    message["attrs"] = attrs
    return _header(message, RTM_NEWADDR, REPLACE if replace else CREATE)


def delete_address_message(index: int, address: str, prefixlen: int) -> ifaddrmsg:
    """Remove `address`/`prefixlen` from link `index`."""
    message = ifaddrmsg()
    message["family"] = AF_INET
    message["prefixlen"] = prefixlen
    message["index"] = index
    message["attrs"] = [("IFA_LOCAL", address), ("IFA_ADDRESS", address)]
    return _header(message, RTM_DELADDR, REQUEST)


def default_route_message(gateway: IPv4Address) -> rtmsg:
    """The default route via `gateway` (its device is the one that reaches the gateway)."""
    message = rtmsg()
    message["family"] = AF_INET
    message["table"] = RT_TABLE_MAIN
    message["proto"] = RTPROT_STATIC
    message["scope"] = RT_SCOPE_UNIVERSE
    message["type"] = RTN_UNICAST
    message["attrs"] = [("RTA_GATEWAY", str(gateway))]
    return _header(message, RTM_NEWROUTE, CREATE)


def dump_addresses_message() -> ifaddrmsg:
    """Every IPv4 address of the namespace."""
    message = ifaddrmsg()
    message["family"] = AF_INET
    return _header(message, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP)


def dump_routes_message() -> rtmsg:
    """Every IPv4 route of every table of the namespace."""
    message = rtmsg()
    message["family"] = AF_INET
    return _header(message, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP)
