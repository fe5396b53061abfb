"""Lifecycle keys: `restart`, `depends_on` and `healthcheck`."""

from __future__ import annotations

import re
from typing import cast

from stackd.spec.context import Context
from stackd.spec.models import Condition, Dependency, Healthcheck, RestartBackoff, RestartMode, RestartPolicy
from stackd.spec.problems import Invalid, did_you_mean, one_of, show, type_name
from stackd.spec.units import parse_duration
from stackd.spec.values import boolean, expect, integer, string

_RESTART = re.compile(r"^(no|always|unless-stopped|on-failure)(?::(\d+))?$")


def restart(value: object, ctx: Context) -> RestartPolicy:
    text = "no" if value is False else cast(str, expect(value, str, "a restart policy"))
    match = _RESTART.match(text)
    if not match or (match.group(2) is not None and match.group(1) != "on-failure"):
        raise Invalid(
            f'{show(value)} is not a restart policy (allowed: "no", "always", "on-failure", '
            '"on-failure:N", "unless-stopped")'
        )
    retries = int(match.group(2)) if match.group(2) is not None else None
    return RestartPolicy(cast(RestartMode, match.group(1)), retries)


_BACKOFF_KEYS = ("initial", "factor", "maximum", "reset_after")


def restart_backoff(value: object, ctx: Context) -> RestartBackoff | None:
    """`restart_backoff = { initial = "100ms", factor = 2, maximum = "1m", reset_after = "10s" }`."""
    table = expect(value, dict, "a table { initial, factor, maximum, reset_after }")
    values: dict[str, float] = {}
    for key, raw in table.items():
        if key not in _BACKOFF_KEYS:
            allowed = one_of(_BACKOFF_KEYS)
            ctx.problem(f'unknown key "{key}"{did_you_mean(key, _BACKOFF_KEYS)} (allowed: {allowed})', (key,))
        elif key == "factor":
            if isinstance(raw, bool) or not isinstance(raw, int | float) or not 1 <= raw <= 10:
                ctx.problem(f"expected a number from 1 to 10, got {show(raw)}", (key,))
            else:
                values[key] = float(raw)
        else:
            seconds = ctx.at(key).attempt(parse_duration, raw)
            if seconds is not None:
                values[key] = seconds
    if "maximum" not in values and values.get("initial", 0) > RestartBackoff().maximum:
        values["maximum"] = values["initial"]
    backoff = RestartBackoff(**values)
    if backoff.initial <= 0:
        ctx.problem("must be more than 0 (a crash loop must never busy-loop)", ("initial",))
        return None
    if backoff.maximum < backoff.initial:
        ctx.problem(f"is below initial ({table.get('initial')})", ("maximum",))
        return None
    return backoff if len(values) == len(table) else None


_CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


def parse_condition(value: object) -> Condition:
    text = cast(str, expect(value, str, "a condition"))
    full = text if text.startswith("service_") else f"service_{text}"
    if full not in _CONDITIONS:
        raise Invalid(
            f"{show(text)} is not a condition{did_you_mean(full, _CONDITIONS)} (allowed: {one_of(_CONDITIONS)})"
        )
    return cast(Condition, full)


def depends_on(value: object, ctx: Context) -> dict[str, Dependency]:
    if isinstance(value, list):
        names = ctx.each(value, string)
        return {name: Dependency() for name in names}
    result: dict[str, Dependency] = {}
    for name, raw in expect(value, dict, "an array of service names or a table").items():
        inner = ctx.at(name)
        if isinstance(raw, str):
            condition = inner.attempt(parse_condition, raw)
            if condition:
                result[name] = Dependency(condition)
            continue
        if not isinstance(raw, dict):
            inner.problem(f'expected a condition or {{ condition = "service_healthy" }}, got {type_name(raw)}')
            continue
        unknown = [key for key in raw if key not in ("condition", "required", "restart")]
        for key in unknown:
            inner.problem(f'unknown key "{key}"{did_you_mean(key, ("condition", "required", "restart"))}', (key,))
        condition = inner.at("condition").attempt(parse_condition, raw.get("condition", "service_started"))
        required = inner.at("required").attempt(boolean, raw.get("required", True), inner)
        restart = inner.at("restart").attempt(boolean, raw.get("restart", False), inner)
        if condition is not None and required is not None and restart is not None and not unknown:
            result[name] = Dependency(condition, required, restart)
    return result


_HEALTH_KEYS = ("test", "interval", "timeout", "retries", "start_period", "start_interval", "disable", "on_unhealthy")
_ON_UNHEALTHY = ("ignore", "restart")


def healthcheck(value: object, ctx: Context) -> Healthcheck | None:
    table = expect(value, dict, "a table")
    for key in table:
        if key not in _HEALTH_KEYS:
            ctx.problem(
                f'unknown key "{key}"{did_you_mean(key, _HEALTH_KEYS)} (allowed: {one_of(_HEALTH_KEYS)})',
                (key,),
            )
    if ctx.at("disable").attempt(boolean, table.get("disable", False), ctx):
        return None
    if "test" not in table:
        raise Invalid('a healthcheck needs a "test" (or disable = true)')
    test = ctx.at("test").attempt(_health_test, table["test"], ctx.at("test"))
    durations = {}
    for key, default, minimum in (
        ("interval", 30.0, 0.001),
        ("timeout", 30.0, 0.001),
        ("start_period", 0.0, 0.0),
        ("start_interval", 5.0, 0.001),
    ):
        seconds = ctx.at(key).attempt(parse_duration, table.get(key, default))
        if seconds is not None and seconds < minimum:
            ctx.problem(f"must be at least {minimum * 1000:g}ms", (key,))
        durations[key] = seconds
    retries = ctx.at("retries").attempt(integer, table.get("retries", 3), "a number of retries")
    if retries is not None and retries < 1:
        ctx.problem(f"{retries} is not a number of retries (at least 1)", ("retries",))
    on_unhealthy = table.get("on_unhealthy", "ignore")
    if on_unhealthy not in _ON_UNHEALTHY:
        ctx.problem(f"{show(on_unhealthy)} is not an action (allowed: {one_of(_ON_UNHEALTHY)})", ("on_unhealthy",))
        return None
    if test is None or retries is None or None in durations.values():
        return None
    argv, shell = test
    return Healthcheck(argv, shell, retries=retries, on_unhealthy=on_unhealthy, **cast(dict[str, float], durations))


def _health_test(value: object, ctx: Context) -> tuple[tuple[str, ...], bool] | None:
    if isinstance(value, str):
        if not value.strip():
            raise Invalid("must not be empty")
        return ("/bin/sh", "-c", value), True
    items = ctx.each(expect(value, list, 'a string or ["CMD", ...] / ["CMD-SHELL", "..."]'), string)
    if not items:
        raise Invalid("must not be empty")
    if items[0] == "NONE":
        return None
    if items[0] == "CMD-SHELL":
        if len(items) != 2:
            raise Invalid('["CMD-SHELL", "..."] takes exactly one command string')
        if not items[1].strip():
            raise Invalid("the CMD-SHELL command must not be empty")
        return ("/bin/sh", "-c", items[1]), True
    argv = items[1:] if items[0] == "CMD" else items
    if not argv:
        raise Invalid('["CMD"] needs a command after it')
    return tuple(argv), False
