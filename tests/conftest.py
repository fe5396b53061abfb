"""Suite-wide fixtures: every test runs under the host leak check (stackd.testing.leaks).

A test that leaves a network namespace, link, stackd cgroup, mount, process in a stackd cgroup, or
state/log directory behind fails at teardown with a list of what it left.
"""

from __future__ import annotations

import os

import pytest

from stackd.testing.leaks import make_leak_check

if os.geteuid() != 0:
    pytest.exit("the stackd test suite runs as root: it creates namespaces, bridges and cgroups", returncode=4)

leak_check = make_leak_check(autouse=True)
