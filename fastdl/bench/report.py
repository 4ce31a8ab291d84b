"""Present a :class:`~fastdl.bench.runner.BenchmarkRun`: a text table, a JSON file with every timing and a
PNG per suite."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fastdl.bench.machine import short_machine_description
from fastdl.bench.runner import BenchmarkRun, CaseResult

JSON_SCHEMA_VERSION = 1
FASTDL_COLOR = "#d1495b"
PEER_COLORS = ("#b8c4ce", "#7d8b99", "#4a5d6e", "#2f4858", "#9aa5b1")


def _suites_in_order(run: BenchmarkRun) -> list[str]:
    return list(dict.fromkeys(result.suite for result in run.results))


def _contender_names(results: list[CaseResult]) -> list[str]:
    return list(dict.fromkeys(contender.name for result in results for contender in result.contenders))


def _format_cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _format_ms(value: float | None) -> str:
    # Two decimals hide microsecond-scale cases, so below 1 ms keep three significant digits.
    return _format_cell(value, ".2f" if value is None or value >= 1 else "#.3g")


def format_header(run: BenchmarkRun) -> str:
    return (f"fastdl {run.machine['fastdl_version']} bench on {run.device}: "
            f"{short_machine_description(run.machine)}\n"
            f"memory bandwidth (copy): {run.bandwidth.gb_per_s:.1f} GB/s median, "
            f"{run.bandwidth.best_gb_per_s:.1f} GB/s best  [{run.bandwidth.method}]"
            + ("\n--quick: small shapes that may fit in cache, so GB/s and % bw are not DRAM numbers; "
               "a smoke run, not a measurement" if run.quick else ""))


def format_table(run: BenchmarkRun) -> str:
    """One plain-text table per suite: median ms of every contender (* marks the fastest), fastdl's
    ratio to the fastest peer, its GB/s and share of the measured bandwidth, and the floor."""
    blocks = [format_header(run)]
    for suite in _suites_in_order(run):
        results = [result for result in run.results if result.suite == suite]
        names = _contender_names(results)
        header = ["case", *names, "fastdl/best", "fastdl GB/s", "% bw", "floor ms"]
        rows = []
        for result in results:
            by_name = {contender.name: contender for contender in result.contenders}
            timed = [c.median_ms for c in result.contenders if c.median_ms is not None]
            fastest = min(timed, default=None)
            cells = [result.case]
            for name in names:
                contender = by_name.get(name)
                median = None if contender is None else contender.median_ms
                mark = "*" if median is not None and median == fastest else ""
                cells.append(_format_ms(median) + mark)
            fastdl = result.fastdl
            cells += [
                _format_cell(result.ratio_vs_best_peer, ".2f"),
                _format_cell(None if fastdl is None else result.gb_per_s(fastdl), ".1f"),
                _format_cell(None if fastdl is None else run.percent_of_bandwidth(result, fastdl), ".0f"),
                _format_ms(run.floor_ms(result)),
            ]
            rows.append(cells)
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        block = [f"\n[{suite}] median ms of {run.repeat} calls after {run.warmup} warm-up; * fastest; "
                 f"fastdl/best < 1 means fastdl wins; floor ms = bytes / bandwidth",
                 _line(header, widths), _line(["-" * width for width in widths], widths),
                 *(_line(row, widths) for row in rows)]
        for case_names, contender, error in _errors(results):
            block.append(f"  ! {contender} failed on {', '.join(case_names)}: {error}")
        blocks.append("\n".join(block))
    return "\n".join(blocks)


def _line(cells: list[str], widths: list[int]) -> str:
    """The case name left-aligned, numbers right-aligned."""
    return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                     for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()


def _errors(results: list[CaseResult]) -> list[tuple[list[str], str, str]]:
    """(cases, contender, error), one entry per distinct error, so a missing class is reported once."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for result in results:
        for contender in result.contenders:
            if contender.error is not None:
                grouped.setdefault((contender.name, contender.error), []).append(result.case)
    return [(cases, name, error) for (name, error), cases in grouped.items()]


