"""The `grpo` command: train, eval, report, config, recipes, rollout-server.

Every command but `report` takes Hydra-style overrides (key=value, +new_key=value, ~key, group=option). User
mistakes print one line on stderr and exit with code 2; an unreachable or failing rollout server one
line and code 1; bugs keep their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from grpo_cli.errors import RolloutServerError, SameOnEveryRank, UserError

# Where the click that typer runs on defines its errors: click itself, or (typer >= 0.26) typer's own copy.
click_errors = sys.modules[typer.BadParameter.__module__]

app = typer.Typer(
    name="grpo",
    help="Train language models with GRPO (Group Relative Policy Optimization).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    epilog="""
**Examples**

    grpo recipes
    grpo config recipe=r1_zero_math trainer.lr=3e-6
    grpo train recipe=quickstart
    grpo train recipe=gsm8k model=qwen2_5_1_5b +rewards.tags.fn=tag_count ~rewards.format
    grpo report runs/quickstart/20261122-101500
    grpo COMMAND --help
""",
)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides in Hydra's grammar: key=value, +new_key=value, ~key, group=option.",
                   show_default=False),
]
ConfigDir = Annotated[
    Path | None,
    typer.Option("--config-dir", "-c", help="A folder with your own recipes/ and config groups (model/, dataset/, ...).",
                 show_default=False),
]


@app.command(epilog="""
**Examples**

    grpo train recipe=quickstart
    grpo train recipe=r1_zero_math model.name_or_path=Qwen/Qwen2.5-1.5B trainer.lr=1e-6
    grpo train recipe=gsm8k rollout.group_size=16 loss.beta=0 rewards=shaped
    grpo train recipe=gsm8k +rewards.tags.fn=tag_count +rewards.tags.weight=0.2 ~rewards.format
    grpo train recipe=gsm8k +rewards.mine.fn=my_rewards.py:brevity +rewards.mine.weight=0.2
    grpo train --config-dir ./my_configs recipe=my_recipe
    grpo train resume=runs/quickstart/20261122-101500
""")
def train(overrides: Overrides = None, config_dir: ConfigDir = None) -> None:
    """Train a model with GRPO. The run directory gets config.yaml, metrics.jsonl, samples/, checkpoints/."""
    from grpo_cli.config import compose, resume_config

    overrides = overrides or []
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    with _once_per_node():
        _no_bare_run_dir(overrides, "resume")
        if resume:
            if config_dir is not None:
                raise UserError("--config-dir does not apply with resume=: a resumed run uses its saved "
                                "config.yaml; drop --config-dir")
            cfg = resume_config(resume[-1], [o for o in overrides if not o.startswith("resume=")])
        else:
            cfg = compose(overrides, config_dir)
    from grpo_cli.distributed import launched_rank
    from grpo_cli.learner import TrainingError  # torch and transformers: only once the config is good
    from grpo_cli.loop import finished_step
    from grpo_cli.loop import train as run_training

    main = launched_rank() == 0  # under torchrun every rank runs this: rank 0 alone reports
    done = finished_step(cfg)
    if done is not None:  # not an error: say so without loading anything
        if main:
            typer.echo(f"nothing to train: {cfg.resume} already reached step {done} (trainer.max_steps="
                       f"{cfg.trainer.max_steps}); to train further, raise it, e.g. grpo train resume={cfg.resume} "
                       f"trainer.max_steps={2 * done}", err=True)
        return
    try:
        with _once_per_node(SameOnEveryRank):
            run = run_training(cfg)
    except TrainingError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if main:
        typer.echo(f"done: {run}")


@app.command(name="eval", epilog="""
**Examples**

    grpo eval model.name_or_path=smollm2-135m-instruct dataset=chain_sum eval.n=4 eval.k=[1,4] eval.temperature=1.0
    grpo eval run=runs/quickstart/20261122-101500 eval.datasets=[chain_sum]
    grpo eval run=runs/default/20261122-101500 eval.datasets=[data/test.jsonl]
    grpo eval run=runs/quickstart/20261122-101500 checkpoint=20 --limit 50
    grpo eval model.name_or_path=Qwen/Qwen2.5-Math-1.5B dataset=math500 eval.n=16 eval.k=[1,4,16] eval.temperature=0.6
    grpo eval recipe=r1_zero_math checkpoint=./my-model eval.datasets=[math500,aime24,amc23]
