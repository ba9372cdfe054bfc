"""`grpo report` and the metrics behind its plots: reflection rate, length by outcome, the page built
from synthetic run directories, the command's summary and errors, and the page in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from grpo_cli.charts import nice_ticks
from grpo_cli.config import compose
from grpo_cli.errors import UserError
from grpo_cli.loop import Round, _completion_metrics, _sample_records, length_by_outcome, reflection_rate
from grpo_cli.report import build_report, load_run, summary
from grpo_cli.rewards import RewardScores
from grpo_cli.rollout import Sample
from grpo_cli.schema import REFLECTION_WORDS

PLOT_IDS = ("reward", "accuracy", "length", "reflection", "kl", "clip", "entropy", "grad-norm", "time", "eval")
ATTACK = "<script>alert(1)</script>"


# ----------------------------------------------------------------------------- metrics (loop.py)
def test_reflection_rate_counts_whole_words_in_any_case() -> None:
    texts = ["Wait, 3 + 4 is 7.", "I awaited the result: 7.", "7", "The sum is 7."]
    assert reflection_rate(texts, REFLECTION_WORDS) == 0.25  # "awaited" is not "wait"
    assert reflection_rate(["LET ME\n  check: 7", "let me checkmate"], ["let me check"]) == 0.5
    assert reflection_rate(["we re-evaluate", "Hmm.", "hmmm", "However,"], REFLECTION_WORDS) == 0.75
    assert reflection_rate(["a+b (verify)"], ["verify"]) == 1.0
    assert reflection_rate(["wait"], []) is None and reflection_rate([], ["wait"]) is None


def test_length_by_outcome_leaves_out_a_kind_with_no_completion() -> None:
    assert length_by_outcome([10, 20, 30, 40], [True, False, True, False]) == {
        "completion/len_correct_mean": 20.0, "completion/len_wrong_mean": 30.0}
    assert length_by_outcome([10, 20], [False, False]) == {"completion/len_wrong_mean": 15.0}


def test_completion_metrics_and_samples_of_a_round() -> None:
    cfg = compose(["rollout.group_size=2", "rewards=r1_zero"])  # accuracy + format
    lengths = [3, 5, 8, 12]
    samples = [Sample(prompt_index=i // 2, prompt_ids=[1], completion_ids=[7] * n, text="", logprobs=[0.0] * n,
                      truncated=False) for i, n in enumerate(lengths)]
    accuracy = [1.0, 0.0, 0.0, 1.0]
    scores = RewardScores(total=accuracy, per_reward={"accuracy": accuracy, "format": [0.0] * 4}, errors={},
                          first_error={}, invalid=[False] * 4)
    texts = ["wait, 4", "4", "hmm 5", "6"]
    r = Round(rows=[{"prompt": "p0", "answer": 4}, {"prompt": "p1", "answer": 6}], samples=samples, completions=texts,
              scores=scores, advantages=torch.tensor([1.0, -1.0, -1.0, 1.0]), informative=torch.tensor([True, True]))
    metrics = _completion_metrics(cfg, r)
    assert metrics["completion/reflection_rate"] == 0.5
    assert metrics["accuracy"] == 0.5
    assert metrics["completion/len_correct_mean"] == 7.5  # (3 + 12) / 2
    assert metrics["completion/len_wrong_mean"] == 6.5    # (5 + 8) / 2
    assert [s["correct"] for s in _sample_records(r, 4, "accuracy")] == [True, False, False, True]
    assert "correct" not in _sample_records(r, 4, None)[0]


def test_a_reasoning_gym_run_is_judged_by_its_task_scorer() -> None:
    """rewards=reasoning_gym (countdown's recipe) has no accuracy term: the run logged no accuracy and its
    samples no correctness. A full score of the task's own scorer is right, as in grpo eval; countdown's
    0.05 for a wrong, well-formed answer is not."""
    from grpo_cli.loop import _judge_label

    cfg = compose(["recipe=countdown", "rollout.group_size=2"])
    assert _judge_label(cfg) == "reasoning_gym"
    assert _judge_label(compose(["recipe=quickstart"])) == "accuracy"
    assert _judge_label(compose(["recipe=countdown", "dataset=jsonl", "dataset.path=x.jsonl"])) is None
    lengths = [4, 6, 10, 20]
    samples = [Sample(prompt_index=i // 2, prompt_ids=[1], completion_ids=[7] * n, text="", logprobs=[0.0] * n,
                      truncated=False) for i, n in enumerate(lengths)]
    gym = [1.0, 0.05, 0.0, 1.0]
    scores = RewardScores(total=gym, per_reward={"reasoning_gym": gym, "format": [1.0] * 4}, errors={},
                          first_error={}, invalid=[False] * 4)
    r = Round(rows=[{"prompt": "p0", "answer": "1+2"}, {"prompt": "p1", "answer": "3*4"}], samples=samples,
              completions=["a"] * 4, scores=scores, advantages=torch.zeros(4), informative=torch.tensor([True, True]))
    metrics = _completion_metrics(cfg, r)
    assert metrics["accuracy"] == 0.5
    assert metrics["completion/len_correct_mean"] == 12.0 and metrics["completion/len_wrong_mean"] == 8.0
    assert [s["correct"] for s in _sample_records(r, 4, _judge_label(cfg))] == [True, False, False, True]


def test_nice_ticks_fall_on_round_numbers_and_span_the_data() -> None:
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 37) == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert nice_ticks(-0.07, 0.21) == [-0.1, 0.0, 0.1, 0.2, 0.3]
    assert nice_ticks(1, 3, min_step=1) == [1.0, 2.0, 3.0]  # steps: no half steps
    assert nice_ticks(0, 0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # all zero: a 0..1 axis


def test_the_last_step_label_fits_in_the_chart() -> None:
    """A 10,000-step run: the last x tick, "10000", is centred on the right end of the axis; with a 14 px
    margin its right half (5 digits of about 7 px at 11 px) was cut off by the chart's edge."""
    from grpo_cli.charts import WIDTH, Line, line_chart

    for last in (10_000, 100_000):
        svg = line_chart([Line("r", [(1.0, 0.0), (float(last), 1.0)], "#000")], "step")
        x, label = re.findall(r'<text class="tick" x="([0-9.]+)" y="[0-9.]+" text-anchor="middle">([^<]*)</text>',
                              svg)[-1]
        assert label == str(last)
        assert float(x) + 7 * len(label) / 2 <= WIDTH


# ----------------------------------------------------------------------------- synthetic runs
def _write_run(path: Path, scale: float, eval_steps: tuple[int, ...] = (), correct_field: bool = True) -> Path:
    """10 steps: reward/mean = step * scale, 100 tokens and 2 s per step; no correct completion at
    step 1 (so len_correct_mean starts at step 2); two samples per step, one of them correct."""
    (path / "samples").mkdir(parents=True)
    (path / "config.yaml").write_text("recipe: quickstart\nmodel:\n  name_or_path: tiny-model\nrewards:\n"
                                      "  accuracy: {fn: null, weight: 1.0}\n  len: {fn: cosine_length, weight: 0.5}\n")
    lines = []
    for step in range(1, 11):
        record = {"step": step, "reward/mean": step * scale, "reward/std": 0.1, "reward/accuracy": step * scale,
                  "reward/accuracy/errors": 0.0, "reward/len": 0.5, "reward/invalid": 0.0, "accuracy": step * scale,
                  "completion/len_mean": 40.0 - step, "completion/len_wrong_mean": 45.0 - step,
                  "completion/reflection_rate": step / 20, "kl": 0.01 * step, "clip_frac": 0.001,
                  "entropy": 2.0 - 0.1 * step, "grad_norm": None if step == 3 else 1.0,  # null: not finite
                  "time/rollout": 1.0, "time/reward": 0.1, "time/learner": 0.8, "time/sync": 0.1, "time/step": 2.0,
                  "tokens/generated": 100.0}
        if step > 1:
            record["completion/len_correct_mean"] = 30.0 - step
        if step in eval_steps:
            record |= {"eval/chain_sum/pass@1": step / 25, "eval/chain_sum/avg@4": step / 30, "time/eval": 1.5}
        lines.append(json.dumps(record))
        samples = [{"prompt": f"What is {step} + 1?", "answer": str(step + 1), "completion": f"<answer>{step + 1}</answer>",
                    "reward": 1.0, "rewards": {"accuracy": 1.0, "len": 0.5}, "advantage": 0.7, "truncated": False,
                    "correct": True},
                   {"prompt": f"What is {step} + 1?", "answer": str(step + 1), "completion": f"Wait, {ATTACK}",
                    "reward": 0.0, "rewards": {"accuracy": 0.0, "len": 0.5}, "advantage": -0.7, "truncated": True,
                    "correct": False}]
        if not correct_field:  # a run from before samples recorded it: the accuracy reward decides
            samples = [{k: v for k, v in s.items() if k != "correct"} for s in samples]
        (path / "samples" / f"step-{step:06d}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    return (_write_run(tmp_path / "a", 0.1, eval_steps=(5, 10)),
            _write_run(tmp_path / "b", 0.05, correct_field=False))


def _figure(page: str, plot_id: str) -> str:
    found = re.search(rf'<figure class="plot" id="plot-{plot_id}">.*?</figure>', page, re.DOTALL)
    assert found, f"no figure plot-{plot_id}"
    return found.group(0)


def _polyline_lengths(figure: str) -> list[int]:
    return [len(points.split()) for points in re.findall(r'<polyline [^>]*points="([^"]*)"', figure)]


def test_the_page_holds_every_plot_with_each_run_overlaid(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out, read = build_report(runs, tmp_path / "report.html")
    page = out.read_text()
    assert [r.label for r in read] == ["quickstart/a", "quickstart/b"] and "quickstart/b" in page
    for plot_id in PLOT_IDS:
        assert "<svg" in _figure(page, plot_id), plot_id
    # One line per run; the reward plot adds one per term: total, accuracy, len.
    assert _polyline_lengths(_figure(page, "accuracy")) == [10, 10]
    assert _polyline_lengths(_figure(page, "reward")) == [10] * 6
    assert _polyline_lengths(_figure(page, "reflection")) == [10, 10]
    # all, correct (no value at step 1), wrong, per run; lines are drawn last to first.
    assert _polyline_lengths(_figure(page, "length")) == [10, 9, 10] * 2
    assert _polyline_lengths(_figure(page, "grad-norm")) == [9, 9]  # the null at step 3 is left out
    # rollout, reward, learner, sync per run, and run a's 2 evals; drawn last to first.
    assert _polyline_lengths(_figure(page, "time")) == [10] * 4 + [2] + [10] * 4
    assert _polyline_lengths(_figure(page, "eval")) == [2, 2]  # run a only: pass@1 and avg@4 at steps 5 and 10
    assert '<td>10</td><td>train</td><td>chain_sum</td><td>0.400</td><td>0.333</td>' in page  # the eval table
    assert ">quickstart/a \u00b7 total<" in page  # legend


def test_the_sample_table_filters_by_outcome_and_escapes_model_text(runs: tuple[Path, Path], tmp_path: Path) -> None:
    page = build_report(runs, tmp_path / "report.html")[0].read_text()
    table = re.search(r'<table id="sample-table".*?</table>', page, re.DOTALL).group(0)
    assert table.count('data-outcome="correct"') == 20 and table.count('data-outcome="wrong"') == 20
    assert table.count('data-run="1"') == 20  # run b: correct from the accuracy reward
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in table and ATTACK not in page
    assert page.count("<script>") == 1  # the page's own filter script, nothing from a completion
    assert '<form id="sample-filter" hidden>' in page  # without JavaScript: every row, no dead controls
    assert '<option value="correct">' in page and '<option value="10">10</option>' in page
    assert "<details><summary>prompt</summary><pre>What is 3 + 1?</pre></details>" in table


def test_the_page_needs_no_network(runs: tuple[Path, Path], tmp_path: Path) -> None:
    page = build_report(runs, tmp_path / "report.html")[0].read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=", page)


def test_a_run_without_some_metrics_gets_no_data_notes(tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.7}\n')
    out, _ = build_report([run])
    assert out == run / "report.html"
    page = out.read_text()
    assert _polyline_lengths(_figure(page, "reward")) == [2]
    assert "no data" in _figure(page, "kl") and 'id="eval"' not in page
    assert "no samples/step-*.jsonl" in page


def test_a_truncated_last_line_is_left_out(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "killed", 0.1)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "reward/me')
    loaded = load_run(run)
    assert [r["step"] for r in loaded.records] == list(range(1, 11))
    assert "incomplete" in loaded.notes[0]


def test_a_step_logged_twice_counts_once_as_last_written(tmp_path: Path) -> None:
    """A metrics.jsonl pieced together from two attempts at steps 2-3: the summary counted 5 steps
    and 500 tokens, and the reward line doubled back from step 3 to step 2."""
    run = tmp_path / "twice"
    run.mkdir()
    steps = [(1, 0.1), (2, 0.2), (3, 0.3), (2, 0.25), (3, 0.35)]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": r, "tokens/generated": 100.0,
                                                           "time/step": 2.0}) + "\n" for s, r in steps))
    loaded = load_run(run)
    assert [(r["step"], r["reward/mean"]) for r in loaded.records] == [(1, 0.1), (2, 0.25), (3, 0.35)]
    assert loaded.notes == [f"{run / 'metrics.jsonl'} logs 2 step(s) more than once; the last record of each is used"]
    facts = summary(loaded)
    assert facts["steps"] == "3 (1 to 3)" and facts["tokens"] == "300 generated" and facts["wall time"] == "6.0s"
    page = build_report([run])[0].read_text()
    assert _polyline_lengths(_figure(page, "reward")) == [3]


