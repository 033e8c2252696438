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
    return groups


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
    lines += tables(groups)
    return lines


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
    return [
        "# Rows from a second machine",
        "",
        "The same bench binaries, built on the machine above and run on a second one:",
        f"`{lscpu_field(info, 'Model name')}`, {cores} cores, "
        f"{lscpu_field(info, 'Thread(s) per core')} thread(s) per core. Rows up to {cores}",
        "threads measure scaling on that machine. Which groups ran there, and how often,",
        "is in the notes above.",
        "",
    ] + tables(groups)


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
