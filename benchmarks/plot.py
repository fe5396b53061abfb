"""Plot `up` time against the number of services, stackd beside its peers, as a hand-written SVG.

    python benchmarks/stack.py --sizes 1,10,25,50 --runs 5 --json > stack.json
    python benchmarks/plot.py stack.json -o docs/performance-startup.svg
    python benchmarks/plot.py stack.json --metric down -o down.svg

Reads the JSON of benchmarks/stack.py. One line per row (stackd, docker-compose, podman-compose, ...;
one colour and marker per tool, solid on the stack's bridge network, dashed without a network) through
the medians, with a whisker from the fastest to the slowest run at each size; a logarithmic time axis
(the rows differ by more than a factor of ten), a linear axis of services, a legend, and the 1 s target
of design.md §5 (which is for 50 services) as a dashed line. Only the standard library.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from html import escape
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 940, 480
LEFT, RIGHT, TOP, BOTTOM = 78, 300, 52, 62
COLOURS = {
    "stackd": "#1f77b4",
    "docker-compose": "#d62728",
    "docker compose v2": "#ff7f0e",
    "podman-compose": "#9467bd",
}
SPARE = ["#2ca02c", "#8c564b", "#e377c2", "#7f7f7f"]
MARKERS = {"stackd": "circle", "docker-compose": "square", "docker compose v2": "diamond", "podman-compose": "triangle"}
TICKS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200]


def seconds_label(value: float) -> str:
    return f"{value * 1000:g} ms" if value < 1 else f"{value:.3g} s"


def nice_step(span: float) -> float:
    """A step for about 5 to 10 ticks over `span`: 1, 2 or 5 times a power of ten."""
    raw = span / 6
    power = 10.0 ** math.floor(math.log10(raw))
    return next(power * m for m in (1, 2, 5, 10) if power * m >= raw)


def marker(shape: str, x: float, y: float, colour: str) -> str:
    if shape == "square":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}"/>'
    if shape == "diamond":
        return f'<path d="M{x:.1f} {y - 5.5:.1f}l5.5 5.5l-5.5 5.5l-5.5-5.5z" fill="{colour}"/>'
    if shape == "triangle":
        return f'<path d="M{x:.1f} {y - 5.5:.1f}l5.5 9.5h-11z" fill="{colour}"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/>'


def render(result: dict[str, Any], metric: str = "up") -> str:
    key = f"{metric}_s"
    rows = [row for row in result["rows"] if row["points"]]
    if not rows:
        raise SystemExit("plot.py: no measured rows in the JSON")
    values = [p[key][stat] for row in rows for p in row["points"] for stat in ("min", "max")]
    sizes = sorted({p["services"] for row in rows for p in row["points"]})
    low = 10 ** math.floor(math.log10(min(values)))
    high = 10 ** math.ceil(math.log10(max(max(values), 1.0)))
    x_max: float = max(sizes)
    x_step = nice_step(x_max)
    x_max = float(math.ceil(x_max / x_step) * x_step)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(services: float) -> float:
        return LEFT + services / x_max * plot_w

    def py(seconds: float) -> float:
        return TOP + (math.log10(high) - math.log10(seconds)) / (math.log10(high) - math.log10(low)) * plot_h

    what = "up until every service runs" if metric == "up" else "down (stop and remove everything)"
    info = result.get("machine", {})
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="24" font-size="15" font-weight="bold">'
        f"{escape(what[0].upper() + what[1:])}, against the number of services</text>",
        f'<text x="{LEFT}" y="41" fill="#555">median of {result.get("runs", "?")} runs, whiskers min-max; busybox '
        f"services; {info.get('cpus', '?')} CPUs, Linux {escape(str(info.get('kernel', '?')))}; "
        f"{escape(str(result.get('date', ''))[:10])}</text>",
    ]
    # grid and axes
    for tick in TICKS:
        if low <= tick <= high:
            y = py(tick)
            out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#e3e3e3"/>')
            out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{seconds_label(tick)}</text>')
    tick_x = 0.0
    while tick_x <= x_max + 1e-9:
        x = px(tick_x)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{tick_x:g}</text>')
        tick_x += x_step
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 16}" text-anchor="middle">services in the stack</text>')
    out.append(
        f'<text transform="translate(20 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
        f"time to {'all running' if metric == 'up' else 'all removed'} (log scale)</text>"
    )
    # the target (1 s for 50 services)
    if low <= 1 <= high:
        y = py(1)
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#2ca02c" '
            'stroke-width="1.5" stroke-dasharray="6 4"/>'
        )
        out.append(
            f'<text x="{LEFT + plot_w - 6}" y="{y - 6:.1f}" fill="#2ca02c" text-anchor="end">'
            "target: 1 s for 50 services (design.md)</text>"
        )
    # the rows
    legend_y = TOP + 8
    labels: list[tuple[float, str, str]] = []  # (y, text, colour) at the right end of each line
    for index, row in enumerate(rows):
        tool = row.get("tool", row["name"])
        colour = COLOURS.get(tool, SPARE[index % len(SPARE)])
        shape = MARKERS.get(tool, "circle")
        dash = ' stroke-dasharray="7 4"' if row.get("network") == "none" else ""
        points = sorted(row["points"], key=lambda p: p["services"])
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{px(p['services']):.1f} {py(p[key]['median']):.1f}" for i, p in enumerate(points)
        )
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for p in points:
            x = px(p["services"])
            lo, hi = py(p[key]["min"]), py(p[key]["max"])
            out.append(f'<line x1="{x:.1f}" y1="{lo:.1f}" x2="{x:.1f}" y2="{hi:.1f}" stroke="{colour}"/>')
            out.append(marker(shape, x, py(p[key]["median"]), colour))
        last = points[-1]
        labels.append((py(last[key]["median"]) + 4, seconds_label(round(last[key]["median"], 3)), colour))
        # legend, right of the plot
        lx = LEFT + plot_w + 66
        out.append(
            f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 22}" y2="{legend_y}" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        out.append(marker(shape, lx + 11, legend_y, colour))
        out.append(f'<text x="{lx + 28}" y="{legend_y + 4}">{escape(row["name"])}</text>')
        legend_y += 22
    # the values at the right end, pushed apart where lines end close together
    previous = -1e9
    for y, text, colour in sorted(labels):
        y = max(y, previous + 13)
        previous = y
        out.append(f'<text x="{LEFT + plot_w + 8}" y="{y:.1f}" fill="{colour}">{text}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("json", nargs="?", help="the JSON of benchmarks/stack.py (default: stdin)")
    parser.add_argument("-o", "--output", help="the SVG file to write (default: stdout)")
    parser.add_argument("--metric", choices=("up", "down"), default="up")
    args = parser.parse_args(argv)
    text = Path(args.json).read_text() if args.json else sys.stdin.read()
    svg = render(json.loads(text), args.metric)
    if args.output:
        Path(args.output).write_text(svg)
    else:
        sys.stdout.write(svg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