""")
def evaluate(
    overrides: Overrides = None,
    config_dir: ConfigDir = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Evaluate only the first N problems of each dataset "
                                              "(eval.limit).", show_default=False)] = None,
) -> None:
    """Evaluate a model or checkpoint: pass@k, maj@k, avg@n; writes results.json and samples.jsonl.

    `run=RUN_DIR` evaluates a training run's latest checkpoint with the run's saved config (`checkpoint=STEP`
    picks another); `checkpoint=FOLDER` evaluates a model folder. Output: `output_dir`, else RUN_DIR/eval/...
    or runs/eval/...
    """
    from grpo_cli.evaluate import format_table, load_target, run_eval

    shorthands = ("run=", "checkpoint=")
    overrides = [f"eval.{o}" if o.startswith(shorthands) else o for o in overrides or []]
    if limit is not None:
        overrides.append(f"eval.limit={limit}")
    with _once_per_node():
        _no_bare_run_dir(overrides, "run")
        target = load_target(overrides, config_dir)
    out, results = run_eval(target, say=lambda line: typer.echo(line, err=True))
    typer.echo(format_table({r.label: {"problems": r.problems, **r.metrics} for r in results}))
    typer.echo(f"results: {out / 'results.json'}")


@app.command(epilog="""
**Examples**

    grpo config recipe=r1_zero_math trainer.lr=3e-6
    grpo config recipe=quickstart rewards=shaped rollout.group_size=16
    grpo config recipe=quickstart +rewards.tags.fn=tag_count +rewards.tags.weight=0.2
    grpo config recipe=r1_zero_math model=qwen2_5_1_5b ~rewards.format
    grpo config --config-dir ./my_configs recipe=my_recipe
""")
def config(overrides: Overrides = None, config_dir: ConfigDir = None) -> None:
    """Print the fully composed, resolved configuration as YAML (exactly what `grpo train` would run)."""
    from grpo_cli.config import compose, to_yaml

    typer.echo(to_yaml(compose(overrides or [], config_dir)), nl=False)


@app.command(epilog="""
**Examples**

    grpo recipes
    grpo recipes --config-dir ./my_configs
""")
def recipes(config_dir: ConfigDir = None) -> None:
    """List the recipes (full experiments) with a one-line description each."""
    from grpo_cli.config import find_recipes, recipe_description, user_config_dir

    found = {name: recipe_description(path) for name, path in find_recipes(user_config_dir(config_dir)).items()}
    width = max(map(len, found), default=0)
    for name, description in found.items():
        typer.echo(f"{name:<{width}}  {description}")


@app.command(epilog="""
**Examples**

    grpo report runs/quickstart/20261122-101500
    grpo report runs/quickstart/20261122-101500 -o quickstart.html
    grpo report runs/gsm8k/20261122-101500 runs/gsm8k/20261123-090000 -o compare.html
""")
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories written by `grpo train`.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The HTML file to write (default: "
                                                "RUN_DIR/report.html for one run, ./grpo-report.html for several).",
                                                show_default=False)] = None,
) -> None:
    """Plot a run, or several overlaid, into one self-contained HTML page (reward, accuracy, length,
    reflection, KL, clipping, entropy, grad norm, time per phase, evals, browsable samples); print a summary."""
    from grpo_cli.report import build_report, summary_text

    out, read = build_report(runs, output)
    typer.echo(summary_text(read, out))


@app.command(name="rollout-server", epilog="""
**Examples**

    GRPO_ROLLOUT_TOKEN=secret grpo rollout-server model.name_or_path=Qwen/Qwen2.5-1.5B --host 0.0.0.0 --port 8000 \
        --weights-dir /shared/runs
    CUDA_VISIBLE_DEVICES=4,5 grpo rollout-server recipe=gsm8k rollout.tensor_parallel_size=2 --port 8000
    grpo rollout-server recipe=quickstart rollout.cpu_kv_cache_mib=512 --port 0

