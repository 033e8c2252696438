#!/usr/bin/env python3
"""Writes BENCHMARKS.md from criterion's results in target/criterion.

Run `cargo bench` (or one bench file) first, then:

    python3 scripts/bench-report.py [--out BENCHMARKS.md]

For every group (and every parameter value within a group) it prints the
median time per iteration of each implementation and the ratio toctou / that
implementation (the toctou row's median over the row's median: lower is better
for toctou, the direction the summary in benches/NOTES.md uses), plus the
machine (cores, CPU model) and the date.

On a noisy machine, repeat the run under several criterion baselines and
aggregate them; each row then shows the median and the range of the per-run
medians, and ratios use the median of medians:

    for i in 1 2 3 4 5; do cargo bench --bench singleton -- --save-baseline run$i; done
    python3 scripts/bench-report.py --baselines run1,run2,run3,run4,run5
"""
import argparse
import datetime
import glob
import json
import os
import platform
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_ns(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.2f} ns"


# The toctou row that each group's ratios put over the other rows, where a group
# has several toctou rows.
REFERENCE = {
    "singleton_get_initialised": "toctou::Singleton::get",
    "singleton_map_hit": "toctou::SingletonMap::get_or_init",
    "singleton_map_hit_parallel": "toctou::SingletonMap::get_or_init",
    "registry_get": "toctou::RegistryCell::get",
    "registry_get_arc": "toctou::RegistryCell::get_arc",
    "registry_get_parallel": "toctou::RegistryCell::get",
    "registry_get_scaling": "toctou::RegistryCell::get",
    "registry_reinit": "toctou::RegistryCell::get + reinit",
    "keyed_fresh_key": "toctou::KeyedLocks::lock",
    "keyed_beside_held_keys": "toctou::KeyedLocks::lock",
    "keyed_disjoint_parallel": "toctou::KeyedLocks::lock",
    "keyed_hot_key_parallel": "toctou::KeyedLocks::lock",
    "file_locks_fresh_key": "toctou::FileLocks::lock (deleting)",
    "file_locks_existing_key": "toctou::FileLocks::lock (keep_files)",
    "file_locks_hot_key_2_threads": "toctou::FileLocks::lock (deleting)",
    "file_locks_cross_process": "toctou::FileLocks::lock (deleting)",
}


# Where the scaling plots go (SVG files, linked from BENCHMARKS.md).
PLOTS = os.path.join("benches", "plots")
# Lines in a plot: toctou's rows solid and thick, the machine's ceiling (a row
# whose name starts with "ceiling") dashed, the other baselines thin.
COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e"]

# Elements (lock+unlock pairs, reads, ...) per iteration, by (group, value,
# function): the throughput criterion was told, for the plots.
ELEMENTS = {}


def load(criterion_dir, baselines):
    """{(group, value): {function: [median_ns per baseline]}}."""
    groups = defaultdict(lambda: defaultdict(list))
    for baseline in baselines:
        pattern = f"{criterion_dir}/**/{baseline}/benchmark.json"
        for bench_json in sorted(glob.glob(pattern, recursive=True)):
            with open(bench_json) as f:
                meta = json.load(f)
            with open(os.path.join(os.path.dirname(bench_json), "estimates.json")) as f:
                median = json.load(f)["median"]["point_estimate"]
            key = (meta["group_id"], meta.get("value_str"))
            groups[key][meta["function_id"]].append(median)
            elements = (meta.get("throughput") or {}).get("Elements")
            if elements:
                ELEMENTS[(criterion_dir, *key, meta["function_id"])] = elements
    return groups


def scaling_groups(groups):
    """{group: {function: {threads: [median_ns per run]}}} for the groups
    whose parameter is a thread count (1, 2, 4, ...)."""
    out = defaultdict(lambda: defaultdict(dict))
    for (group, value), rows in groups.items():
        if not (value or "").isdigit():
            continue
        for name, meds in rows.items():
            out[group][name][int(value)] = meds
    return {g: rows for g, rows in out.items()
            if len({t for r in rows.values() for t in r}) > 1}


