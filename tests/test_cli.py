"""The real `grpo` command in a subprocess: help, recipes, config, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from grpo_cli.config import compose, to_yaml


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["config"], ["recipes"]])
def test_help(grpo, command: list[str]) -> None:
    result = grpo(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
    if command and command != ["recipes"]:
        assert "Examples" in result.stdout and "grpo " in result.stdout


def test_recipes_lists_each_with_a_description(grpo) -> None:
    result = grpo("recipes")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert set(lines) == {"countdown", "gsm8k", "quickstart", "r1_zero_math"}
    assert "SmolLM2-135M-Instruct" in lines["quickstart"]


def test_recipes_checks_its_config_dir_like_config(grpo, tmp_path: Path) -> None:
    line = _one_line_error(grpo("recipes", "--config-dir", str(tmp_path / "nope")))
    assert line.startswith(f"error: --config-dir {tmp_path / 'nope'}: no such directory")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "broken.yaml").write_text("description: [oops\n  x: :\n")
    result = grpo("recipes", "--config-dir", str(tmp_path))
    assert "broken.yaml is not valid YAML" in _one_line_error(result)
    assert result.stdout == ""  # nothing listed before the error


def test_config_prints_the_resolved_config_with_overrides(grpo) -> None:
    result = grpo("config", "recipe=r1_zero_math", "trainer.lr=3e-6", "rollout.group_size=4")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["recipe"] == "r1_zero_math"
    assert cfg["trainer"]["lr"] == 3e-6
    assert cfg["rollout"]["group_size"] == 4
    assert cfg["model"]["name_or_path"] == "Qwen/Qwen2.5-Math-1.5B"


def _one_line_error(result) -> str:  # noqa: ANN001
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().endswith(errors[0]), result.stderr  # the error is the last word
    return errors[0]


def test_unknown_key_exits_2_naming_it(grpo) -> None:
    line = _one_line_error(grpo("train", "recipe=quickstart", "trainer.not_a_key=1"))
    assert "trainer.not_a_key" in line


@pytest.mark.parametrize(("command", "named"), [(["train", "trainer.not_a_key=1"], "trainer.not_a_key"),
                                               (["eval", "run=no/such/run"], "run=no/such/run")])
def test_under_torchrun_a_config_mistake_is_said_once_per_node(command: list[str], named: str, monkeypatch) -> None:
    """torchrun starts one process per GPU, each composing the same config: only LOCAL_RANK 0 says what
    is wrong; the others exit with the same code and print nothing."""
    import subprocess
    import sys

    def run(local_rank: str) -> subprocess.CompletedProcess[str]:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        return subprocess.run([sys.executable, "-m", "grpo_cli", *command], capture_output=True, text=True, timeout=120)

    first, other = run("0"), run("1")
    assert named in _one_line_error(first)
    assert (other.returncode, other.stdout, other.stderr) == (2, "", "")


@pytest.mark.parametrize(("args", "expected"), [
    (["config", "trainer.lr=fast"], "'fast' is not a valid float"),
    (["config", "optimizer.master_weights=maybe"], "use true or false (or null: the default)"),
    (["config", "recipe=r1_zero"], "unknown recipe 'r1_zero'"),
    (["config", "rollout=vlm"], "unknown rollout option 'vlm'"),
    (["config", "trainer.lr"], "cannot parse override"),
    (["eval", "eval.n=1", "eval.k=[4]"], "every k must be between 1 and eval.n=1"),
    (["train", "model.name_or_path=/no/such/model"], "model.name_or_path=/no/such/model: no such directory"),
    (["train", "model.name_or_path=nobody/no-such-model-xyz"], "not a local directory, a built-in model"),
    (["config", "dataset.task=chain_sun"], "not a reasoning-gym task (did you mean chain_sum"),
    (["config", "--config-dir", "/no/such/dir"], "--config-dir /no/such/dir: no such directory"),
])
def test_bad_input_exits_2_with_one_line(grpo, args: list[str], expected: str) -> None:
    assert expected in _one_line_error(grpo(*args))


@pytest.mark.parametrize(("command", "key"), [("eval", "run"), ("train", "resume")])
def test_a_run_directory_given_bare_names_its_key(grpo, tmp_path: Path, command: str, key: str) -> None:
    """`grpo eval runs/x/TIME` (no run=) was "cannot parse override: Error parsing override ..."."""
    assert _one_line_error(grpo(command, str(tmp_path))) == (
        f"error: '{tmp_path}' is a directory, not an override: give it as {key}={tmp_path}")


@pytest.mark.parametrize(("args", "expected"), [
    (["trian", "recipe=quickstart"], "error: No such command 'trian'. Did you mean 'train'?"),
    (["train", "--lr", "1e-6"], "settings are overrides without dashes, e.g. trainer.lr=VALUE"),
    (["report"], "error: Missing argument 'runs'."),
    (["eval", "--limit", "abc"], "error: Invalid value for '--limit'"),
    (["rollout-server", "--port", "99999"], "error: Invalid value for '--port'"),  # 0 (any free port) to 65535
    (["rollout-server", "--port", "-1"], "error: Invalid value for '--port'"),
])
def test_usage_errors_are_one_line_with_exit_code_2(grpo, args: list[str], expected: str) -> None:
    line = _one_line_error(grpo(*args))
    assert expected in line and line.endswith(" --help)")


def test_missing_dataset_column_names_the_columns(grpo, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "solution": "2"}) + "\n")
    line = _one_line_error(grpo("train", "dataset=jsonl", f"dataset.path={data}", f"output_dir={tmp_path / 'run'}"))
    assert "no column 'question' (dataset.problem_column)" in line
    assert "problem, solution" in line
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_a_run_that_fails_before_its_first_step_leaves_nothing_that_blocks_the_fix(grpo, tmp_path: Path,
                                                                                  tiny_model_dir: Path) -> None:
    """The run directory is made before the model loads: a model that cannot load there left config.yaml
    behind, and the corrected command then failed with "already holds files"."""
    tiny = ["recipe=quickstart", f"model.name_or_path={tiny_model_dir}", "trainer.max_steps=1",
            "trainer.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=4", "rollout.engine=hf"]
    run = tmp_path / "run"
    line = _one_line_error(grpo("train", *tiny, "model.attn_implementation=bogus", f"output_dir={run}", cwd=tmp_path))
    assert "attn_implementation=\"bogus\"" in line
    assert not run.exists() or not any(run.iterdir())
    line = _one_line_error(grpo("train", *tiny, "rollout.max_prompt_tokens=5", cwd=tmp_path))  # no output_dir
    assert line.startswith("error: every prompt is longer than 5 tokens")
    assert not any((tmp_path / "runs" / "quickstart").iterdir())  # its fresh runs/quickstart/<time> is gone too
    result = grpo("train", *tiny, f"output_dir={run}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step-000001").is_dir()


def test_a_run_logging_to_wandb_that_fails_before_its_first_step_leaves_nothing_behind(
        grpo, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B starts before the model loads: a run that then failed left W&B's wandb/ and its wandb_id in
    output_dir, and the corrected command failed with "already holds files"."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    line = _one_line_error(grpo("train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}",
                                "rollout.engine=hf", "rollout.max_prompt_tokens=5", "logging=wandb",
                                "logging.wandb_mode=offline", f"output_dir={run}", cwd=tmp_path))
    assert line.startswith("error: every prompt is longer than 5 tokens")
    assert not any(run.iterdir())


def test_a_tensor_parallel_size_the_machine_lacks_is_one_line(grpo, tmp_path: Path, tiny_model_dir: Path) -> None:
    """On a CPU (2 cores, one NUMA node) vLLM raised an AssertionError about NUMA nodes, with a traceback,
    after the model had loaded; a GPU machine with fewer GPUs than the size is told how many it has."""
    line = _one_line_error(grpo("train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}",
                                "rollout.tensor_parallel_size=64", "rollout.cpu_kv_cache_mib=64",
                                f"output_dir={tmp_path / 'run'}", timeout=600))
    assert line.startswith("error: rollout.tensor_parallel_size=64: ")
    assert "set rollout.tensor_parallel_size=1" in line or "GPU(s) visible here; set it to at most" in line
    assert not any((tmp_path / "run").iterdir())  # nothing left to block the corrected command


def test_a_tensor_parallel_size_above_the_visible_gpus_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from grpo_cli.errors import UserError
    from grpo_cli.rollout.vllm import _check_parallel

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _check_parallel(2, cuda=True)
    with pytest.raises(UserError) as caught:
        _check_parallel(4, cuda=True)
    assert str(caught.value) == ("rollout.tensor_parallel_size=4: 2 GPU(s) visible here; set it to at most 2, or make "
                                 "more GPUs visible (CUDA_VISIBLE_DEVICES)")


def test_existing_run_is_never_overwritten(grpo, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    line = _one_line_error(grpo("train", "recipe=quickstart", f"output_dir={run}"))
    assert "already holds files" in line and f"resume={run}" in line
    assert (run / "metrics.jsonl").read_text() == "{}\n"


def test_train_writes_the_resolved_config_into_the_run_dir(grpo, tmp_path: Path, tiny_model_dir: Path) -> None:
    result = grpo("train", "recipe=quickstart", "trainer.lr=4e-6", f"model.name_or_path={tiny_model_dir}",
                  "trainer.max_steps=1", "trainer.prompts_per_step=1", "rollout.group_size=2",
                  "rollout.max_new_tokens=4", "rollout.cpu_kv_cache_mib=64", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (run,) = (tmp_path / "runs" / "quickstart").iterdir()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["lr"] == 4e-6 and saved["recipe"] == "quickstart"
    assert (run / "checkpoints").is_dir() and (run / "samples").is_dir()


def test_a_resumed_run_takes_no_config_dir(grpo, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(to_yaml(compose(["recipe=quickstart"])))
    line = _one_line_error(grpo("train", f"resume={tmp_path}", "--config-dir", str(tmp_path)))
    assert line == "error: --config-dir does not apply with resume=: a resumed run uses its saved config.yaml; " \
                   "drop --config-dir"


def test_an_output_dir_that_is_a_file_fails_first(grpo, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    line = _one_line_error(grpo("train", "recipe=quickstart", f"output_dir={tmp_path / 'notes.txt'}"))
    assert line == f"error: output_dir={tmp_path / 'notes.txt'} is a file, not a folder; choose another output_dir"


def test_resuming_a_finished_run_says_so_without_loading_anything(grpo, tmp_path: Path) -> None:
    # The model does not exist: loading it would fail, so exit code 0 shows nothing was loaded.
    (tmp_path / "config.yaml").write_text(to_yaml(compose(["trainer.max_steps=4", "model.name_or_path=/no/model"])))
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000004" / "trainer_state.pt").write_bytes(b"")
    result = grpo("train", f"resume={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == (f"nothing to train: {tmp_path} already reached step 4 (trainer.max_steps=4); "
                                     f"to train further, raise it, e.g. grpo train resume={tmp_path} trainer.max_steps=8")
