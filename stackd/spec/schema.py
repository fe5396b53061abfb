"""The JSON Schema (draft 2020-12) of the stack file, for editors (Taplo / Even Better TOML) and CI.

The schema checks shapes; the loader checks everything (ranges, references, sysctl rules). A test keeps
the schema's keys equal to the loader's.
"""

from __future__ import annotations

from typing import Any

from stackd.spec.service import ULIMITS

__all__ = ["SCHEMA_ID", "stack_schema"]

SCHEMA_ID = "https://stackd.dev/schema/stack-file.json"

_STRING_LIST: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
_ARGV: dict[str, Any] = {"oneOf": [{"type": "string", "minLength": 1}, {**_STRING_LIST, "minItems": 1}]}
_SCALAR: dict[str, Any] = {"type": ["string", "number", "boolean"]}
_KEY_VALUES: dict[str, Any] = {
    "oneOf": [
        {"type": "object", "additionalProperties": _SCALAR},
        {"type": "array", "items": {"type": "string", "pattern": "="}},
    ]
}
_SIZE: dict[str, Any] = {
    "oneOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kKmMgGtTpP]([iI]?[bB])?|[bB])?\s*$"},
    ],
    "description": 'Bytes, or a size such as "256MiB", "1g", "512k" (all units binary, as in Docker).',
}
_DURATION: dict[str, Any] = {
    "oneOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)\s*$"},
    ],
    "description": 'Seconds, or a duration such as "1.5s", "2m30s", "500ms".',
}
_CONDITION = {
    "type": "string",
    "enum": [
        "service_started", "service_healthy", "service_completed_successfully",
        "started", "healthy", "completed_successfully",
    ],
}  # fmt: skip
_RLIMIT: dict[str, Any] = {"oneOf": [{"type": "integer", "minimum": -1}, {"const": "unlimited"}]}


