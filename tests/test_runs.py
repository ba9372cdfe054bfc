"""Run directories and atomic writes."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import yaml

from grpo_cli.config import compose, resume_config, to_yaml
from grpo_cli.errors import UserError
from grpo_cli.runs import atomic_write_text, check_run_dir, prepare_run_dir


def test_fresh_runs_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose(["recipe=quickstart"])
    first, second = prepare_run_dir(cfg), prepare_run_dir(cfg)
    assert first != second
    assert first.parent == second.parent == Path("runs/quickstart")
    for run in (first, second):
        assert (run / "config.yaml").read_text() == to_yaml(cfg)
        assert yaml.safe_load((run / "config.yaml").read_text())["recipe"] == "quickstart"


def test_named_output_dir_must_be_empty_and_resume_needs_a_run(tmp_path: Path) -> None:
    cfg = dataclasses.replace(compose([]), output_dir=str(tmp_path / "run"))
    run = prepare_run_dir(cfg)
    assert run == tmp_path / "run" and (run / "checkpoints").is_dir()
    with pytest.raises(UserError, match="already holds files"):
        prepare_run_dir(cfg)
    assert prepare_run_dir(dataclasses.replace(cfg, resume=str(run))) == run
    with pytest.raises(UserError, match="not a run directory"):
        prepare_run_dir(dataclasses.replace(cfg, resume=str(tmp_path)))


def test_an_output_dir_that_is_a_file_fails_before_anything_loads(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for output_dir, message in ((file, f"output_dir={file} is a file, not a folder; choose another output_dir"),
                                (file / "run", f"output_dir={file / 'run'}: {file} is a file, not a folder")):
        cfg = dataclasses.replace(compose([]), output_dir=str(output_dir))
        with pytest.raises(UserError) as caught:
            check_run_dir(cfg)  # what `grpo train` checks first
        assert message in str(caught.value)
        with pytest.raises(UserError):
            prepare_run_dir(cfg)
    assert file.read_text() == "mine"


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["file.txt"]


def test_a_resumed_run_keeps_its_saved_config(tmp_path: Path) -> None:
    run = prepare_run_dir(dataclasses.replace(compose(["recipe=quickstart"]), output_dir=str(tmp_path / "run")))
    assert resume_config(str(run), ["trainer.max_steps=5"]).trainer.max_steps == 5
    for change in ("rewards=shaped", "recipe=gsm8k", "+trainer.foo=1"):
        with pytest.raises(UserError, match=re.escape(f"'{change}' is not one: a resumed run keeps its recipe and group "
                                                      "options (model=, rewards=, ...); start a new run to change them")):
            resume_config(str(run), [change])


def test_a_damaged_saved_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("trainer: [1,\n  : :\n")
    with pytest.raises(UserError) as caught:
        resume_config(str(tmp_path), [])
    assert str(caught.value) == (f"{tmp_path / 'config.yaml'} is not valid YAML (expected the node content, but found "
                                 "':', line 2); the run's saved config is damaged: repair it, or start a new run")


def _checkpoint(run: Path, step: int) -> Path:
    """A small checkpoint folder as `checkpoint.save` lays it out: config.json, weights, trainer state."""
    import torch
    from safetensors.torch import save_file

    folder = run / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
    torch.save({"step": step}, folder / "trainer_state.pt")
    return folder


@pytest.mark.parametrize(("file", "content", "problem"), [
    ("trainer_state.pt", b"garbage\n", "trainer_state.pt is truncated or corrupt (not a torch.save archive)"),
    ("model.safetensors", None, "model.safetensors is truncated or corrupt (Error while deserializing header"),
    ("config.json", b'{"model_type": ', "config.json is not valid JSON"),
])
def test_a_damaged_checkpoint_is_named_before_a_resume_loads_anything(tmp_path: Path, file: str,
                                                                      content: bytes | None, problem: str) -> None:
    from grpo_cli.loop import check_resumable

    _checkpoint(tmp_path, 2)
    latest = _checkpoint(tmp_path, 4)
    check_resumable(tmp_path)  # whole: no error
    target = latest / file
    target.write_bytes(content if content is not None else target.read_bytes()[:-10])  # None: truncated
    with pytest.raises(UserError) as caught:
        check_resumable(tmp_path)
    assert str(caught.value).startswith(f"checkpoint {latest} is damaged: {problem}")
    assert str(caught.value).endswith(f"; move it out of {latest.parent} to resume from step-000002, or start a new run")


def test_resuming_a_finished_run_is_noticed_before_anything_loads(tmp_path: Path) -> None:
    from grpo_cli.loop import finished_step

    _checkpoint(tmp_path, 4)
    cfg = dataclasses.replace(compose(["trainer.max_steps=4"]), resume=str(tmp_path))
    assert finished_step(cfg) == 4
    assert finished_step(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=5))) is None


def test_a_resume_writes_its_overrides_into_the_runs_config(tmp_path: Path) -> None:
    """`grpo train resume=RUN trainer.max_steps=6` trains to 6; config.yaml says so afterwards, so a
    plain resume, `grpo eval run=` and `grpo report` see the run as it went on."""
    run = prepare_run_dir(dataclasses.replace(compose(["recipe=quickstart", "trainer.max_steps=4"]),
                                              output_dir=str(tmp_path / "run")))
    prepare_run_dir(resume_config(str(run), ["trainer.max_steps=6"]))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 6 and saved["resume"] is None
    assert resume_config(str(run), []).trainer.max_steps == 6


@pytest.mark.parametrize(("override", "was"), [("model.lora_rank=8", "0"), ("model.lora_alpha=16", "32.0"),
                                               ("model.lora_target_modules=[q_proj]", "['all-linear']")])
def test_a_resume_that_changes_the_trainable_parameters_is_a_user_error(tmp_path: Path, override: str,
                                                                       was: str) -> None:
    """The checkpoint's optimizer state is for the run's trainable parameters: a resume with LoRA switched
    on stopped at the optimizer's load_state_dict with a traceback."""
    run = prepare_run_dir(dataclasses.replace(compose(["recipe=quickstart"]), output_dir=str(tmp_path / "run")))
    key = override.split("=")[0]
    with pytest.raises(UserError, match=re.escape(f"resume={run}: {key} cannot change on resume (the run's weights "
                                                  f"and optimizer state have {key}={was}); start a new run")):
        resume_config(str(run), [override])
    assert resume_config(str(run), ["model.lora_rank=0", "model.lora_dropout=0.1"]).model.lora_dropout == 0.1