def to_json_dict(run: BenchmarkRun) -> dict:
    """Everything measured, with the derived numbers beside the raw times."""
    cases = []
    for result in run.results:
        contenders = []
        for contender in result.contenders:
            contenders.append({
                **asdict(contender),
                "median_ms": contender.median_ms,
                "gb_per_s": result.gb_per_s(contender),
                "percent_of_bandwidth": run.percent_of_bandwidth(result, contender),
            })
        best_peer = result.best_peer
        cases.append({
            "suite": result.suite,
            "case": result.case,
            "description": result.description,
            "params": result.params,
            "bytes_per_step": result.bytes_per_step,
            "floor_ms": run.floor_ms(result),
            "best_peer": None if best_peer is None else best_peer.name,
            "ratio_vs_best_peer": result.ratio_vs_best_peer,
            "contenders": contenders,
        })
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "started_at": run.started_at,
        "command": run.command,
        "device": run.device,
        "quick": run.quick,
        "repeat": run.repeat,
        "warmup": run.warmup,
        "machine": run.machine,
        "memory_bandwidth": asdict(run.bandwidth),
        "cases": cases,
    }


def write_json(run: BenchmarkRun, path: Path) -> None:
    path.write_text(json.dumps(to_json_dict(run), indent=2, default=str) + "\n")


def plot_suite(run: BenchmarkRun, suite: str, path: Path) -> None:
    """One panel per case (each with its own time axis, since cases differ by 10x): a bar per
    contender, fastdl in color, and the bandwidth floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [result for result in run.results if result.suite == suite]
    names = _contender_names(results)
    fastdl_names = {c.name for result in results for c in result.contenders if c.is_fastdl}
    peers = [name for name in names if name not in fastdl_names]
    colors = {name: FASTDL_COLOR for name in fastdl_names}
    colors.update({name: PEER_COLORS[i % len(PEER_COLORS)] for i, name in enumerate(peers)})

    panel_height = 0.32 * len(names) + 0.75
    figure_size = (9, 0.9 + panel_height * len(results))
    figure, axes = plt.subplots(len(results), 1, figsize=figure_size, squeeze=False)
    for axis, result in zip(axes[:, 0], results):
        by_name = {c.name: c for c in result.contenders}
        labels = [name for name in names if name in by_name]
        values = [by_name[name].median_ms or 0.0 for name in labels]
        # Whiskers span the middle half of the calls (25th to 75th percentile): how noisy the median is.
        spreads = np.array([[value - q25, q75 - value] if by_name[name].times_ms else [0.0, 0.0]
                            for name, value in zip(labels, values)
                            for q25, q75 in [np.percentile(by_name[name].times_ms or [0.0], [25, 75])]]).T
        positions = range(len(labels))[::-1]  # first contender on top
        axis.barh(list(positions), values, xerr=spreads, color=[colors[name] for name in labels], height=0.7,
                  error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"})
        # The axis fits the medians, not the whiskers: on a loaded machine one slow call would squash
        # every bar. Values sit in a column right of the axis, where no bar or whisker reaches.
        longest = max(values + [run.floor_ms(result)])
        for position, name, value in zip(positions, labels, values):
            text = "failed" if by_name[name].median_ms is None else f"{_format_ms(value)} ms"
            axis.text(1.01, position, text, va="center", fontsize=8, transform=axis.get_yaxis_transform())
        axis.axvline(run.floor_ms(result), color="black", linestyle="--", linewidth=1)
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.set_xlim(0, longest * 1.08)
        ratio = result.ratio_vs_best_peer
        ratio_text = "" if ratio is None else f"   fastdl / best peer = {ratio:.2f}"
        axis.set_title(f"{result.case}: {result.description}{ratio_text}", fontsize=9, loc="left")
        axis.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel(f"median time per call, ms ({run.repeat} calls; whiskers: 25th-75th percentile)")
    figure.suptitle(f"fastdl bench {suite} on {run.device}: {short_machine_description(run.machine)}\n"
                    f"copy bandwidth {run.bandwidth.gb_per_s:.1f} GB/s "
                    f"(dashed line: floor = bytes / bandwidth), {run.started_at}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(run: BenchmarkRun, out_dir: Path) -> list[Path]:
    """results.json and <suite>.png in ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json"]
    write_json(run, written[0])
    for suite in _suites_in_order(run):
        path = out_dir / f"{suite}.png"
        plot_suite(run, suite, path)
        written.append(path)
    return written