Then: `grpo train recipe=gsm8k rollout=vllm_server rollout.servers=[HOST:8000]` (docs/distributed.md, "Rollout servers"),
with the same GRPO_ROLLOUT_TOKEN in the trainer's environment.
""")
def rollout_server(
    overrides: Overrides = None,
    config_dir: ConfigDir = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535,
                                      help="Port to listen on (0: any free one, printed).")] = 8000,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="GRPO_ROLLOUT_TOKEN", show_default=False,
        help="Shared secret every request but /health must carry (Authorization: Bearer); the trainer reads it "
             "from GRPO_ROLLOUT_TOKEN. Prefer that variable here too: a command line is visible to other users.")] = None,
    weights_dir: Annotated[list[Path] | None, typer.Option(
        "--weights-dir", show_default=False,
        help="Load pushed weights only from under this folder (repeatable), e.g. the folder holding the runs' "
             "output_dir. Default: any path the server can read.")] = None,
) -> None:
    """Serve rollouts for `rollout=vllm_server`: a vLLM engine behind HTTP that takes weight updates.

    Takes the training run's overrides (model.*, rollout.max_new_tokens, rollout.tensor_parallel_size, ...);
    prints `ready: ... on HOST:PORT` once it serves, and runs until Ctrl-C or SIGTERM.
    """
    from grpo_cli.config import compose
    from grpo_cli.rollout.server import serve

    # The server hosts an in-process engine, whatever `rollout.engine` the training run uses.
    cfg = compose([*(overrides or []), "rollout.engine=vllm"], config_dir)
    serve(cfg, host, port, say=lambda line: typer.echo(line, err=True), token=token, weights_dirs=weights_dir or ())


def _no_bare_run_dir(overrides: list[str], key: str) -> None:
    """`grpo eval runs/x/TIME`, a run directory without its key, is no override (Hydra's parse error)."""
    for o in overrides:
        if "=" not in o and Path(o).is_dir():
            raise UserError(f"'{o}' is a directory, not an override: give it as {key}={o}")


@contextmanager
def _once_per_node(kind: type[UserError] = UserError) -> Iterator[None]:
    """Under torchrun every process composes the same config from the same files: the first process
    of each node (LOCAL_RANK 0) reports a mistake in it (a UserError of `kind`), the others exit with the
    same code quietly, so that the error is not printed once per GPU."""
    try:
        yield
    except kind:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            raise typer.Exit(2) from None
        raise


def main() -> None:
    try:
        code = app(standalone_mode=False)  # click's errors come here, to be worded as ours
    except getattr(click_errors, "NoArgsIsHelpError", ()):  # `grpo` alone: the help is printed already
        sys.exit(2)
    except click_errors.UsageError as e:  # an unknown command or option, a missing or malformed argument
        typer.echo(f"error: {usage_error(e)}", err=True)
        sys.exit(2)
    except click_errors.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except RolloutServerError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def usage_error(error: Any) -> str:
    """Click's usage error as one line, with where to look (and, for an option that is really a
    setting, the override that sets it)."""
    from grpo_cli.config import keys_named

    text = " ".join(error.format_message().split())
    ctx = error.ctx
    if ctx is None:
        return text
    takes_overrides = any(p.name == "overrides" for p in ctx.command.params)
    if isinstance(error, click_errors.NoSuchOption) and takes_overrides:
        keys = keys_named(error.option_name.lstrip("-").replace("-", "_"))
        example = " or ".join(f"{k}=VALUE" for k in keys) if keys else "trainer.lr=1e-6"
        return f"{text}; settings are overrides without dashes, e.g. {example} (see {ctx.command_path} --help)"
    return f"{text} (see {ctx.command_path} --help)"
