"""A stack's network on the host: one bridge per stack, a pinned network namespace, a veth pair, an
address and a default route per service, and the stack's /etc/hosts and /etc/resolv.conf.

All netlink work goes through pyroute2's async API, in batches (rtnl.py); namespaces are made
without forking (netns.py). docs/networking.md explains the choices and has the measurements.

    facts = await read_host_networks(ignore_links=[bridge_name(project)])
    network = StackNetwork.for_project(project, subnet or pick_subnet(project, host_networks=facts.blocked(),
                                                                      taken=other_stacks_subnets))
    addresses = assign_addresses(network.subnet, bridged_services, previous=remembered)
    endpoints = [endpoint(network, paths, name, address) for name, address in addresses.items()]
    write_names_files(paths, hosts=render_hosts(project, entries), resolv_conf=render_resolv_conf())
    await create_network(network, paths, endpoints)        # then launch with join_netns=endpoint.netns
    ...
    report = await teardown_network(network, paths, endpoints)
"""

from stackd.runtime.network.addresses import (
    DEFAULT_POOL,
    DEFAULT_PREFIXLEN,
    assign_addresses,
    gateway_of,
    mac_for,
    parse_subnet,
    pick_subnet,
)
from stackd.runtime.network.bridge import Bridge, delete_bridge, ensure_bridge
from stackd.runtime.network.host import HostNetworks, read_host_networks
from stackd.runtime.network.hosts import (
    HostsEntry,
    hosts_path,
    name_binds,
    parse_nameservers,
    remove_names_files,
    render_hosts,
    render_resolv_conf,
    resolv_conf_path,
    service_entry,
    write_names_file,
    write_names_files,
)
from stackd.runtime.network.names import (
    IFNAMSIZ,
    INNER_IFNAME,
    bridge_name,
    names_dir,
    netns_dir,
    netns_path,
    veth_name,
)
from stackd.runtime.network.netns import find_holders, namespace_inode, unpin
from stackd.runtime.network.stack import Endpoint, StackNetwork, attach_endpoints, create_network, endpoint
from stackd.runtime.network.teardown import DEFAULT_TIMEOUT, TeardownReport, detach_endpoints, teardown_network

__all__ = [
    "DEFAULT_POOL",
    "DEFAULT_PREFIXLEN",
    "DEFAULT_TIMEOUT",
    "IFNAMSIZ",
    "INNER_IFNAME",
    "Bridge",
    "Endpoint",
    "HostNetworks",
    "HostsEntry",
    "StackNetwork",
    "TeardownReport",
    "assign_addresses",
    "attach_endpoints",
    "bridge_name",
    "create_network",
    "delete_bridge",
    "detach_endpoints",
    "endpoint",
    "ensure_bridge",
    "find_holders",
    "gateway_of",
    "hosts_path",
    "mac_for",
    "name_binds",
    "names_dir",
    "namespace_inode",
    "netns_dir",
    "netns_path",
    "parse_nameservers",
    "parse_subnet",
    "pick_subnet",
    "read_host_networks",
    "remove_names_files",
    "render_hosts",
    "render_resolv_conf",
    "resolv_conf_path",
    "service_entry",
    "teardown_network",
    "unpin",
    "veth_name",
    "write_names_file",
    "write_names_files",
]
