"""The shared harness of the benchmark scripts: threads, timing, tables and reports.

How a script uses it (attention.py is a short complete example):

1. ``import harness`` before anything that can start a thread pool (numpy, torch, mlmf;
   ruff's import order puts it first among the third-party imports). Importing it sets
   RAYON_NUM_THREADS, OMP_NUM_THREADS and MKL_NUM_THREADS to ``harness.THREADS`` (2) and
   OPENBLAS_NUM_THREADS to 1. Shared inputs (photo-like images, speech-like audio,
   sentences, random checkpoints) are in synthetic.py.
2. Subclass ``harness.Suite`` and set its class attributes: ``name`` (the script owns
   the section ``<!-- name:begin -->`` … ``<!-- name:end -->`` of ``--out``), ``groups``
   (the ``--only`` choices), ``rounds_help`` and ``columns`` (the table: ``WORKLOAD``,
   ``COMPETITOR``, ``RATIO``, ``time_columns``, ``gflops_columns``, ``met_column``,
   ``diff_column`` or ``(header, "l" or "r", cell of a Line)`` tuples). Write
   ``build(only)``, which returns ``Row``s: mlmf and its competitors, each a
   ``Contender`` around a call without arguments (``with_one_thread`` adds the
   ``[torch 1 thread]`` line of each competitor with a target; ``abs_diffs`` makes a
   row's ``compare``), and ``section(lines, rows, env, png)``, the method and the notes
   around the table (``section_text``). Optional hooks: ``environment``, ``spread``,
   ``lines_for``, ``close_notes`` and ``plot`` (with ``plot_name``).
3. End the script with ``sys.exit(MySuite.main())``. ``main`` parses --out, --rounds,
   --quick and --only, gives torch two threads, builds the rows in a temporary folder
   (``self.dir``), times them (each contender warmed up, then the contenders of a row
   alternate for ``row.rounds`` rounds, the order reversed every other round, each
   timed sample repeating the call until it lasts ``args.min_time``; medians), adds the
   closing notes (large output differences, per-round spreads, a busy machine, the
   run's duration), prints the table and writes the section and the plot.

A script with a flow of its own (distributed.py) calls the pieces directly:
``parse_args``, ``Start``, ``measure``, ``spread``, ``markdown_table``,
``closing_notes``, ``environment``, ``section_text`` and ``report``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

# Everyone gets two threads. The pools read these when the libraries are first imported,
# so they are set when this module is imported, before the scripts import numpy or torch.
THREADS = 2
for _var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)
# NumPy's OpenBLAS pool gets one thread: its idle workers spin for a while after every
# BLAS call (the PIL backend's numpy code makes some), taking a core from whichever
# contender runs next. No measured work needs BLAS threads (see preprocess.py's notes).
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

# The thread settings of the scripts that also pin torch's interop pool to one thread.
TORCH_THREADS = (
    f"{THREADS} (torch.set_num_threads, interop 1, RAYON_NUM_THREADS, OMP_NUM_THREADS, "
    "MKL_NUM_THREADS; OpenBLAS 1)"
)
PIL_SINGLE = "Pillow and the PIL backend are single-threaded"
# The module that reports the version of a package, where the two names differ.
MODULES = {"Pillow": "PIL"}


def setup_torch(interop: bool = True) -> None:
    """Gives torch ``THREADS`` intra-op threads (and one interop thread when `interop`)."""
    import torch

    torch.set_num_threads(THREADS)
    if interop:
        torch.set_num_interop_threads(1)


# --------------------------------------------------------------------------- timing


@dataclass
class Contender:
    name: str
    fn: Callable[[], Any]
    target: Optional[float] = None  # required speed-up of mlmf over this one
    check: bool = True  # compare outputs with mlmf's
    note: str = ""
    times: list[float] = field(default_factory=list)  # seconds per call, one per round


@dataclass
class Row:
    """One workload: mlmf and its competitors on the same inputs.

    `measure` times `mlmf` and `competitors`; `compare(mlmf_result, competitor_result)`
    returns the diff cell (see diff_cell). `items`: items per call; `calls`: a fixed
    number of calls per timed sample (else as many as make one last `min_time`);
    `max_diff`: the differences a compare function recorded (see abs_diffs).
    """

    workload: str
    mlmf: Contender
    competitors: list[Contender]
    key: str = ""
    items: int = 1
    rounds: int = 7
    compare: Optional[Callable[[Any, Any], str]] = None
    calls: Optional[int] = None
    max_diff: list[float] = field(default_factory=list)


def in_round_order(items: Sequence[Any], r: int) -> list[Any]:
    """`items` in round `r`'s order: reversed every other round, so that no contender
    always runs on a warmer machine."""
    return list(items) if r % 2 == 0 else list(reversed(items))


def _calls_per_sample(fn: Callable[[], Any], min_time: float) -> int:
    """How many calls make one timed sample last at least `min_time`."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, math.ceil(min_time / max(dt, 1e-6)))