def test_a_long_run_is_charted_as_means_of_consecutive_steps(tmp_path: Path) -> None:
    """10,000 noisy steps drawn point by point filled the chart with a solid band of ink (and 10,000
    points per line into the page). A series longer than MAX_POINTS is drawn as the means of runs of
    consecutive logged steps, and the figure says so."""
    from grpo_cli.report import MAX_POINTS

    run = tmp_path / "long"
    run.mkdir()
    # accuracy alternates 0, 1: each mean over an even run of steps is exactly 0.5.
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "accuracy": float(s % 2), "kl": 0.5})
                                               + "\n" for s in range(1, 10_001)))
    page = build_report([run])[0].read_text()
    figure = _figure(page, "accuracy")
    size = -(-10_000 // MAX_POINTS)  # ceil: steps per point
    assert size % 2 == 0 and _polyline_lengths(figure) == [-(-10_000 // size)]
    points = re.search(r'<polyline [^>]*points="([^"]*)"', figure).group(1).split()
    assert len({p.split(",")[1] for p in points}) == 1  # every point 0.5: one height
    assert f"mean of {size} consecutive logged steps" in figure
    # Few steps: drawn as they are, with no note.
    assert "consecutive" not in _figure(build_report([_write_run(tmp_path / "short", 0.1)])[0].read_text(), "accuracy")


def test_tokens_and_time_of_a_run_not_logged_every_step_say_so(tmp_path: Path) -> None:
    """logging.log_every=10: metrics.jsonl holds steps 10, 20, ..., 50, each with that step's tokens and time.
    The summary's sums (500 tokens, 10 s) are of those 5 steps, not of the 50 run: it said so for
    neither, and the page's table read as the run's totals."""
    run = tmp_path / "sparse"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": 0.5, "tokens/generated": 100.0,
                                                           "time/step": 2.0}) + "\n" for s in range(10, 51, 10)))
    facts = summary(load_run(run))
    assert facts["steps"] == "5 (10 to 50)"
    assert facts["tokens"] == "500 generated in the 5 logged steps of 50"
    assert facts["wall time"] == "10.0s in the 5 logged steps of 50"
    page = build_report([run])[0].read_text()
    assert "<td>500 generated in the 5 logged steps of 50</td>" in page


