"""`grpo report`: a run (or several, overlaid) as one self-contained HTML page, plus a text summary.

Reads what `grpo train` and `grpo eval` leave in a run directory: metrics.jsonl (one record per
logged step), config.yaml (for a label), samples/step-*.jsonl (completions with their rewards and
advantages) and eval/<checkpoint>/<time>/results.json. The page holds line charts over steps
(inline SVG, see grpo_cli.charts), the eval figures, and a table of sample completions that a few
lines of inline JavaScript filter by outcome, step and run. Nothing is fetched from a network and
everything but the filtering works with JavaScript off.

Completions are model output, hence untrusted: every piece of text is HTML-escaped, and the
script reads only the table's data-* attributes.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from grpo_cli.charts import DASHES, PALETTE, Line, legend, line_chart
from grpo_cli.errors import UserError, first_line, utf8_lines
from grpo_cli.runs import atomic_write_text

EDGE_STEPS = 5          # the summary's start/end reward: mean over this many first/last logged steps
MAX_SAMPLE_STEPS = 100  # sample tables of longer runs show this many steps, spread evenly (first and last kept)
# A longer series is drawn as the means of runs of consecutive points: thousands of noisy steps drawn
# one by one fill a 500 px chart with a solid band, and the page with points nobody can see.
MAX_POINTS = 250
EVAL_KEY = re.compile(r"eval/(?P<dataset>[^/]+)/(?P<metric>(?:pass|maj|avg)@\d+)")


class Run(NamedTuple):
    """One run directory, as read back by `load_run`."""

    path: Path
    label: str                      # how the page and the summary name the run
    config: dict[str, Any]          # config.yaml ({} when unreadable: it only labels the run)
    records: list[dict[str, Any]]   # metrics.jsonl, one per logged step, in step order
    samples: list[dict[str, Any]]   # samples/step-*.jsonl records, each given its "step" and "correct"
    evals: list[dict[str, Any]]     # results.json of each `grpo eval run=...`, given "step" (None: unknown)
    notes: list[str]                # what was left out while reading (a truncated last line)


class PlotSpec(NamedTuple):
    id: str                                           # the figure's id is plot-<id>
    title: str
    series: Callable[[list[str]], list[tuple[str, str]]]  # metric keys present -> (key, legend name) to draw
    y_range: tuple[float, float] | None = None        # fixed y axis (rates), else the data's range


def _fixed(*pairs: tuple[str, str]) -> Callable[[list[str]], list[tuple[str, str]]]:
    return lambda keys: [(k, name) for k, name in pairs if k in keys]


def _reward_series(keys: list[str]) -> list[tuple[str, str]]:
    components = [k for k in keys if re.fullmatch(r"reward/[^/]+", k) and k not in
                  ("reward/mean", "reward/std", "reward/invalid")]
    return [("reward/mean", "total")] * ("reward/mean" in keys) + [(k, k.split("/", 1)[1]) for k in components]


def _eval_series(keys: list[str]) -> list[tuple[str, str]]:
    found = [m for m in map(EVAL_KEY.fullmatch, keys) if m]
    return [(m.group(0), f"{m['dataset']} {m['metric']}") for m in found]


PLOTS = (
    PlotSpec("reward", "Reward (total and per term, unweighted)", _reward_series),
    PlotSpec("accuracy", "Accuracy", _fixed(("accuracy", "accuracy")), (0.0, 1.0)),
    PlotSpec("length", "Completion length (tokens)", _fixed(("completion/len_mean", "all"),
                                                            ("completion/len_correct_mean", "correct"),
                                                            ("completion/len_wrong_mean", "wrong"))),
    PlotSpec("reflection", "Reflection rate (completions with \u201cwait\u201d, \u201cverify\u201d, ...)",
             _fixed(("completion/reflection_rate", "reflection")), (0.0, 1.0)),
    PlotSpec("kl", "KL to the reference model", _fixed(("kl", "kl"))),
    PlotSpec("clip", "Clip fraction", _fixed(("clip_frac", "clipped"))),
    PlotSpec("entropy", "Entropy (nats per token)", _fixed(("entropy", "entropy"))),
    PlotSpec("grad-norm", "Gradient norm (before clipping)", _fixed(("grad_norm", "grad norm"))),
    PlotSpec("time", "Seconds per step, by phase", _fixed(*((f"time/{p}", p) for p in
                                                            ("rollout", "reward", "learner", "sync", "eval")))),
)
EVAL_PLOT = PlotSpec("eval", "Evaluation during training", _eval_series, (0.0, 1.0))


# ----------------------------------------------------------------------------- reading a run
def load_run(path: Path) -> Run:
    """Read a run directory; a missing or damaged metrics.jsonl is a UserError naming the fix."""
    if path.is_file():
        run = f": here {path.parent}" if (path.parent / "metrics.jsonl").is_file() else " (e.g. runs/quickstart/<time>)"
        raise UserError(f"{path} is a file, not a run directory; pass the folder `grpo train` wrote{run}")
    key, given, folder = str(path).partition("=")
    if not path.is_dir() and given and Path(folder).is_dir():  # run=RUN, as grpo eval takes it
        raise UserError(f"{path}: grpo report takes run directories as they are, without {key}=: grpo report {folder}")
    if not path.is_dir():
        raise UserError(f"{path}: no such directory; pass a run directory written by `grpo train` "
                        "(e.g. runs/quickstart/<time>)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path}: not a run directory (no metrics.jsonl); pass a folder `grpo train` wrote "
                        "(e.g. runs/quickstart/<time>)")
    records, notes = _read_metrics(metrics)
    config = _read_config(path / "config.yaml")
    accuracy = next((label for label, term in (config.get("rewards") or {}).items()
                     if ((term or {}).get("fn") or label) == "accuracy"), None)
    return Run(path, _label(path, config), config, records, _read_samples(path / "samples", accuracy),
               _read_evals(path / "eval"), notes)


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    lines = [line for _, line in utf8_lines(path, "the file is damaged: delete that line and run `grpo report` again")]
    records, notes = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed while writing its last line
                notes.append(f"the last line of {path} is incomplete (the run stopped while writing it); left out")
                continue
            raise UserError(f"{path} line {number} is not JSON; the file is damaged: delete that line "
                            "and run `grpo report` again") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path} line {number} is not a metrics record (a JSON object with a \"step\"); "
                            "pass the metrics.jsonl `grpo train` wrote")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no steps yet; run `grpo report` once the run has logged its first step")
    # A step logged twice (a file pieced together from two attempts at a run, or written before resumes
    # cut metrics.jsonl back to the checkpoint) counts once, as last written: the steps, tokens and
    # wall time would count it twice, and its line would double back on the charts.
    by_step = {r["step"]: r for r in records}
    if len(by_step) < len(records):
        notes.append(f"{path} logs {len(records) - len(by_step)} step(s) more than once; the last record of each "
                     "is used")
    return sorted(by_step.values(), key=lambda r: r["step"]), notes


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _label(path: Path, config: dict[str, Any]) -> str:
    recipe = config.get("recipe")
    return f"{recipe}/{path.name}" if recipe and recipe != path.name else path.name


def _read_samples(folder: Path, accuracy: str | None) -> list[dict[str, Any]]:
    """Every sample record with its step; `correct` from the record, else (runs that predate it)
    from the accuracy reward; None when the run has no accuracy reward."""
    samples = []
    for file in sorted(folder.glob("step-*.jsonl")):
        step = int(file.stem.split("-", 1)[1])
        for number, line in utf8_lines(file, "delete the file to build the report without it"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{file} line {number} is not JSON; delete the file to build the report without "
                                "it") from None
            correct = record.get("correct")
            if correct is None and accuracy is not None and accuracy in record.get("rewards", {}):
                correct = record["rewards"][accuracy] > 0.5
            samples.append({**record, "step": step, "correct": correct})
    return samples


def _read_evals(folder: Path) -> list[dict[str, Any]]:
    """results.json under eval/<checkpoint>/<time>/ (`grpo eval run=RUN`); the step is read from
    the checkpoint's name (step-NNNNNN), None for anything else."""
    evals = []
    for file in sorted(folder.glob("*/*/results.json")):
        try:
            results = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # an eval still being written or broken; the training figures do not depend on it
        found = re.fullmatch(r"step-(\d+)", file.parent.parent.name)
        evals.append({**results, "step": int(found.group(1)) if found else None, "path": file})
    return evals