def _service_schema() -> dict[str, Any]:
    properties: dict[str, Any] = {
        "command": {
            **_ARGV,
            "description": "The program and its arguments (a string is split like a shell).",
        },
        "entrypoint": {**_ARGV, "description": "Prepended to command, as in Docker."},
        "environment": {
            # A bare "KEY" in the array takes the variable from the environment stackd runs in.
            "oneOf": [_KEY_VALUES["oneOf"][0], {"type": "array", "items": {"type": "string", "minLength": 1}}],
            "description": 'Variables: a table, or ["KEY=VALUE", "KEY"].',
        },
        "env_file": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "oneOf": [
                            {"type": "string"},
                            {
                                "type": "object",
                                "properties": {"path": {"type": "string"}, "required": {"type": "boolean"}},
                                "required": ["path"],
                                "additionalProperties": False,
                            },
                        ]
                    },
                },
            ],
            "description": "Files of KEY=VALUE lines, relative to the stack file.",
        },
        "working_dir": {"type": "string", "pattern": "^/", "description": "Absolute working directory."},
        "user": {
            "type": ["string", "integer"],
            "description": 'A user name or uid, optionally ":group" or ":gid", resolved in the rootfs.',
        },
        "hostname": {
            "type": "string",
            "maxLength": 64,
            "description": "Host name (default: the service name).",
        },
        "aliases": {
            "type": "array",
            "items": {"type": "string", "maxLength": 64},
            "description": "More names the service answers to on the stack's network.",
        },
        "extra_hosts": {
            "oneOf": [
                {"type": "array", "items": {"type": "string", "pattern": "^[^:=]+[:=].+$"}},
                {"type": "object", "additionalProperties": {"type": "string"}},
            ],
            "description": 'More /etc/hosts lines: "name:1.2.3.4", or "name:host-gateway" for the host.',
        },
        "rootfs": {"type": "string", "description": '"host" (default: the host, read-only) or a directory.'},
        "volumes": {
            "type": "array",
            "items": {
                "oneOf": [
                    {"type": "string", "pattern": "^[^:]+:[^:]+(:(ro|rw))?$"},
                    {
                        "type": "object",
                        "properties": {
                            "type": {"enum": ["bind", "tmpfs"]},
                            "source": {"type": "string"},
                            "target": {"type": "string", "pattern": "^/"},
                            "read_only": {"type": "boolean"},
                            "tmpfs": {
                                "type": "object",
                                "properties": {"size": _SIZE, "mode": {"type": ["string", "integer"]}},
                                "additionalProperties": False,
                            },
                        },
                        "required": ["target"],
                        "additionalProperties": False,
                    },
                ]
            },
            "description": 'Bind mounts "SOURCE:TARGET[:ro]"; SOURCE is a path relative to the stack file.',
        },
        "tmpfs": {
            "oneOf": [{"type": "string"}, _STRING_LIST],
            "description": '"/path[:size=64m,mode=1777,noexec,...]".',
        },
        "read_only": {"type": "boolean", "description": "No writable layer over the rootfs."},
        "restart_backoff": {
            "type": "object",
            "properties": {
                "initial": {"type": "string", "description": 'First wait before a restart (default "100ms").'},
                "factor": {"type": "number", "minimum": 1, "maximum": 10, "description": "Growth per restart (2)."},
                "maximum": {"type": "string", "description": 'Longest wait (default "1m").'},
                "reset_after": {"type": "string", "description": 'A run this long ends the streak ("10s").'},
            },
            "additionalProperties": False,
            "description": "The backoff between restarts.",
        },
        "restart": {
            "oneOf": [
                {"type": "string", "pattern": "^(no|always|unless-stopped|on-failure(:[0-9]+)?)$"},
                {"const": False},  # what YAML makes of Compose's `restart: no`
            ],
            "description": '"no", "always", "on-failure[:N]" or "unless-stopped".',
        },
        "stop_signal": {
            "type": ["string", "integer"],
            "description": 'Signal sent first on stop ("SIGTERM").',
        },
        "stop_grace_period": {**_DURATION, "description": "How long to wait before SIGKILL (default 10s)."},
        "init": {"type": "boolean", "description": "Run a minimal init as pid 1 that reaps zombies."},
        "cpus": {"type": ["number", "string"], "description": "CPU quota, in CPUs (0.5 = half of one)."},
        "mem_limit": {**_SIZE, "description": "Memory limit (at least 6MiB)."},
        "memswap_limit": {
            "oneOf": [*_SIZE["oneOf"], {"const": -1}, {"const": "-1"}],
            "description": "Memory plus swap; -1 for unlimited swap.",
        },
        "pids_limit": {
            "oneOf": [
                {"type": "integer", "minimum": -1, "not": {"const": 0}},
                {"type": "string", "pattern": r"^\s*(-1|[1-9][0-9]*)\s*$"},
            ],
            "description": "Max processes.",
        },
        "ulimits": {
            "type": "object",
            "propertyNames": {"enum": list(ULIMITS)},
            "additionalProperties": {
                "oneOf": [
                    _RLIMIT,
                    {
                        "type": "object",
                        "properties": {"soft": _RLIMIT, "hard": _RLIMIT},
                        "required": ["soft", "hard"],
                        "additionalProperties": False,
                    },
                ]
            },
        },
        "sysctls": {
            **_KEY_VALUES,
            "description": "Namespaced sysctls only (net.*, IPC keys, kernel.domainname).",
        },
        "cap_add": {
            "oneOf": [{"type": "string"}, _STRING_LIST],
            "description": 'Capabilities to add ("NET_ADMIN", or "ALL").',
        },
        "cap_drop": {
            "oneOf": [{"type": "string"}, _STRING_LIST],
            "description": 'Capabilities to drop ("NET_RAW", or "ALL").',
        },
        "security_opt": {
            **_STRING_LIST,
            "description": '"no-new-privileges[:true|false]", "seccomp=unconfined|default|PATH".',
        },
        "network_mode": {
            "type": "string",
            "pattern": "^(bridge|none|host|service:.+)$",
            "description": '"bridge" (default), "none", "host" or "service:NAME".',
        },
        "ports": {
            "type": "array",
            "items": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "integer", "minimum": 1, "maximum": 65535},
                    {
                        "type": "object",
                        "properties": {
                            "target": {"type": ["integer", "string"]},
                            "published": {"type": ["integer", "string"]},
                            "host_ip": {"type": "string"},
                            "protocol": {"enum": ["tcp", "udp"]},
                            "mode": {"type": "string"},
                            "name": {"type": "string"},
                            "app_protocol": {"type": "string"},
                        },
                        "required": ["target"],
                        "additionalProperties": False,
                    },
                ]
            },
            "description": '"[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/udp]"; the host address defaults to 127.0.0.1.',
        },
        "depends_on": {
            "oneOf": [
                _STRING_LIST,
                {
                    "type": "object",
                    "additionalProperties": {
                        "oneOf": [
                            _CONDITION,
                            {
                                "type": "object",
                                "properties": {
                                    "condition": _CONDITION,
                                    "required": {"type": "boolean"},
                                    "restart": {"type": "boolean"},
                                },
                                "additionalProperties": False,
                            },
                        ]
                    },
                },
            ]
        },
        "healthcheck": {
            "type": "object",
            "properties": {
                "test": {"oneOf": [{"type": "string"}, {**_STRING_LIST, "minItems": 1}]},
                "interval": _DURATION,
                "timeout": _DURATION,
                "retries": {"type": "integer", "minimum": 1},
                "start_period": _DURATION,
                "start_interval": _DURATION,
                "disable": {"type": "boolean"},
                "on_unhealthy": {
                    "enum": ["ignore", "restart"],
                    "description": 'What an unhealthy service gets: "ignore" (reported only) or "restart".',
                },
            },
            "additionalProperties": False,
        },
        "labels": _KEY_VALUES,
        "userns_mode": {
            "enum": ["host", "private"],
            "description": '"private": a user namespace; root inside is an unprivileged host range.',
        },
        "time_offsets": {
            "type": "object",
            "properties": {"monotonic": {"type": ["string", "number"]}, "boottime": {"type": ["string", "number"]}},
            "additionalProperties": False,
            "description": "Offsets of the service's monotonic and boot-time clocks (a time namespace).",
        },
    }
    return {
        "type": "object",
        "properties": properties,
        "patternProperties": {"^x-": {}},
        "additionalProperties": False,
        "anyOf": [{"required": ["command"]}, {"required": ["entrypoint"]}],
    }


def stack_schema() -> dict[str, Any]:
    """The JSON Schema of a stack file."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "stackd stack file",
        "description": "A stack of services run by stackd. See docs/stack-file.md.",
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$", "maxLength": 63},
            "version": {"description": "Obsolete, ignored (as in Compose)."},
            "network": {
                "type": "object",
                "properties": {
                    "subnet": {"type": "string", "description": 'A private IPv4 subnet, "10.77.0.0/24".'},
                    "outbound": {
                        "type": "boolean",
                        "description": "Let services reach beyond the host (NAT through the host; default false).",
                    },
                },
                "patternProperties": {"^x-": {}},
                "additionalProperties": False,
            },
            "services": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": "^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"},
                "additionalProperties": _service_schema(),
            },
        },
        "patternProperties": {"^x-": {}},
        "required": ["services"],
        "additionalProperties": False,
    }