def test_the_evaluation_before_training_is_no_training_step(tmp_path: Path) -> None:
    """trainer.eval_before_train logs step 0 with eval figures only: it is charted, not counted."""
    run = tmp_path / "baseline"
    run.mkdir()
    records = [{"step": 0, "eval/chain_sum/pass@1": 0.1, "time/eval": 3.0},
               {"step": 1, "reward/mean": 0.2, "tokens/generated": 100.0, "time/step": 2.0},
               {"step": 2, "reward/mean": 0.4, "tokens/generated": 100.0, "time/step": 2.0,
                "eval/chain_sum/pass@1": 0.3, "time/eval": 3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    facts = summary(load_run(run))
    assert facts["steps"] == "2 (1 to 2)" and facts["reward"] == "0.300 -> 0.300"  # both means over steps 1-2
    assert facts["best eval"] == "chain_sum pass@1 0.300 at step 2" and facts["wall time"] == "10.0s"
    (run / "metrics.jsonl").write_text(json.dumps(records[0]) + "\n")  # stopped in its first step
    assert summary(load_run(run))["steps"] == "0"


# ----------------------------------------------------------------------------- the command
def test_grpo_report_prints_a_summary_per_run(grpo, runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "compare.html"
    result = grpo("report", *map(str, runs), "-o", str(out))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    # a: reward = step/10: mean of steps 1-5 is 0.3, of 6-10 0.8. b: step/20: 0.15 and 0.4.
    assert "reward     0.300 -> 0.800" in text and "reward     0.150 -> 0.400" in text
    assert "best eval  chain_sum pass@1 0.400 at step 10" in text
    assert "tokens     1,000 generated" in text
    assert "wall time  23.0s" in text  # 10 x 2 s per step + 2 x 1.5 s eval
    assert text.strip().endswith(f"report: {out}") and out.is_file()


def test_one_run_writes_its_report_into_the_run(grpo, runs: tuple[Path, Path]) -> None:
    result = grpo("report", str(runs[1]))
    assert result.returncode == 0, result.stderr
    assert (runs[1] / "report.html").is_file() and "steps      10 (1 to 10)" in result.stdout


def test_help_shows_examples(grpo) -> None:
    result = grpo("report", "--help")
    assert result.returncode == 0 and "Examples" in result.stdout and "grpo report runs/" in result.stdout


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "no such directory"),
    ("no_metrics", "not a run directory (no metrics.jsonl)"),
    ("empty", "holds no steps yet"),
    ("corrupt", "line 1 is not JSON"),
])
def test_bad_runs_are_one_line_errors(grpo, tmp_path: Path, setup: str, message: str) -> None:
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    if setup in ("empty", "corrupt"):
        (run / "metrics.jsonl").write_text("" if setup == "empty" else '{"step": 1,,\n{"step": 2}\n')
    result = grpo("report", str(run))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_run_given_as_run_equals_names_the_plain_form(tmp_path: Path) -> None:
    """`grpo report run=RUN`, as grpo eval takes it, said "run=RUN: no such directory" of a run that exists."""
    from grpo_cli.errors import UserError
    from grpo_cli.report import load_run

    with pytest.raises(UserError) as caught:
        load_run(Path(f"run={tmp_path}"))
    assert str(caught.value) == (f"run={tmp_path}: grpo report takes run directories as they are, without run=: "
                                 f"grpo report {tmp_path}")