def _sample(fn: Callable[[], Any], calls: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure(row: Any, rounds: int, min_time: float, calls: Optional[int] = None) -> None:
    """Warms up `row.mlmf` and `row.competitors`, then times them in alternating order
    for `rounds` rounds, appending seconds per call to each contender's `times`. A timed
    sample repeats the call until it lasts at least `min_time`, or `calls` times when
    given."""
    contenders = [*row.competitors, row.mlmf]
    for c in contenders:
        c.fn()  # warm-up: lazy initialisation, caches, thread pools
    per_sample = {
        id(c): calls if calls is not None else _calls_per_sample(c.fn, min_time) for c in contenders
    }
    for r in range(rounds):
        for c in in_round_order(contenders, r):
            c.times.append(_sample(c.fn, per_sample[id(c)]))


def torch_one_thread(c: Contender) -> Contender:
    """The same torch-backed competitor run with one torch thread.

    On a busy two-core machine torch's OpenMP pool can lose most of its time waiting
    for a descheduled worker; the one-thread figure shows how much of a speed-up comes
    from that contention rather than from the work itself.
    """
    import torch

    def run() -> Any:
        torch.set_num_threads(1)
        try:
            return c.fn()
        finally:
            torch.set_num_threads(THREADS)

    return Contender(f"{c.name} [torch 1 thread]", run, target=c.target, check=False)


def with_one_thread(competitors: Iterable[Contender]) -> list[Contender]:
    """`competitors`, each one with a target followed by its `[torch 1 thread]` line."""
    return [v for c in competitors for v in ([c, torch_one_thread(c)] if c.target else [c])]


def one_thread_note(
    subject: str,
    share: str = "much",
    effect: str = "the ratio over two-thread eager",
    advice: str = "On a quiet machine two-thread eager is the faster, binding one.",
) -> str:
    """The note that explains the `[torch 1 thread]` lines of a report."""
    return (
        f"`[torch 1 thread]` lines run the same {subject} with `torch.set_num_threads(1)`: "
        f"on a busy two-core machine torch's two-thread OpenMP pool can spend {share} of its "
        f"time waiting for a descheduled worker, which inflates {effect}. {advice}"
    )


def quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` with warnings silenced (e.g. mlmf's untrained-fusion one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def jpeg_note() -> str:
    """The note on the JPEG decoders of mlmf and Pillow."""
    import mlmf

    if getattr(mlmf, "JPEG_DECODER", "") == "libjpeg-turbo":
        return "JPEG rows: mlmf and Pillow both decode with libjpeg-turbo (identical pixels)."
    return (
        "JPEG rows: this mlmf build decodes with zune-jpeg, Pillow with libjpeg-turbo; "
        "they differ by a few 8-bit levels, so the diff is not zero."
    )


@dataclass
class Start:
    """The 1-minute load average and the clock when a run started."""

    load: str = field(default_factory=lambda: load_average())
    clock: float = field(default_factory=time.perf_counter)


def build_rows(
    builders: list[tuple[str, Callable[[], Any]]],
    only: Optional[list[str]],
    notes: list[str],
    progress: bool = False,
    skipped: str = "rows skipped",
) -> list[Any]:
    """Calls each `(name, build)` of `builders` whose name is in `only` (all when None)
    and collects what it returns (a row or a list of rows). A builder that raises is
    noted as "`name` rows skipped: ..." (`skipped` words it) and the run goes on;
    `progress` prints each build and its time to stderr."""
    rows: list[Any] = []
    for name, build in builders:
        if only and name not in only:
            continue
        if progress:
            print(f"building: {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            made = build()
        except Exception as exc:  # a missing API or library skips the row, not the run
            traceback.print_exc()
            notes.append(f"`{name}` {skipped}: {type(exc).__name__}: {exc}")
            continue
        if progress:
            print(f"  built in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        rows.extend(made if isinstance(made, list) else [made])
    return rows


def time_rows(
    rows: list[Row],
    min_time: float,
    notes: list[str],
    lines_for: Callable[[Row], list[Line]],
    spread: Callable[[Row], str],
) -> tuple[list[Line], list[str]]:
    """Times each row (``row.rounds`` rounds, ``row.calls`` calls per timed sample when
    set; see :func:`measure`), printing progress; a row that fails is noted and skipped.
    Returns the table lines and per-row spreads."""
    lines: list[Line] = []
    spreads: list[str] = []
    for row in rows:
        print(f"timing: {row.workload} ({row.rounds} rounds)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            measure(row, row.rounds, min_time, row.calls)
        except Exception as exc:
            traceback.print_exc()
            notes.append(f"{row.workload}: failed: {type(exc).__name__}: {exc}")
            continue
        lines.extend(lines_for(row))
        spreads.append(spread(row))
        print(f"  timed in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return lines, spreads


# --------------------------------------------------------------------------- results


@dataclass
class Line:
    """One table line: mlmf against one competitor of `row` (medians, ms per call)."""

    row: Any
    competitor: str
    comp_ms: Optional[float]  # None: no figures (no competitor, or see `failed`)
    mlmf_ms: float
    target: Optional[float] = None
    diff: str = "—"
    failed: str = ""

    @property
    def workload(self) -> str:
        return self.row.workload

    @property
    def ratio(self) -> Optional[float]:
        return None if self.comp_ms is None else self.comp_ms / self.mlmf_ms

    def met(self, not_met: str = "not met") -> str:
        if self.target is None or self.ratio is None:
            return "—"
        return "met" if self.ratio >= self.target else not_met


def median_ms(c: Contender) -> float:
    return 1e3 * statistics.median(c.times)


def lines_for(row: Row) -> list[Line]:
    """A line per competitor of the timed `row` (one without figures when it has none);
    the diff cell compares fresh calls (see diff_cell) where `row.compare` is set and the
    competitor is checked."""
    mlmf_ms = median_ms(row.mlmf)
    if not row.competitors:
        return [Line(row, "—", None, mlmf_ms)]
    return [
        Line(
            row,
            c.name,
            median_ms(c),
            mlmf_ms,
            target=c.target,
            diff=diff_cell(row, c) if row.compare is not None and c.check else "—",
        )
        for c in row.competitors
    ]


def spread(
    row: Row,
    fmt: Callable[[float], str],
    label: Optional[str] = None,
    per_item: bool = False,
    unit: str = "",
) -> str:
    """`label` (default: the workload), then each contender's fastest–slowest round in
    ms (`fmt` writes a time, `unit` follows the pair; `per_item` divides by row.items)."""
    scale = 1e3 / (row.items if per_item else 1)

    def one(c: Contender) -> str:
        return f"{c.name} {fmt(scale * min(c.times))}–{fmt(scale * max(c.times))}{unit}"

    return f"{label or row.workload}: " + ", ".join(one(c) for c in [row.mlmf, *row.competitors])


def _to_numpy(x: Any) -> Any:
    import numpy as np

    if isinstance(x, dict) or isinstance(getattr(x, "data", None), dict):
        x = next(v for k, v in dict(x).items() if k in ("pixel_values", "pixel_values_videos"))
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def abs_diff(a: Any, b: Any) -> tuple[str, float]:
    """The largest |a - b| (arrays, tensors or processor outputs) as a table cell and as
    a number; a shape mismatch is said in the cell and counts as infinite."""
    import numpy as np

    a = _to_numpy(a)
    b = _to_numpy(b)
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}", math.inf
    d = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    return f"{d:.2g}", d


def max_abs_diff(a: Any, b: Any) -> str:
    """The cell of :func:`abs_diff`."""
    return abs_diff(a, b)[0]


def abs_diffs(*pairs: tuple[Any, Any], record: Optional[list[float]] = None) -> str:
    """The cells of :func:`abs_diff` for each `(a, b)` of `pairs`, joined by " / "; the
    largest difference is appended to `record` when given (a row's max_diff)."""
    cells, diffs = zip(*(abs_diff(a, b) for a, b in pairs))
    if record is not None:
        record.append(max(diffs))
    return " / ".join(cells)


def diff_cell(row: Any, competitor: Contender) -> str:
    """`row.compare` on fresh calls of mlmf and `competitor` (rows of every script have
    `mlmf` and `compare`); the comparison is informative only, so a failure is a cell."""
    try:
        return row.compare(row.mlmf.fn(), competitor.fn())
    except Exception as exc:
        return f"n/a ({type(exc).__name__})"


# --------------------------------------------------------------------------- formats


def fmt_ms(v: float) -> str:
    """Milliseconds with three significant figures or so (no unit)."""
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_time(ms: float) -> str:
    """A time with its unit: µs below 1 ms, else ms."""
    if ms < 1:
        us = 1e3 * ms
        return f"{us:.1f} µs" if us < 10 else f"{us:.0f} µs"
    return f"{fmt_ms(ms)} ms"


def fmt_ratio(r: Optional[float], whole_from: float = math.inf) -> str:
    """A bold ratio (`**1.23x**`; no decimals from `whole_from` up), "—" when None."""
    if r is None:
        return "—"
    return f"**{r:.0f}x**" if r >= whole_from else f"**{r:.2f}x**"


def fmt_target(target: Optional[float]) -> str:
    return f"≥ {target:g}x" if target else "—"


def gflops(ms: float, gflop: float) -> str:
    """Effective GFLOP/s of `gflop` done in `ms` milliseconds."""
    return f"{gflop / (ms / 1e3):.0f}"


def cell(text: str) -> str:
    """`text` on one line, safe in a table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def markdown_table(header: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> str:
    """A markdown table: the `header` cells, `align` a letter per column ("l" left, "r"
    right), then a line per row of cells."""
    rule = "".join("---:|" if a == "r" else "---|" for a in align)
    lines = [f"| {' | '.join(header)} |", f"|{rule}", *(f"| {' | '.join(r)} |" for r in rows)]
    return "\n".join(lines) + "\n"


# A table column: header, alignment ("l" or "r") and the cell of a line.
Column = tuple[str, str, Callable[[Line], str]]

WORKLOAD: Column = ("Workload", "l", lambda ln: ln.workload)
COMPETITOR: Column = ("Competitor", "l", lambda ln: ln.competitor)
RATIO: Column = ("Ratio (competitor / mlmf; > 1: mlmf faster)", "r", lambda ln: fmt_ratio(ln.ratio))


def line_table(lines: Sequence[Line], columns: Sequence[Column]) -> str:
    """The markdown table of `lines`, one column per entry of `columns`."""
    align = "".join(a for _, a, _ in columns)
    cells = ([cell(ln) for _, _, cell in columns] for ln in lines)
    return markdown_table([header for header, _, _ in columns], align, cells)


def time_columns(unit: str, fmt: Callable[[float], str], per_item: bool = False) -> list[Column]:
    """The competitor's and mlmf's median times ("Competitor <unit>", "mlmf <unit>"; per
    item with `per_item`); a line without figures shows why (`failed`) or "—"."""

    def per(ms: float, ln: Line) -> str:
        return fmt(ms / ln.row.items if per_item else ms)

    def theirs(ln: Line) -> str:
        return per(ln.comp_ms, ln) if ln.comp_ms is not None else cell(ln.failed) or "—"

    return [
        (f"Competitor {unit}", "r", theirs),
        (f"mlmf {unit}", "r", lambda ln: per(ln.mlmf_ms, ln)),
    ]


def gflops_columns(gflop: Callable[[Line], float], per_item: bool = False) -> list[Column]:
    """mlmf's and the competitor's effective GFLOP/s, `gflop(line)` GFLOP per call (per
    item with `per_item`)."""

    def rate(ms: Optional[float], ln: Line) -> str:
        return "—" if ms is None else gflops(ms / ln.row.items if per_item else ms, gflop(ln))

    return [
        ("mlmf GFLOP/s", "r", lambda ln: rate(ln.mlmf_ms, ln)),
        ("Competitor GFLOP/s", "r", lambda ln: rate(ln.comp_ms, ln)),
    ]


def met_column(header: str = "Met", not_met: str = "not met") -> Column:
    return (header, "l", lambda ln: ln.met(not_met))


def diff_column(header: str = "max abs diff") -> Column:
    return (header, "l", lambda ln: ln.diff)


# --------------------------------------------------------------------------- environment


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def cpu_description() -> str:
    """The CPU model, the logical CPU count and the vector extensions that matter."""
    cpu, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = ", ".join(f for f in ("avx2", "fma", "avx512f") if f in have)
    except OSError:
        pass
    cpu = cpu or platform.processor() or "unknown"
    return f"{cpu} ({os.cpu_count()} logical CPUs{'; ' + flags if flags else ''})"


def version(package: str) -> str:
    """`package`'s version, or "not installed" when it does not import."""
    try:
        return __import__(MODULES.get(package, package)).__version__
    except Exception:
        return "not installed"


def environment(
    load_at_start: str,
    packages: Sequence[str],
    threads: str = TORCH_THREADS,
    extra: Optional[dict[str, str]] = None,
    torch_capability: bool = True,
) -> dict[str, str]:
    """The environment block of a report: CPU, `threads`, the load at start and now,
    Python, the versions of mlmf, numpy and `packages`, the `extra` entries and (with
    `torch_capability`) torch's CPU capability."""
    env = {
        "CPU": cpu_description(),
        "Threads": threads,
        "Load average (1 min) at start / end": f"{load_at_start} / {load_average()}",
        "Python": platform.python_version(),
    }
    env.update((name, version(name)) for name in ("mlmf", "numpy", *packages))
    env.update(extra or {})
    if torch_capability:
        try:
            import torch

            env["torch CPU capability"] = torch.backends.cpu.get_cpu_capability()
        except Exception:
            pass
    return env


# --------------------------------------------------------------------------- report


def section_text(
    title: str,
    script: str,
    quick: bool,
    method: list[str],
    env: dict[str, str],
    table_text: str,
    notes: list[str],
    image: str = "",
) -> str:
    """The text of a script's section of the report (write_section adds the markers):
    the `title`, which script (`benchmarks/<script>`) wrote it and when (`quick`: a
    smoke run), the `method` lines, the environment, the table, the `notes` (a bullet
    each) and an `image` line."""
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        f"## {title}",
        "",
        f"Written by `benchmarks/{script}` on {when}"
        + (" — **quick smoke run, not representative**" if quick else "")
        + ".",
        "",
        *method,
        "",
        "Environment:",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        "",
        table_text.rstrip("\n"),
        "",
        "Notes:",
        "",
        *[f"- {n}" for n in notes],
    ]
    if image:
        parts += ["", image]
    return "\n".join(parts)


def closing_notes(
    notes: list[str],
    rows: list[Any],
    spreads: list[str],
    start: Start,
    spread_unit: str = "time/call",
    pools: str = "torch's OpenMP, mlmf's rayon",
    stages: str = "building, timing",
    diff_note: Optional[float] = None,
    disagree: str = "the outputs disagree",
) -> None:
    """Appends the notes that end a timed run to `notes`: the rows whose `max_diff`
    exceeds `diff_note` (when given; `disagree` says who disagrees), the per-round
    `spreads` (min–max `spread_unit`), a note when the run started on a loaded machine
    (1-minute load > 0.5; `pools` names the two-thread pools in the run) and the time
    since `start` (`stages` names what it covers)."""
    if diff_note is not None:
        large = [r.workload for r in rows if r.max_diff and max(r.max_diff) > diff_note]
        if large:
            notes.append(f"max abs diff above {diff_note:g} ({disagree}): " + "; ".join(large))
    if spreads:
        notes.append(
            f"Per-round spread, min–max {spread_unit} (the table shows medians): "
            + "; ".join(spreads)
        )
    if start.load != "unknown" and float(start.load) > 0.5:
        notes.append(
            f"The 1-minute load average was {start.load} at start ({os.cpu_count()} "
            "CPUs): other work may have shared the machine during the run. Every contender "
            f"then loses time, and the two-thread pools ({pools}) lose more when a worker is "
            "descheduled; the per-round spreads above show how much the timings moved. "
            "Compare ratios within one run, not absolute times across runs."
        )
    notes.append(f"Whole run ({stages}): {time.perf_counter() - start.clock:.0f} s.")


def write_section(out: Path, body: str, name: str) -> None:
    """Writes `body` between the markers ``<!-- name:begin -->`` and ``<!-- name:end -->``
    of `out` (the section that the script `name` owns), replacing what was there and
    leaving the rest alone."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = "\n".join([begin, body, end]) + "\n"
    if out.exists():
        current = out.read_text()
        start, stop = current.find(begin), current.find(end)
        if start != -1 and stop > start:
            current = current[:start] + text.rstrip("\n") + current[stop + len(end) :]
        else:
            current = current.rstrip("\n") + "\n\n" + text
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        current = (
            "# Benchmarks\n\n"
            "Generated by the scripts in `benchmarks/` (`make bench`); each script owns one "
            "marked section of this file. Timings are medians of alternating runs in one "
            "process on a shared machine: read the ratios, not the absolute times.\n\n" + text
        )
    out.write_text(current)


def report(
    out: Path,
    name: str,
    body: str,
    table_text: str,
    notes: list[str],
    png: Optional[Path] = None,
) -> None:
    """Prints the table and the notes, writes `body` as section `name` of `out` (see
    write_section) and says what was written (`png`: the plot, when one was written)."""
    print(table_text)
    for n in notes:
        print(f"note: {n}")
    write_section(out, body, name)
    print(f"wrote {out}" + (f" and {png}" if png else ""))


# --------------------------------------------------------------------------- plots


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) when matplotlib is
    not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lays out `fig`, writes it to `path` (120 dpi; the folder is created) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- arguments


def pick_rounds(args: argparse.Namespace, default: int, quick: int = 2) -> int:
    """--rounds when given, else `quick` with --quick, else `default`."""
    if args.rounds is not None:
        return args.rounds
    return quick if args.quick else default


def parse_args(
    doc: str,
    argv: Optional[list[str]],
    groups: Sequence[str],
    rounds_help: str,
    quick_help: str = "smoke run: 2 rounds, short samples",
    min_times: tuple[float, float] = (0.05, 0.5),
    add: Optional[Callable[[argparse.ArgumentParser], None]] = None,
) -> argparse.Namespace:
    """The options every script has: --out, --rounds, --quick and --only (a
    comma-separated subset of `groups`; a list, or None for all), plus those `add`
    adds. ``args.min_time`` is the shortest timed sample, `min_times` (quick, full)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--rounds", type=int, default=None, help=rounds_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--only", default=None, help="comma-separated subset: " + ",".join(groups))
    if add is not None:
        add(parser)
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",")] if args.only else None
    unknown = sorted(set(args.only or []) - set(groups))
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)} (choose from {', '.join(groups)})")
    args.min_time = min_times[0] if args.quick else min_times[1]
    return args


# --------------------------------------------------------------------------- suites


class Suite:
    """A script's benchmark: the class attributes, `build` and `section` are the
    script's; :meth:`main` runs it (see the module docstring)."""

    name: ClassVar[str] = ""  # section name, temporary folder prefix
    groups: ClassVar[tuple[str, ...]] = ()  # --only choices
    rounds_help: ClassVar[str] = "timed rounds for every row"
    quick_help: ClassVar[str] = "smoke run: 2 rounds, short samples"
    min_times: ClassVar[tuple[float, float]] = (0.05, 0.5)  # shortest sample: quick, full
    torch_interop: ClassVar[bool] = True  # pin torch's interop pool to one thread
    plot_name: ClassVar[str] = ""  # file name of the plot next to --out, if any
    columns: ClassVar[Sequence[Column]] = ()  # the table (see line_table)
    closing: ClassVar[dict[str, Any]] = {}  # keyword arguments of closing_notes
    # Options beyond the common ones: called with the argparse parser.
    add_args: ClassVar[Optional[Callable[[argparse.ArgumentParser], None]]] = None

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.quick: bool = args.quick
        self.notes: list[str] = []

    def rounds_for(self, default: int) -> int:
        """A row's rounds: --rounds, else 2 with --quick, else `default`."""
        return pick_rounds(self.args, default)

    def build_rows(
        self, builders: list[tuple[str, Callable[[], Any]]], only: Optional[list[str]], **kw: Any
    ) -> list[Any]:
        """:func:`build_rows` noting into this suite's notes."""
        return build_rows(builders, only, self.notes, **kw)

    # the script's part

    def build(self, only: Optional[list[str]]) -> list[Row]:
        raise NotImplementedError

    def table(self, lines: list[Line]) -> str:
        return line_table(lines, self.columns)

    def section(self, lines: list[Line], rows: list[Row], env: dict[str, str], png: bool) -> str:
        raise NotImplementedError

    # hooks with defaults

    def environment(self, load_at_start: str) -> dict[str, str]:
        return environment(load_at_start, ("torch", "safetensors"))

    def lines_for(self, row: Row) -> list[Line]:
        return lines_for(row)

    def spread(self, row: Row) -> str:
        return spread(row, fmt_time)

    def close_notes(self, rows: list[Row], spreads: list[str], start: Start) -> None:
        closing_notes(self.notes, rows, spreads, start, **self.closing)

    def plot(self, lines: list[Line], path: Path) -> bool:
        """Writes the plot to `path`; False when none was written."""
        return False

    # the run

    @classmethod
    def main(cls, argv: Optional[list[str]] = None) -> int:
        """Parses the options, builds and times the rows and writes the report; the exit
        status is 1 when no row was timed."""
        args = parse_args(
            sys.modules[cls.__module__].__doc__ or cls.name,
            argv,
            cls.groups,
            cls.rounds_help,
            cls.quick_help,
            cls.min_times,
            cls.add_args,
        )
        setup_torch(cls.torch_interop)
        start = Start()
        with tempfile.TemporaryDirectory(prefix=f"mlmf-bench-{cls.name}-") as tmp:
            suite = cls(args, Path(tmp))
            rows = suite.build(args.only)
            lines, spreads = time_rows(
                rows, args.min_time, suite.notes, suite.lines_for, suite.spread
            )
        return suite.finish(rows, lines, spreads, start)

    def finish(self, rows: list[Row], lines: list[Line], spreads: list[str], start: Start) -> int:
        env = self.environment(start.load)
        self.close_notes(rows, spreads, start)
        png = self.args.out.parent / self.plot_name if self.plot_name and lines else None
        if png is not None and not self.plot(lines, png):
            png = None
        text = self.section(lines, rows, env, png is not None)
        report(self.args.out, self.name, text, self.table(lines), self.notes, png)
        return 0 if lines else 1
