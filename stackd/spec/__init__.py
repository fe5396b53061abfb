"""The stack file: TOML -> frozen, typed models, validated whole before anything touches the host."""

from stackd.spec.loader import find_stack_file, load_stack, parse_stack
from stackd.spec.models import (
    Dependency,
    Healthcheck,
    Network,
    NetworkMode,
    PortMapping,
    RestartPolicy,
    Rootfs,
    SecurityOptions,
    Service,
    Stack,
    Sysctl,
    Tmpfs,
    Ulimit,
    User,
    Volume,
)
from stackd.spec.serialize import stack_to_dict

__all__ = [
    "Dependency",
    "Healthcheck",
    "Network",
    "NetworkMode",
    "PortMapping",
    "RestartPolicy",
    "Rootfs",
    "SecurityOptions",
    "Service",
    "Stack",
    "Sysctl",
    "Tmpfs",
    "Ulimit",
    "User",
    "Volume",
    "find_stack_file",
    "load_stack",
    "parse_stack",
    "stack_to_dict",
]