# ----------------------------------------------------------------------------- figures
def series(records: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) wherever `key` holds a finite number; steps without it are left out."""
    return [(r["step"], float(r[key])) for r in records if _number(r.get(key))]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def eval_points(run: Run) -> dict[tuple[str, str], list[tuple[int, float, str]]]:
    """(dataset, metric) -> (step, value, source) from periodic evals ("train") and `grpo eval` ("grpo eval")."""
    points: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    for record in run.records:
        for key, value in record.items():
            name = key.split("/")
            if key.startswith("eval/") and len(name) == 3 and _number(value):
                points.setdefault((name[1], name[2]), []).append((record["step"], float(value), "train"))
    for results in run.evals:
        for dataset, metrics in (results.get("metrics") or {}).items():
            for metric, value in metrics.items():
                if _number(value):
                    points.setdefault((dataset, metric), []).append((results["step"], float(value), "grpo eval"))
    return points


def headline_metric(metrics: Sequence[str]) -> str | None:
    """The metric that stands for an eval: pass@1, else the smallest-k pass@, avg@ or maj@."""
    for prefix in ("pass@", "avg@", "maj@"):
        ranked = sorted((m for m in metrics if re.fullmatch(rf"{prefix}\d+", m)), key=lambda m: int(m.split("@")[1]))
        if ranked:
            return ranked[0]
    return None


def summary(run: Run) -> dict[str, str]:
    """The figures the command prints and the page's run table shows, as text."""
    steps = [r["step"] for r in run.records if r["step"] > 0]  # step 0: the evaluation before training
    out = {"steps": (f"{len(steps)} ({steps[0]} to {steps[-1]})" if len(steps) > 1 else
                     f"1 (step {steps[0]})" if steps else "0")}
    reward = [v for _, v in series(run.records, "reward/mean")]
    if reward:
        first, last = reward[:EDGE_STEPS], reward[-EDGE_STEPS:]
        out["reward"] = f"{_mean(first):.3f} -> {_mean(last):.3f}"
    best = []
    points = eval_points(run)
    for dataset in dict.fromkeys(d for d, _ in points):
        metric = headline_metric([m for d, m in points if d == dataset])
        if metric is not None:
            step, value, source = max(points[dataset, metric], key=lambda p: (p[1], -(p[0] or 0)))
            where = f"at step {step}" if step is not None else "(checkpoint from elsewhere)"
            best.append(f"{dataset} {metric} {value:.3f} {where}" + (" (grpo eval)" if source == "grpo eval" else ""))
    if best:
        out["best eval"] = "; ".join(best)
    # logging.log_every > 1: the sums are of the logged steps only, not the run's totals.
    part = f" in the {len(steps)} logged steps of {steps[-1]}" if steps and len(steps) < steps[-1] else ""
    tokens = sum(v for _, v in series(run.records, "tokens/generated"))
    out["tokens"] = f"{tokens:,.0f} generated{part}"
    seconds = sum(v for key in ("time/step", "time/eval") for _, v in series(run.records, key))
    out["wall time"] = _duration(seconds) + part
    return out


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def thinned(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> tuple[list[tuple[float, float]], int]:
    """`points` as at most `limit` (mean step, mean value) pairs of runs of consecutive points, and how
    many points each pair stands for (1: `points` as they are)."""
    size = math.ceil(len(points) / limit)
    if size <= 1:
        return points, 1
    chunks = [points[i:i + size] for i in range(0, len(points), size)]
    return [(_mean([x for x, _ in c]), _mean([y for _, y in c])) for c in chunks], size


def _figure(spec: PlotSpec, runs: Sequence[Run]) -> str:
    """One <figure id="plot-..."> with the chart and its legend, or a 'no data' note.

    One run: a colour per series. Several: a colour per run and a dash pattern per series."""
    lines = []
    sizes = set()  # how many logged steps a drawn point stands for, per line
    for r, run in enumerate(runs):
        keys = list(dict.fromkeys(k for record in run.records for k in record))
        drawn = spec.series(keys)
        for s, (key, name) in enumerate(drawn):
            points, size = thinned(series(run.records, key))
            if not points:
                continue
            sizes.add(size)
            if len(runs) == 1:
                lines.append(Line(name, points, PALETTE[s % len(PALETTE)]))
            else:
                label = run.label if len(drawn) == 1 else f"{run.label} \u00b7 {name}"
                lines.append(Line(label, points, PALETTE[r % len(PALETTE)], DASHES[s % len(DASHES)]))
    body = (line_chart(lines, "step", spec.y_range) + legend(lines) if lines
            else '<p class="no-data">no data: not in metrics.jsonl</p>')
    if max(sizes, default=1) > 1:
        body += (f'<p class="note">Each point: the mean of {"up to " * (len(sizes) > 1)}{max(sizes)} consecutive '
                 'logged steps.</p>')
    return f'<figure class="plot" id="plot-{spec.id}"><figcaption>{html.escape(spec.title)}</figcaption>{body}</figure>'


# ----------------------------------------------------------------------------- the page
def render(runs: Sequence[Run]) -> str:
    """The whole HTML page for `runs`."""
    title = "grpo report: " + ", ".join(run.label for run in runs)
    figures = "".join(_figure(spec, runs) for spec in PLOTS)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{html.escape(title)}</h1>{_runs_table(runs)}'
            f'<section id="training"><h2>Training</h2><div class="plots">{figures}</div></section>'
            f'{_eval_section(runs)}{_samples_section(runs)}<script>{SCRIPT}</script></body></html>\n')