def test_a_report_that_cannot_be_written_is_a_one_line_error(grpo, runs: tuple[Path, Path]) -> None:
    """A run directory one may read but not write (another user's run, a read-only mount), or an --output
    under a file: the page could not be written and the command ended in a traceback."""
    out = runs[0] / "metrics.jsonl" / "report.html"
    result = grpo("report", str(runs[0]), "-o", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: cannot write the report to {out} (FileExistsError: [Errno 17] File exists: "
                                     f"'{runs[0] / 'metrics.jsonl'}'); pass --output FILE in a folder you can write")


def test_unreadable_runs_name_the_file_and_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "metrics.jsonl").write_bytes(b'{"step": 1}\n{"step": 2, "x\xff": 1}\n')
    with pytest.raises(UserError) as caught:
        load_run(run)
    assert str(caught.value) == (f"{run / 'metrics.jsonl'} line 2 is not UTF-8 text (byte 0xff at column 15); the file "
                                 "is damaged: delete that line and run `grpo report` again")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "samples" / "step-000001.jsonl").write_bytes(b'{"completion": "\xc3"}\n')
    with pytest.raises(UserError, match="step-000001.jsonl line 1 is not UTF-8 text"):
        load_run(run)
    with pytest.raises(UserError) as caught:
        load_run(run / "metrics.jsonl")
    assert str(caught.value) == (f"{run / 'metrics.jsonl'} is a file, not a run directory; pass the folder "
                                 f"`grpo train` wrote: here {run}")