def svg_plot(group, rows, criterion_dir, machine):
    """One SVG line plot: throughput (million operations per second, from
    the median of the runs' medians) against threads, one line per
    implementation; the x axis is logarithmic (1, 2, 4, ...)."""
    width, height = 720, 430
    left, right, top, bottom = 70, 250, 40, 50
    threads = sorted({t for r in rows.values() for t in r})
    series = {}
    for name, by_threads in rows.items():
        pts = []
        for t in threads:
            if t not in by_threads:
                continue
            elements = ELEMENTS.get((criterion_dir, group, str(t), name))
            if not elements:
                continue
            pts.append((t, elements / median(by_threads[t]) * 1e3))  # Mops/s
        if pts:
            series[name] = pts
    if not series:
        return None
    ymax = max(y for pts in series.values() for _, y in pts) * 1.1
    import math
    lo, hi = math.log2(threads[0]), math.log2(threads[-1])

    def x(t):
        return left + (math.log2(t) - lo) / ((hi - lo) or 1) * (width - left - right)

    def y(v):
        return top + (1 - v / ymax) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14" font-weight="bold">{group}</text>',
           f'<text x="{left}" y="34" fill="#555">{machine}</text>']
    # Axes and grid.
    for i in range(6):
        v = ymax / 1.1 * i / 5
        out.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for t in threads:
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{height - bottom}" stroke="#eee"/>')
        out.append(f'<text x="{x(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t}</text>')
    out.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 12}" text-anchor="middle">threads</text>')
    out.append(f'<text transform="translate(16,{(top + height - bottom) / 2:.0f}) rotate(-90)" '
               'text-anchor="middle">million operations per second (higher is better)</text>')
    names = sorted(series, key=lambda n: (not n.startswith("toctou"), n.startswith("ceiling"), n))
    for i, name in enumerate(names):
        colour = COLOURS[i % len(COLOURS)]
        dash = ' stroke-dasharray="6,4"' if name.startswith("ceiling") else ""
        w = 3 if name.startswith("toctou") else 1.5
        pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in series[name])
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="{w}"{dash}/>')
        for t, v in series[name]:
            out.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
        ly = top + 14 + i * 18
        out.append(f'<line x1="{width - right + 12}" y1="{ly - 4}" x2="{width - right + 36}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="{w}"{dash}/>')
        label = name if len(name) <= 30 else name[:29] + "…"
        label = label.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        out.append(f'<text x="{width - right + 42}" y="{ly}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def plots(groups, criterion_dir, machine, suffix, out_dir):
    """Writes an SVG per scaling group; returns Markdown lines linking them."""
    lines = []
    for group, rows in sorted(scaling_groups(groups).items()):
        svg = svg_plot(group, rows, criterion_dir, machine)
        if svg is None:
            continue
        name = f"{group}{suffix}.svg"
        os.makedirs(os.path.join(out_dir, PLOTS), exist_ok=True)
        with open(os.path.join(out_dir, PLOTS, name), "w") as f:
            f.write(svg)
        lines += [f"![{group}: throughput against threads]({PLOTS}/{name})", ""]
    return lines


def median(xs):
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def render(groups, notes):
    cores = os.cpu_count()
    lines = [
        "# Benchmarks",
        "",
        f"Generated {datetime.date.today().isoformat()} by `scripts/bench-report.py` from criterion's",
        "`target/criterion/**/estimates.json`, on:",
        "",
        f"- CPU: {cpu_model()}",
        f"- cores: {cores}",
        f"- OS: {platform.system()} {platform.release()}",
        "",
        "Absolute numbers depend on the machine (this one is a shared 2-core VM, so",
        "expect ±10-20% noise between runs on nanosecond timings); the ratios,",
        "measured side by side in one criterion run, are the point. Each table is",
        "one criterion group; its ratios are toctou / baseline, as in the summary:",
        "the toctou row's median over the row's median. Lower is better for toctou",
        "(below 1.00, toctou is faster than that row; above 1.00, slower).",
        f"Rows with more threads than the machine's {cores} cores measure",
        "oversubscription, not scaling.",
        "",
    ]
    lines += notes
    machine = f"{cpu_model()}, {cores} cores"
    plot_lines = plots(groups, CRITERION_DIR[0], machine, "", OUT_DIR[0])
    if plot_lines:
        lines += ["# Scaling plots", "",
                  "Throughput against threads for each multi-threaded group, from the median",
                  "of the runs' medians (the tables below have the numbers). A line that",
                  "stays flat does not scale; the dashed line, where a group has one, is",
                  "the machine's ceiling (no sharing at all).", ""] + plot_lines
    lines += tables(groups)
    return lines


# The criterion directory and the output directory of this run (set in main).
CRITERION_DIR = [None]
OUT_DIR = [None]


def tables(groups):
    """One Markdown table per (group, parameter), each under a `##` heading."""
    lines = []
    for (group, value) in sorted(groups, key=lambda k: (k[0], int(k[1]) if (k[1] or "").isdigit() else 0)):
        rows = groups[(group, value)]
        # toctou rows first, then the baselines, each alphabetically.
        names = sorted(rows, key=lambda n: (not n.startswith("toctou"), n))
        ref = REFERENCE.get(group) if REFERENCE.get(group) in rows else next(
            (n for n in names if n.startswith("toctou")), None)
        runs = max(len(v) for v in rows.values())
        title = f"`{group}`" + (f", {value} threads" if value else "")
        lines += [f"## {title}", ""]
        if runs > 1:
            lines += [f"Median of {runs} runs' medians, and the range from the lowest to the highest",
                      "run. Noise only ever adds time, so the ratio of the lowest runs is shown too.",
                      ""]
        lines += [f"| implementation | median | range | `{ref}` / this row (lower is better) "
                  "| the same, lowest runs |",
                  "|---|---:|---:|---:|---:|"]
        for name in names:
            meds = rows[name]
            # toctou / this row: the summary's direction, lower is better for toctou.
            ratio = f"{median(rows[ref]) / median(meds):.3f}" if ref else "n/a"
            low_ratio = f"{min(rows[ref]) / min(meds):.3f}" if ref else "n/a"
            lines.append(f"| `{name}` | {fmt_ns(median(meds))} | "
                         f"{fmt_ns(min(meds))} – {fmt_ns(max(meds))} | {ratio} | {low_ratio} |")
        lines.append("")
    return lines


def lscpu_field(text, field):
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def second_machine(criterion_dir, baselines, info_file):
    """A section with the tables measured on another machine."""
    groups = load(criterion_dir, baselines)
    if not groups:
        raise SystemExit(f"no criterion results under {criterion_dir}")
    info = open(info_file).read()
    cores = lscpu_field(info, "CPU(s)")
    machine = f"{lscpu_field(info, 'Model name')}, {cores} cores"
    plot_lines = plots(groups, criterion_dir, machine, "-second-machine", OUT_DIR[0])
    return [
        "# Rows from a second machine",
        "",
        "The same bench binaries, built on the machine above and run on a second one:",
        f"`{lscpu_field(info, 'Model name')}`, {cores} cores, "
        f"{lscpu_field(info, 'Thread(s) per core')} thread(s) per core. Rows up to {cores}",
        "threads measure scaling on that machine. Which groups ran there, and how often,",
        "is in the notes above.",
        "",
    ] + plot_lines + tables(groups)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--criterion-dir", default=os.path.join(ROOT, "target", "criterion"))
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--notes", help="a Markdown file whose text goes above the tables")
    ap.add_argument("--baselines", default="new",
                    help="comma-separated criterion baselines to aggregate (default: the last run)")
    ap.add_argument("--second-machine", metavar="DIR",
                    help="a criterion directory from another machine, reported in its own section")
    ap.add_argument("--second-baselines", default="new",
                    help="comma-separated baselines in --second-machine")
    ap.add_argument("--second-machine-info", metavar="FILE",
                    help="that machine's `lscpu` output (CPU model and core count)")
    args = ap.parse_args()
    if args.second_machine and not args.second_machine_info:
        ap.error("--second-machine needs --second-machine-info")
    CRITERION_DIR[0] = args.criterion_dir
    OUT_DIR[0] = os.path.dirname(os.path.abspath(args.out))
    groups = load(args.criterion_dir, args.baselines.split(","))
    if not groups:
        raise SystemExit(f"no criterion results under {args.criterion_dir}: run `cargo bench` first")
    notes = open(args.notes).read().splitlines() + [""] if args.notes else []
    lines = render(groups, notes)
    if args.second_machine:
        lines += second_machine(args.second_machine, args.second_baselines.split(","),
                                args.second_machine_info)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out} ({len(groups)} tables)")


if __name__ == "__main__":
    main()