def _runs_table(runs: Sequence[Run]) -> str:
    rows = []
    for r, run in enumerate(runs):
        model = (run.config.get("model") or {}).get("name_or_path", "")
        facts = summary(run)
        cells = [f'<span class="swatch" style="background:{PALETTE[r % len(PALETTE)]}"></span>'
                 f'{html.escape(run.label)}', html.escape(str(run.path)), html.escape(str(model)),
                 *(html.escape(facts.get(k, "")) for k in ("steps", "reward", "best eval", "tokens", "wall time"))]
        notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in run.notes)
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells[:-1]) + f"<td>{cells[-1]}{notes}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("run", "directory", "model", "steps", "reward (start -> end)",
                                              "best eval", "tokens", "wall time"))
    return (f'<section id="runs"><table class="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
            '</table></section>')


def _eval_section(runs: Sequence[Run]) -> str:
    tables = []
    for run in runs:
        points = eval_points(run)
        if not points:
            continue
        metrics = list(dict.fromkeys(m for _, m in points))
        rows: dict[tuple[Any, str, str], dict[str, float]] = {}  # (step, source, dataset) -> metric -> value
        for (dataset, metric), found in points.items():
            for step, value, source in found:
                rows.setdefault((step, source, dataset), {})[metric] = value
        body = "".join(
            f"<tr><td>{'' if step is None else step}</td><td>{source}</td><td>{html.escape(dataset)}</td>"
            + "".join(f"<td>{values[m]:.3f}</td>" if m in values else "<td></td>" for m in metrics) + "</tr>"
            for (step, source, dataset), values in sorted(rows.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1:])))
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ("step", "from", "dataset", *metrics))
        tables.append(f"<h3>{html.escape(run.label)}</h3><table class=\"eval\"><thead><tr>{head}</tr></thead>"
                      f"<tbody>{body}</tbody></table>")
    if not tables:
        return ""
    note = ('<p class="note">"train": <code>trainer.eval_every</code> during training; "grpo eval": '
            '<code>grpo eval run=RUN_DIR</code> on a checkpoint (its own eval settings).</p>')
    periodic = any(EVAL_KEY.fullmatch(k) for run in runs for record in run.records for k in record)
    figure = f'<div class="plots">{_figure(EVAL_PLOT, runs)}</div>' if periodic else ""
    return (f'<section id="eval"><h2>Evaluation</h2>{figure}{note}<div id="eval-table">{"".join(tables)}</div>'
            '</section>')