def test_a_run_another_process_is_writing_cannot_be_resumed(tiny_model_dir: Path, tmp_path: Path, grpo) -> None:
    """A second `grpo train resume=RUN` while the first still ran (a job requeued before the old one
    stopped) trained on: it deleted the first's checkpoint in progress and cut its metrics.jsonl away."""
    cfg = dataclasses.replace(compose(["recipe=quickstart", f"model.name_or_path={tiny_model_dir}", "rollout=hf",
                                       "trainer.max_steps=1", "trainer.prompts_per_step=1", "rollout.group_size=2",
                                       "rollout.max_new_tokens=2", "dataset.size=4"]), output_dir=str(tmp_path / "run"))
    run = prepare_run_dir(cfg)  # this process now writes the run, as a `grpo train` would
    result = grpo("train", f"resume={run}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == (f"error: resume={run}: another `grpo train` (process {os.getpid()}) is writing {run}; "
                             "wait for it to end, or stop it, then run this again\n")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.yaml", "samples"]
    from grpo_cli.runs import unlock_run

    unlock_run(run)  # as `grpo train` does when it ends
    result = grpo("train", f"resume={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run / "checkpoints" / "step-000001").is_dir()


def test_an_unwritable_output_folder_fails_before_anything_loads(tmp_path: Path, monkeypatch) -> None:
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    cfg = dataclasses.replace(compose(["recipe=quickstart"]), output_dir=str(tmp_path / "run"))
    with pytest.raises(UserError, match=re.escape(f"output_dir={tmp_path / 'run'}: cannot write in {tmp_path} "
                                                  "(Read-only file system); choose a writable folder")):
        check_run_dir(cfg)


def test_an_unwritable_working_directory_fails_before_anything_loads(tmp_path: Path, monkeypatch) -> None:
    """Without output_dir the run goes under ./runs: where that cannot be written, fresh_dir's mkdir
    raised a traceback once the data had loaded."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(UserError) as caught:
        check_run_dir(compose(["recipe=quickstart"]))
    assert str(caught.value) == (f"the run directory (under runs/quickstart, as no output_dir is set): cannot write in "
                                 f"{tmp_path} (Read-only file system); set output_dir to a writable folder, or run "
                                 "grpo from one")
    assert not (tmp_path / "runs").exists()


def test_metrics_cut_short_by_a_kill_are_dropped_on_resume(tmp_path: Path) -> None:
    from grpo_cli.logging import _truncate_after

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
    _truncate_after(metrics, 2)
    assert metrics.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n'
    metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # the cut line is the resumed step's own
    _truncate_after(metrics, 2)
    assert metrics.read_text() == '{"step": 1, "loss": 0.5}\n'


def test_samples_past_the_resumed_checkpoint_are_dropped(tmp_path: Path) -> None:
    """A run killed at step 7 and resumed from step 5 kept samples/step-000006.jsonl and 7: a resume
    stopped before reaching them again left the report showing the abandoned attempt's completions."""
    from grpo_cli.logging import RunLogger

    samples = tmp_path / "samples"
    samples.mkdir()
    names = [f"step-{s:06d}.jsonl" for s in range(4, 8)] + ["eval-step-000005.jsonl", "eval-step-000006.jsonl"]
    for name in [*names, "notes.jsonl"]:
        (samples / name).write_text("{}\n")
    cfg = dataclasses.replace(compose(["recipe=quickstart"]), output_dir=str(tmp_path))
    RunLogger(tmp_path, cfg, 5).close()
    assert sorted(p.name for p in samples.iterdir()) == ["eval-step-000005.jsonl", "notes.jsonl",
                                                          "step-000004.jsonl", "step-000005.jsonl"]


def test_a_resume_from_the_start_drops_the_step_0_evaluation_it_runs_again(tmp_path: Path) -> None:
    """A run with trainer.eval_before_train killed before its first checkpoint resumes at step 0 and
    evaluates the starting weights again: metrics.jsonl held two step-0 lines."""
    from grpo_cli.logging import RunLogger

    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "eval-step-000000.jsonl").write_text("{}\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/chain_sum/pass@1": 0.5}\n{"step": 1, "loss": 0.25}\n')
    cfg = dataclasses.replace(compose(["recipe=quickstart"]), output_dir=str(tmp_path))
    logger = RunLogger(tmp_path, cfg, 0)
    logger.log(0, {"eval/chain_sum/pass@1": 0.5})
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0, "eval/chain_sum/pass@1": 0.5}\n'
    assert list((tmp_path / "samples").iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_metrics_line_that_hits_a_full_disk_fails_once(tmp_path: Path) -> None:
    """The failed line stayed in the file's buffer and closing the logger (the training loop's `finally`)
    raised ENOSPC again: a traceback in place of the one-line full-disk error, and the engine left open."""
    import errno

    from grpo_cli.logging import RunLogger

    logger = RunLogger(tmp_path, dataclasses.replace(compose(["recipe=quickstart"]), output_dir=str(tmp_path)), 0)
    logger.metrics_file.close()
    logger.metrics_file = open("/dev/full", "a", encoding="utf-8")  # every write: no space left on device
    with pytest.raises(OSError) as caught:
        logger.log(1, {"loss": 0.25})
    assert caught.value.errno == errno.ENOSPC
    logger.close()


def test_a_full_disk_at_the_start_of_a_run_or_resume_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """Resumed after a full disk stopped it, without freeing enough: writing config.yaml (or cutting
    metrics.jsonl back to the checkpoint) raised ENOSPC out of `grpo train` as a traceback."""
    import errno

    from grpo_cli import logging as run_logging
    from grpo_cli import runs

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = dataclasses.replace(compose(["recipe=quickstart"]), output_dir=str(tmp_path / "run"))
    run = prepare_run_dir(cfg)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setattr(runs, "atomic_write_text", full)
    monkeypatch.setattr(run_logging, "atomic_write_text", full)
    resumed = dataclasses.replace(cfg, output_dir=None, resume=str(run))
    fix = "(No space left on device); free space there (or make it writable), then run the command again"
    with pytest.raises(UserError, match=re.escape(f"resume={run}: cannot write in {run} {fix}")):
        prepare_run_dir(resumed)
    with pytest.raises(UserError, match=re.escape(f"resume={run}: cannot write in {run} {fix}")):
        run_logging.RunLogger(run, resumed, 0)
    with pytest.raises(UserError, match=re.escape(f"the run directory: cannot write in {tmp_path / 'new'} {fix}")):
        prepare_run_dir(dataclasses.replace(cfg, output_dir=str(tmp_path / "new")))


def test_a_checkpoint_that_cannot_be_written_leaves_nothing_behind(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import errno

    import torch

    from grpo_cli import checkpoint
    from grpo_cli.learner import Learner, TrainingError

    learner = Learner(compose([f"model.name_or_path={tiny_model_dir}"]), torch.device("cpu"), pad_id=0)

    class Tokenizer:
        def save_pretrained(self, folder: Path) -> None:
            pass

    (tmp_path / "checkpoints" / ".tmp-step-000001-999").mkdir(parents=True)  # a killed process's
    checkpoint.remove_unfinished(tmp_path)
    assert list((tmp_path / "checkpoints").iterdir()) == []

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TrainingError, match=re.escape("could not write checkpoint step-000002 in ")
                       + ".*free disk space there, then resume the run: it continues after its start"):
        checkpoint.save(tmp_path, 2, learner, Tokenizer(), keep_last=0, data_position=0)
    assert list((tmp_path / "checkpoints").iterdir()) == []

    # A folder that turned read-only (a filesystem remounted read-only after an error): no space to free.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(torch, "save", read_only)
    with pytest.raises(TrainingError, match=re.escape("Read-only file system); make it writable, then resume")):
        checkpoint.save(tmp_path, 2, learner, Tokenizer(), keep_last=0, data_position=0)
    assert list((tmp_path / "checkpoints").iterdir()) == []

    # The weights are written first, by safetensors, whose error for a full disk is no OSError: it stopped
    # the run with a traceback and left the half-written checkpoint on the full disk.
    from safetensors import SafetensorError

    def full_disk_weights(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(learner, "save_weights", full_disk_weights)
    with pytest.raises(TrainingError, match=re.escape("No space left on device (os error 28)); free disk space there")):
        checkpoint.save(tmp_path, 2, learner, Tokenizer(), keep_last=0, data_position=0)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_checkpoint_is_on_disk_before_it_is_renamed_into_place(tiny_model_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Every file and folder of the checkpoint is fsynced before the rename that makes it `step-N`, and the
    checkpoints folder after it: otherwise a power cut can leave a step-N whose files are empty."""
    import torch

    from grpo_cli import checkpoint
    from grpo_cli.learner import Learner

    learner = Learner(compose([f"model.name_or_path={tiny_model_dir}"]), torch.device("cpu"), pad_id=0)

    class Tokenizer:
        def save_pretrained(self, folder: Path) -> None:
            (folder / "tokenizer.json").write_text("{}")

    synced: list[Path] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    at_rename: list[Path] = []

    def replace(src, dst):
        if Path(src).name.startswith(checkpoint.TMP_PREFIX):
            at_rename.extend(synced)
            expected = {Path(src), *Path(src).rglob("*")}
            assert expected <= set(synced), f"not flushed before the rename: {expected - set(synced)}"
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    final = checkpoint.save(tmp_path, 3, learner, Tokenizer(), keep_last=1, data_position=0)
    assert final.name == "step-000003" and at_rename, "the checkpoint was never renamed into place"
    assert {"model.safetensors", "config.json", "tokenizer.json", checkpoint.STATE_FILE} <= \
        {p.name for p in at_rename}
    assert synced[-1] == (tmp_path / "checkpoints").resolve()  # the rename made durable


class _Tokenizer:
    def save_pretrained(self, folder: Path) -> None:
        (folder / "tokenizer.json").write_text("{}")


def test_keep_last_prunes_only_the_run_s_own_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A copy the user made beside the checkpoints (step-000004-best) was counted as a step-4 checkpoint
    and deleted by keep_last; a folder named step-abc holding a trainer_state.pt stopped every save."""
    import shutil

    import torch

    from grpo_cli import checkpoint
    from grpo_cli.learner import Learner

    learner = Learner(compose([f"model.name_or_path={tiny_model_dir}"]), torch.device("cpu"), pad_id=0)
    for step in (2, 4):
        checkpoint.save(tmp_path, step, learner, _Tokenizer(), keep_last=0, data_position=0)
    folder = tmp_path / "checkpoints"
    for name in ("step-000004-best", "step-abc", "step-000010.tmp"):
        shutil.copytree(folder / "step-000004", folder / name)
    checkpoint.save(tmp_path, 6, learner, _Tokenizer(), keep_last=1, data_position=0)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000006"]
    assert sorted(p.name for p in folder.iterdir()) == ["step-000004-best", "step-000006", "step-000010.tmp",
                                                        "step-abc"]


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint_listed(tiny_model_dir: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """keep_last deleted an old checkpoint's files in place: a kill part-way left a step-N that still
    listed as complete (trainer_state.pt there) without its model.safetensors, for eval and resume."""
    import shutil

    import torch

    from grpo_cli import checkpoint
    from grpo_cli.learner import Learner

    learner = Learner(compose([f"model.name_or_path={tiny_model_dir}"]), torch.device("cpu"), pad_id=0)
    checkpoint.save(tmp_path, 2, learner, _Tokenizer(), keep_last=1, data_position=0)
    real_rmtree = shutil.rmtree

    def killed_part_way(path: Path, ignore_errors: bool = False) -> None:
        if (Path(path) / "model.safetensors").is_file():
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt  # stands for the kill: nothing after it runs
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(shutil, "rmtree", killed_part_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 4, learner, _Tokenizer(), keep_last=1, data_position=0)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000004"]
    checkpoint.remove_unfinished(tmp_path)  # what a resume does first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000004"]


def test_atomic_write_text_makes_the_rename_durable(tmp_path: Path, monkeypatch) -> None:
    synced: list[Path] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(Path(os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
    assert synced[0].parent == tmp_path.resolve() and synced[0].name.startswith(".config.yaml.")  # the data
    assert synced[-1] == tmp_path.resolve()  # then the folder holding the new name


def test_a_filesystem_that_cannot_sync_folders_still_takes_writes_and_checkpoint_trees(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """Some filesystems (FUSE mounts, SMB) answer fsync of a folder with EINVAL: nothing to flush
    there, not a failed write; a real write error (EIO) still stops the write."""
    import errno
    import stat

    from grpo_cli.runs import fsync_tree

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
    (tmp_path / "ckpt" / "adapter").mkdir(parents=True)
    (tmp_path / "ckpt" / "adapter" / "w.safetensors").write_bytes(b"x")
    fsync_tree(tmp_path / "ckpt")

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output"):
        fsync_tree(tmp_path / "ckpt")


def test_wandb_charts_plot_against_the_run_step_so_a_resume_is_not_dropped(tmp_path: Path, monkeypatch) -> None:
    """W&B writes only at its current or next step: a run killed at step 7 and resumed from step 5 logged
    steps 6 and 7 again as W&B steps W&B had passed, and W&B dropped them. The run's step is now a metric
    that every chart uses as its x-axis, and W&B counts its own steps."""
    import sys
    import types

    from grpo_cli.logging import RunLogger, start_wandb

    calls: list[tuple[str, tuple, dict]] = []

    class Session:
        def __getattr__(self, name: str):
            return lambda *args, **kwargs: calls.append((name, args, kwargs))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", (), kwargs)) or Session()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = dataclasses.replace(compose(["recipe=quickstart", "logging=wandb"]), output_dir=str(tmp_path))
    logger = RunLogger(tmp_path, cfg, 5, start_wandb(tmp_path, cfg))
    logger.log(6, {"loss": 0.5})
    logger.close()
    run_id = (tmp_path / "wandb_id").read_text()
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    assert calls[0][0] == "init" and calls[0][2]["id"] == run_id and calls[0][2]["resume"] == "allow"
    assert calls[1:] == [("define_metric", ("train/step",), {}),
                         ("define_metric", ("*",), {"step_metric": "train/step", "step_sync": True}),
                         ("log", ({"loss": 0.5, "train/step": 6},), {}),
                         ("finish", (), {"exit_code": 0})]


def test_the_installed_wandb_takes_the_logger_s_calls(tmp_path: Path, monkeypatch) -> None:
    """The same calls on the real wandb, offline (no network): its API takes them as made (logging=wandb
    failed at the start of every new run: wandb 0.31 has no wandb.util.generate_id). A resumed run keeps
    its W&B id."""
    from grpo_cli.logging import RunLogger, start_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = dataclasses.replace(compose(["recipe=quickstart", "logging=wandb", "logging.wandb_mode=offline"]),
                              output_dir=str(tmp_path))
    logger = RunLogger(tmp_path, cfg, 0, start_wandb(tmp_path, cfg))
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    run_id = (tmp_path / "wandb_id").read_text()
    RunLogger(tmp_path, cfg, 1, start_wandb(tmp_path, cfg)).close()
    assert (tmp_path / "wandb_id").read_text() == run_id
    assert all(f"-{run_id}" in p.name for p in (tmp_path / "wandb").glob("offline-run-*"))  # "-1" if in one second


def test_wandb_without_an_api_key_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    """logging=wandb (online) on a machine never logged in: wandb's UsageError was a traceback."""
    from grpo_cli.logging import start_wandb

    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run = tmp_path / "run"
    run.mkdir()
    cfg = dataclasses.replace(compose(["recipe=quickstart", "logging=wandb"]), output_dir=str(run))
    with pytest.raises(UserError, match=r"^logging=wandb: Weights & Biases did not start \(.*API key.*\); check the "
                                        r"network and `wandb login`, or set logging.wandb_mode=offline"):
        start_wandb(run, cfg)


def test_wandb_that_cannot_be_imported_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    """logging=wandb without wandb installed (or with a broken install) was an ImportError traceback."""
    import sys

    from grpo_cli.logging import start_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a module that cannot be found
    cfg = dataclasses.replace(compose(["recipe=quickstart", "logging=wandb"]), output_dir=str(tmp_path))
    with pytest.raises(UserError) as caught:
        start_wandb(tmp_path, cfg)
    assert str(caught.value) == ("logging=wandb: wandb cannot be imported (import of wandb halted; None in "
                                 "sys.modules); install it with `pip install wandb`, or set logging=default")


def _wandb_records(run: Path) -> list[tuple[list[int], int | None]]:
    """For each W&B offline run in `run`, oldest first: the train/step of each history row, and the exit code.
    Read from W&B's own run file (records of the LevelDB log format, each a wandb_internal Record)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    found = []
    for folder in sorted((run / "wandb").glob("offline-run-*")):
        data = next(folder.glob("*.wandb")).read_bytes()
        position, part, steps, exit_code = 7, b"", [], None  # after the file's header
        while position + 7 <= len(data):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            part = (part if kind in (3, 4) else b"") + data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record.FromString(part)
                if record.HasField("history"):
                    steps += [json.loads(i.value_json) for i in record.history.item
                              if (i.key or "/".join(i.nested_key)) == "train/step"]
                if record.HasField("exit"):
                    exit_code = record.exit.exit_code
        found.append((steps, exit_code))
    return found


def test_wandb_run_of_an_interrupted_and_resumed_run(grpo, tmp_path: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The real CLI with W&B offline: a run stopped by Ctrl-C after step 1 and resumed is one W&B run (its id
    in both offline runs), each step logged once against train/step. The stopped part ends as failed:
    it was marked finished (exit code 0), as a run that ended on an error was."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("GRPO_INTERRUPT_AFTER_STEP", "1")
    run = tmp_path / "run"
    args = ["recipe=quickstart", f"model.name_or_path={tiny_model_dir}", "rollout.engine=hf", "trainer.max_steps=2",
            "trainer.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=4", "logging=wandb",
            "logging.wandb_mode=offline", f"output_dir={run}"]
    stopped = grpo("train", *args, cwd=tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    monkeypatch.delenv("GRPO_INTERRUPT_AFTER_STEP")
    resumed = grpo("train", f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_id = (run / "wandb_id").read_text()
    assert [p.name.rpartition("-")[2] for p in sorted((run / "wandb").glob("offline-run-*"))] == [run_id, run_id]
    assert _wandb_records(run) == [([1], 1), ([2], 0)]
    assert not list(tmp_path.glob("wandb"))  # W&B's files are the run's, not the working directory's