# ----------------------------------------------------------------------------- in a browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    pytest.skip("no chromium on PATH: `make test` installs Debian's chromium (tests/setup_browser.sh) where it "
                "runs as root with apt-get")


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_browser_renders_the_plots(runs: tuple[Path, Path], tmp_path: Path) -> None:
    out = build_report(runs, tmp_path / "report.html")[0]
    dom = _browser(tmp_path, "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<polyline") == out.read_text().count("<polyline") > 0
    assert "40 of 40 samples" in dom.stdout  # the filter script ran and counted the rows
    assert '<form id="sample-filter">' in dom.stdout  # ... and showed its controls

    Image = pytest.importorskip("PIL.Image")
    png = tmp_path / "report.png"
    shot = _browser(tmp_path, f"--screenshot={png}", "--window-size=1280,2400", out.as_uri())
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 2400)
    # The plots sit below the run table: that band must hold the two runs' line colours.
    band = image.crop((0, 200, 1280, 1400))
    pixels = list(band.getdata())
    assert sum(p != (255, 255, 255) for p in pixels) > 0.02 * len(pixels)

    def near(colour: str) -> int:
        target = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        return sum(sum(abs(a - b) for a, b in zip(p, target, strict=True)) < 40 for p in pixels)

    assert near("#4e79a7") > 500 and near("#f28e2b") > 500  # run a blue, run b orange