def _spread(steps: list[int], limit: int) -> list[int]:
    """At most `limit` of `steps` (sorted), evenly spread, first and last included."""
    if len(steps) <= limit:
        return steps
    return sorted({steps[round(i * (len(steps) - 1) / (limit - 1))] for i in range(limit)})


def _samples_section(runs: Sequence[Run]) -> str:
    steps_all = sorted({s["step"] for run in runs for s in run.samples})
    shown = set(_spread(steps_all, MAX_SAMPLE_STEPS))
    labels = list(dict.fromkeys(k for run in runs for s in run.samples for k in s.get("rewards", {})))
    several = len(runs) > 1
    rows = []
    for r, run in enumerate(runs):
        for s in run.samples:
            if s["step"] not in shown:
                continue
            outcome = {True: "correct", False: "wrong", None: "unknown"}[s["correct"]]
            rewards = s.get("rewards", {})
            cells = ([html.escape(run.label)] if several else []) + [
                str(s["step"]),
                f'<span class="outcome">{ {"correct": "&#10003; correct", "wrong": "&#10007; wrong"}.get(outcome, "")}'
                '</span>',
                _fmt(s.get("reward")), _fmt(s.get("advantage")), *(_fmt(rewards.get(k)) for k in labels),
                html.escape("" if s.get("answer") is None else str(s["answer"])),  # null: data without answers
                f'<pre class="completion">{html.escape(str(s.get("completion", "")))}</pre>'
                + (' <span class="note">(truncated)</span>' if s.get("truncated") else ""),
                f'<details><summary>prompt</summary><pre>{html.escape(str(s.get("prompt", "")))}</pre></details>']
            rows.append(f'<tr class="{outcome}" data-run="{r}" data-step="{s["step"]}" data-outcome="{outcome}">'
                        + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return '<section id="samples"><h2>Samples</h2><p class="no-data">no data: no samples/step-*.jsonl</p></section>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ([*(["run"] if several else []), "step", "outcome", "reward",
                                                          "advantage", *labels, "answer", "completion", "prompt"]))
    options = "".join(f'<option value="{step}">{step}</option>' for step in sorted(shown))
    run_filter = ('<label>run <select name="run"><option value="">all</option>'
                  + "".join(f'<option value="{r}">{html.escape(run.label)}</option>' for r, run in enumerate(runs))
                  + "</select></label>") if several else ""
    note = (f'<p class="note">Samples of {len(shown)} of {len(steps_all)} steps, spread evenly.</p>'
            if len(shown) < len(steps_all) else "")
    controls = ('<form id="sample-filter" hidden><label>show <select name="outcome"><option value="">all</option>'
                '<option value="correct">correct</option><option value="wrong">wrong</option></select></label>'
                f'<label>step <select name="step"><option value="">all</option>{options}</select></label>'
                f'{run_filter}<span id="sample-count"></span></form>')
    return (f'<section id="samples"><h2>Samples</h2>{note}{controls}<table id="sample-table" class="samples">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if _number(value) else ""


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}h3{font-size:15px}
.plots{display:flex;flex-wrap:wrap;gap:18px}
figure.plot{margin:0;padding:8px;border:1px solid #ddd;border-radius:6px;width:560px}
figcaption{font-weight:600;margin-bottom:4px}
svg.chart{display:block;max-width:100%;height:auto}
svg .grid{stroke:#e6e6e6}svg .axis{stroke:#888}
svg .tick,svg .axis-label{font-size:11px;fill:#555}
.legend{list-style:none;padding:0;margin:4px 0 0;display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px}
.legend svg{vertical-align:middle;margin-right:4px}
.no-data,.note{color:#777;font-style:italic}
table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
table.samples pre{white-space:pre-wrap;word-break:break-word;max-width:640px;margin:0;font-size:12px}
tr.correct .outcome{color:#2e7d32}tr.wrong .outcome{color:#c62828}
#sample-filter{display:flex;gap:16px;align-items:center;margin:8px 0}
#sample-filter[hidden]{display:none}
"""

# Filtering only: reads the rows' data-* attributes, never their text.
SCRIPT = """
(function () {
  var form = document.getElementById("sample-filter");
  if (!form) return;
  form.hidden = false;
  var rows = document.querySelectorAll("#sample-table tbody tr");
  function apply() {
    var outcome = form.elements.outcome.value, step = form.elements.step.value;
    var run = form.elements.run ? form.elements.run.value : "";
    var shown = 0;
    rows.forEach(function (tr) {
      var keep = (!outcome || tr.dataset.outcome === outcome) && (!step || tr.dataset.step === step) &&
                 (!run || tr.dataset.run === run);
      tr.hidden = !keep;
      if (keep) shown += 1;
    });
    document.getElementById("sample-count").textContent = shown + " of " + rows.length + " samples";
  }
  form.addEventListener("change", apply);
  apply();
})();
"""


# ----------------------------------------------------------------------------- grpo report
def default_output(paths: Sequence[Path]) -> Path:
    """RUN_DIR/report.html for one run, ./grpo-report.html for several."""
    return paths[0] / "report.html" if len(paths) == 1 else Path("grpo-report.html")


def build_report(paths: Sequence[Path], output: Path | None = None) -> tuple[Path, list[Run]]:
    """Read the runs, write the page (atomically); returns where it went and the runs read."""
    runs = [load_run(p) for p in paths]
    labels = [run.label for run in runs]
    runs = [run._replace(label=f"{run.label} ({i + 1})") if labels.count(run.label) > 1 else run
            for i, run in enumerate(runs)]
    out = output or default_output(paths)
    if out.is_dir():
        raise UserError(f"--output {out} is a directory; give a file name, e.g. {out / 'report.html'}")
    try:
        atomic_write_text(out, render(runs))
    except OSError as e:  # a run directory one may read but not write, an --output under a file, a full disk
        raise UserError(f"cannot write the report to {out} ({type(e).__name__}: {first_line(e)}); pass --output FILE "
                        "in a folder you can write") from None
    return out, runs


HINTS = {"reward": f"  (mean reward of the first / last {EDGE_STEPS} logged steps)",
         "wall time": "  (time/step + time/eval of the logged steps)"}


def summary_text(runs: Sequence[Run], out: Path) -> str:
    """What `grpo report` prints: a few lines per run, then where the page is."""
    lines = []
    for run in runs:
        lines.append(f"{run.label}  ({run.path})")
        lines += [f"  {key:<10} {value}{HINTS.get(key, '')}" for key, value in summary(run).items()]
        lines += [f"  note: {n}" for n in run.notes]
    lines.append(f"report: {out}")
    return "\n".join(lines)
