"""Composition of conf/ + recipes + overrides into the typed Config, and its one-line errors."""

from __future__ import annotations

import dataclasses
import shlex
import typing
from pathlib import Path

import pytest

from grpo_cli.config import LIST_EXAMPLES, compose, config_dir, find_recipes, resume_config, to_yaml
from grpo_cli.errors import UserError
from grpo_cli.schema import Config, RewardTerm

GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in config_dir().glob("*/*.yaml"))
NEEDS_PATH = {"hf", "jsonl"}  # dataset options with no default path


@pytest.mark.parametrize("recipe", sorted(find_recipes()))
def test_every_recipe_composes(recipe: str) -> None:
    cfg = compose([f"recipe={recipe}"])
    assert isinstance(cfg, Config)
    assert cfg.recipe == recipe
    assert cfg.description and "\n" not in cfg.description
    assert all(isinstance(t, RewardTerm) for t in cfg.rewards.values())


@pytest.mark.parametrize("recipe", sorted(find_recipes()))
def test_every_recipe_is_headed_by_its_command(recipe: str) -> None:
    first_line = find_recipes()[recipe].read_text().splitlines()[0]
    assert first_line == f"# grpo train recipe={recipe}"


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group: str, option: str) -> None:
    extra = ["dataset.path=some/dataset"] if option in NEEDS_PATH else []
    cfg = compose([f"{group}={option}", *extra])
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("recipe", sorted(find_recipes()))
def test_a_dataset_chosen_on_the_command_line_keeps_its_task_and_prompt_format(recipe: str) -> None:
    """recipe=quickstart set dataset.task, template and system_prompt itself, over any dataset= given:
    `recipe=quickstart dataset=countdown` trained on chain sums, and dataset=math got a chat prompt.
    A recipe may still size its data (dataset.size)."""
    from omegaconf import OmegaConf

    for path in sorted((config_dir() / "dataset").glob("*.yaml")):
        option = OmegaConf.to_container(OmegaConf.load(path))
        extra = ["dataset.path=some/dataset"] if path.stem in NEEDS_PATH else []
        dataset = compose([f"recipe={recipe}", f"dataset={path.stem}", *extra]).dataset
        for key, value in option.items():
            if key not in ("size", "path"):
                assert getattr(dataset, key) == value, f"recipe={recipe} dataset={path.stem}: dataset.{key}"


def test_every_yaml_field_has_a_comment() -> None:
    files = [*config_dir().rglob("*.yaml"), *find_recipes().values()]
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            body = line.strip()
            is_field = body and not body.startswith(("#", "-")) and ":" in body and not body.endswith(":")
            if is_field:
                assert "#" in line, f"{path}:{number} has no comment: {line}"


def test_overrides_reach_the_config() -> None:
    cfg = compose(["recipe=r1_zero_math", "trainer.lr=3e-6", "rollout.group_size=16", "model=qwen2_5_1_5b",
                   "loss.beta=0", "+rewards.tags.fn=tag_count", "+rewards.tags.weight=0.25",
                   "rewards.format.weight=0.1", "+dataset.task_args.min_terms=2", "~rewards.accuracy"])
    assert cfg.trainer.lr == 3e-6
    assert cfg.rollout.group_size == 16
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-1.5B"
    assert cfg.loss.beta == 0.0
    assert cfg.rewards == {"format": RewardTerm(weight=0.1), "tags": RewardTerm(fn="tag_count", weight=0.25)}
    assert cfg.dataset.task_args == {"min_terms": 2}
    assert "lr: 3.0e-06" in to_yaml(cfg)


def test_r1_zero_math_evaluates_on_math500_during_training() -> None:
    """Its eval_every=50 evaluated the whole MATH test split, 5,000 problems x 4 samples: about 78
    training steps' worth of generation at each of its 10 evaluations."""
    from grpo_cli.evaluate import eval_datasets

    cfg = compose(["recipe=r1_zero_math"])
    assert cfg.trainer.eval_every == 50
    (math500,) = eval_datasets(cfg).values()
    assert (math500.path, math500.template, math500.prefill) == ("HuggingFaceH4/MATH-500", "r1_zero", "<think>")


def test_recipe_overrides_groups_and_command_line_overrides_recipe() -> None:
    base = compose([])
    quick = compose(["recipe=quickstart"])
    assert base.recipe is None and base.rollout.max_new_tokens == 256
    assert quick.rollout.max_new_tokens == 48  # set by the recipe over rollout/vllm.yaml
    assert compose(["recipe=quickstart", "rollout.max_new_tokens=12"]).rollout.max_new_tokens == 12


def test_reward_set_switches_from_the_command_line() -> None:
    cfg = compose(["recipe=r1_zero_math", "rewards=shaped", "rewards.overlong.args.max_len=512"])
    assert set(cfg.rewards) == {"accuracy", "format", "tag_count", "repetition", "overlong"}
    assert cfg.rewards["repetition"] == RewardTerm(fn="repetition_penalty", weight=1.0,
                                                   args={"ngram_size": 3, "max_penalty": -1.0})
    assert cfg.rewards["overlong"].args == {"max_len": 512, "buffer": None}


def test_user_config_dir_adds_recipes_and_group_options(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name_or_path: /models/mine  # my model\n")
    (tmp_path / "recipes" / "mine.yaml").write_text(
        "# grpo train recipe=mine --config-dir DIR\n# @package _global_\n"
        "defaults:\n  - override /model: mine\n  - _self_\n"
        "description: my recipe  # shown by grpo recipes\ntrainer:\n  lr: 5.0e-7  # mine\n")
    cfg = compose(["recipe=mine"], tmp_path)
    assert cfg.recipe == "mine"
    assert cfg.model.name_or_path == "/models/mine"
    assert cfg.trainer.lr == 5e-7
    assert "mine" in find_recipes(tmp_path)


@pytest.mark.parametrize(("overrides", "message"), [
    (["recipe=quickstart", "trainer.not_a_key=1"], "unknown config key 'trainer.not_a_key'"),
    (["trainer.lrr=1"], "unknown config key 'trainer.lrr' (did you mean lr?)"),
    (["rewards.accuracy.wieght=2"], "unknown config key 'rewards.accuracy.wieght' (did you mean weight?)"),
    (["+model.bogus=1"], "unknown config key 'model.bogus'"),
    (["+new.key=3"], "unknown config key 'new'"),
    (["trainer.lr=abc"], "bad value for 'trainer.lr': 'abc' is not a valid float"),
    (["trainer.max_steps=1.5"], "bad value for 'trainer.max_steps': '1.5' is not a valid integer"),
    (["model.name_or_path=null"], "bad value for 'model.name_or_path': it cannot be null"),
    (["rewards.format.weight=abc"], "bad value for 'rewards.format.weight': 'abc' is not a number"),
    (["recipe=quikstart"], "unknown recipe 'quikstart'; available: countdown, gsm8k, quickstart, r1_zero_math "
                           "(did you mean quickstart?)"),
    (["model=qwen2_5_15b"], "unknown model option 'qwen2_5_15b'"),
    (["trainer=nope"], "unknown trainer option 'nope'; available: default"),
    (["dataset.template=chatt"], "dataset.template=chatt: expected one of r1_zero, chat, plain (did you mean chat?)"),
    (["foo"], "cannot parse override"),
    (["trainer.lr=[1"], "cannot parse override"),
    (["~nothere"], "cannot delete 'nothere': no such key"),
    (["rollout.group_size=1"], "rollout.group_size=1"),
    (["eval.n=2", "eval.k=[1,4]"], "eval.k=[1, 4]: every k must be between 1 and eval.n=2"),
    (["dataset=hf"], "dataset.path is required"),
    (["rewards=accuracy", "~rewards.accuracy"], "no rewards configured"),
    # each would fail only after a training step, or train silently wrong
    (["trainer.save_every=0"], "trainer.save_every=0: must be at least 1"),
    (["logging.log_every=0"], "logging.log_every=0: must be at least 1"),
    (["rollout.cpu_kv_cache_mib=0"], "rollout.cpu_kv_cache_mib=0: must be at least 1"),
    (["rollout=hf", "rollout.hf_max_rows=0"], "rollout.hf_max_rows=0: must be at least 1"),
    (["rollout.top_p=1.5"], "rollout.top_p=1.5: must be above 0 and at most 1"),
    (["rollout.top_p=0"], "rollout.top_p=0.0: must be above 0"),
    (["rollout.top_k=-3"], "rollout.top_k=-3: use 0 to turn top-k off"),
    (["rollout.top_k=-1"], "rollout.top_k=-1: use 0 to turn top-k off"),
    # an empty stop string is in every text: each completion ended after its first token, with text ""
    (['rollout.stop=["</answer>",""]'], "rollout.stop holds an empty string, which would end every completion "
                                       "after its first token; remove it (rollout.stop=[] for none)"),
    (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization=1.5: a share of the GPU's memory"),
    (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9]: needs two values, each at least 0 and below 1"),
    (["optimizer.betas=[0.9,1.0]"], "optimizer.betas=[0.9, 1.0]: needs two values"),
    (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm=-1.0: must be above 0"),
    (["trainer.warmup_steps=-5"], "trainer.warmup_steps=-5: must not be negative"),
    (["trainer.keep_last=-1"], "trainer.keep_last=-1: use the number of latest checkpoints to keep, or 0 to keep them all"),
    (["loss.adv_eps=-1"], "loss.adv_eps=-1.0: must be above 0"),
    (["model.lora_dropout=2"], "model.lora_dropout=2.0: a probability, at least 0 and below 1"),
    # at alpha 0 the adapters never moved; all-linear in a list matched no layer (only q_proj got an adapter)
    (["model.lora_alpha=0"], "model.lora_alpha=0.0: must be above 0 (the update is scaled by lora_alpha / lora_rank"),
    (["model.lora_target_modules=[all-linear,q_proj]"], "model.lora_target_modules=['all-linear', 'q_proj']: "
     "all-linear stands alone (every linear layer but the output layer); use [all-linear], or list the layers"),
    # torch's AdamW refuses these only after the model has loaded (a traceback); eps=0 divides 0 by 0
    (["optimizer.eps=-1"], "optimizer.eps=-1.0: must be above 0 (e.g. 1e-8)"),
    (["optimizer.eps=0"], "optimizer.eps=0.0: must be above 0 (e.g. 1e-8)"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1: must not be negative (0 = none, e.g. 0.01)"),
    (["logging.samples_per_step=-1"], "logging.samples_per_step=-1: must not be negative"),  # [:-1]: all but one
    # rewards are built when the config is checked, not after the model has loaded
    (["+rewards.foo.weight=1"], "rewards.foo: unknown reward 'foo'; known: accuracy, code,"),
    (["+rewards.x.fn=acuracy"], "rewards.x (acuracy): unknown reward 'acuracy'"),
    (["+rewards.accuracy.args.bogus=1"], "rewards.accuracy: unknown argument 'bogus'; accepted: timeout"),
    (["rewards=shaped", "rewards.repetition.args.ngram_size=0"], "rewards.repetition (repetition_penalty): ngram_size"),
    # messages that name the fix
    (["+trainer.lr=1"], "'+trainer.lr' adds a new key, but trainer.lr already exists: drop the '+' (trainer.lr=VALUE)"),
    (["rollout.stop=</answer>"], """rollout.stop takes a list; quote its items, e.g. 'rollout.stop=["</answer>"]'"""),
    (["dataset.prefill=<think>"], """quote a value with special characters, e.g. 'dataset.prefill="<think>"'"""),
    (["eval.k=abc"], "bad value for 'eval.k': it takes a list, e.g. eval.k=[1,8]"),
    (["dataset=jsonl"], "dataset.path is required for dataset.source=jsonl; e.g. dataset.path=data/train.jsonl"),
    (["~trainer.lr"], "cannot delete 'trainer.lr': every setting needs a value; set it instead (trainer.lr=VALUE)"),
    (["trainer.lr=1e-6,2e-6"], "asks for a sweep of several runs, which grpo does not do; give one value per key"),
    (["eval.k=1,4"], "give one value per key (a list is written [a,b])"),
    # a group given a bool or a number, or a list with an unknown option: Hydra's own ValueError or ours
    (["rollout=true"], "'rollout=true': rollout= takes the name of one of its options (hf, vllm, vllm_server); to "
                       "set a value inside the group, name its key (rollout.KEY=VALUE)"),
    (["rewards=5"], "'rewards=5': rewards= takes the name of one of its options (accuracy, r1_zero,"),
    (["recipe=1"], "'recipe=1': recipe= takes a recipe's name: countdown, gsm8k, quickstart, r1_zero_math"),
    (["model=[qwen2_5_3b,nope]"], "unknown model option 'nope'; available: qwen2_5_0_5b_instruct,"),
    # a Hub id, a folder or a file where a group option goes: Hydra read its '/' as a subgroup ("unknown
    # model/Qwen option 'Qwen2.5-0.5B'; available: " with an empty list)
    (["model=Qwen/Qwen2.5-0.5B"], "unknown model option 'Qwen/Qwen2.5-0.5B'; available: qwen2_5_0_5b_instruct, "
                                  "qwen2_5_1_5b, qwen2_5_3b, qwen2_5_math_1_5b, smollm2_135m_instruct; a Hub id or a "
                                  "model folder goes in model.name_or_path=Qwen/Qwen2.5-0.5B"),
    (["dataset=data/train.jsonl"], "unknown dataset option 'data/train.jsonl'; available: aime24, amc23, chain_sum, "
                                   "countdown, gsm8k, hf, jsonl, math, math500, reasoning_gym; a .jsonl file is "
                                   "dataset=jsonl dataset.path=data/train.jsonl, a Hub dataset or a folder "
                                   "dataset=hf dataset.path=data/train.jsonl"),
    (["model=Qwen/Qwen2.5-7B-Instruct"], "smollm2_135m_instruct; a Hub id or a model folder goes in "  # no "did you
                                         "model.name_or_path=Qwen/Qwen2.5-7B-Instruct"),  # mean qwen2_5_0_5b_instruct"
    (["dataset=train.jsonl"], "; a .jsonl file is dataset=jsonl dataset.path=train.jsonl, a Hub dataset"),
    # data without reference answers, and the rewards that need them
    (["dataset=jsonl", "dataset.path=d.jsonl", "dataset.answer_column=null", "rewards=r1_zero"],
     "rewards.accuracy (accuracy) checks answers against the reference, and dataset.answer_column=null gives none: "
     "drop the term with ~rewards.accuracy, or name the data's answer column"),
    (["dataset=jsonl", "dataset.path=d.jsonl", "dataset.answer_column=null", "rewards=accuracy", "~rewards.accuracy",
      "+rewards.len.fn=cosine_length"], "rewards.len (cosine_length) checks answers against the reference"),
    (["dataset.answer_column=null"], "dataset.answer_column=null: a reasoning-gym task has its answers; null is for hf "
                                     "or jsonl data without reference answers"),
    (["trainer.max_resample=101"], "trainer.max_resample=101: at most 100 extra rounds a step (more would repeat "
                                   "the next step's sampling seed); lower it"),
    (["seed=18446744073709551616"], "seed=18446744073709551616: out of range; torch takes 64-bit seeds (below 2**64), "
                                    "e.g. seed=42"),
])
def test_bad_configuration_is_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as caught:
        compose(overrides)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(("override", "added"), [
    ("dataset.task_args.min_terms=2", "+dataset.task_args.min_terms=2"),  # a free-form mapping
    ("rewards.accuracy.args.timeout=2", "+rewards.accuracy.args.timeout=2"),  # a schema key the YAML leaves out
])
def test_a_key_the_config_lacks_yet_is_added_with_a_plus(override: str, added: str) -> None:
    """Hydra refuses to set a key the composed YAML lacks; its message was "unknown config key" (or, for
    rewards.accuracy.args, "did you mean args?"), though the key is allowed: the fix is a '+'."""
    with pytest.raises(UserError) as caught:
        compose([override])
    assert str(caught.value) == f"'{override}' sets a key this config does not have yet; add it with a '+': {added}"
    compose([added])  # the fix it names works


@pytest.mark.parametrize(("override", "message"), [
    ("eval.k=[1,2", "cannot parse override 'eval.k=[1,2': eval.k takes a list; quote its items, e.g. "
                    "'eval.k=[\"1\",\"2\"]'"),
    ("trainer.lr={a", "cannot parse override: 'trainer.lr={a' is not a valid value (expected ',' or '}', but got "
                      "'<stream end>', line 1); overrides look like key=value, +new_key=value or ~key"),
])
def test_an_override_of_a_saved_config_that_is_not_yaml_is_one_line(tmp_path: Path, override: str, message: str) -> None:
    """resume= and eval's run= read overrides as YAML values: a list missing its ']' was a yaml traceback."""
    (tmp_path / "config.yaml").write_text(to_yaml(compose(["recipe=quickstart"])))
    with pytest.raises(UserError) as caught:
        resume_config(str(tmp_path), [override])
    assert str(caught.value) == message
    assert resume_config(str(tmp_path), ["eval.n=2", "eval.k=[1,2]"]).eval.k == [1, 2]


def test_data_without_answers_takes_the_rewards_that_need_none() -> None:
    cfg = compose(["dataset=jsonl", "dataset.path=d.jsonl", "dataset.answer_column=null", "rewards=shaped",
                   "~rewards.accuracy"])
    assert cfg.dataset.answer_column is None and "accuracy" not in cfg.rewards and "format" in cfg.rewards


def test_boundary_values_that_mean_something_are_accepted() -> None:
    cfg = compose(["trainer.keep_last=0", "rollout.top_k=0", "rollout.top_p=1", "rollout.gpu_memory_utilization=1",
                   "model.lora_dropout=0", "optimizer.betas=[0,0.999]", "trainer.save_every=1", "logging.log_every=1",
                   "optimizer.weight_decay=0", "logging.samples_per_step=0"])
    assert cfg.trainer.keep_last == 0 and cfg.rollout.top_k == 0 and cfg.optimizer.betas == [0.0, 0.999]


def test_every_list_setting_has_a_command_line_example_that_composes() -> None:
    groups = {name: kind for name, kind in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(kind)}
    lists = {f"{name}.{key}" for name, kind in groups.items()
             for key, hint in typing.get_type_hints(kind).items() if typing.get_origin(hint) is list}
    assert set(LIST_EXAMPLES) == lists
    for example in LIST_EXAMPLES.values():
        (override,) = shlex.split(example)
        compose([override, "rollout.engine=hf", "eval.n=8"])  # hf: servers are checked, not used; k <= n


def test_a_broken_yaml_file_in_a_config_dir_is_named(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name_or_path: [oops\n  x: :\n")
    with pytest.raises(UserError) as caught:
        compose(["model=mine"], tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'model' / 'mine.yaml'} is not valid YAML (expected ',' or ']', "
                                        "but got ':', line 2)")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "broken.yaml").write_text("description: [oops\n  x: :\n")
    with pytest.raises(UserError) as caught:
        compose(["recipe=quickstart"], tmp_path)  # every recipe is registered, the broken one too
    assert str(caught.value) == (f"{tmp_path / 'recipes' / 'broken.yaml'} is not valid YAML (expected ',' or ']', but "
                                 f"got ':', line 2); fix the recipe, or move it out of {tmp_path / 'recipes'}")


def test_a_model_folder_without_a_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        compose([f"model.name_or_path={tmp_path}"])
    assert str(caught.value).startswith(f"model.name_or_path={tmp_path}: the folder holds no model (no config.json); "
                                        "pass a Hugging Face model folder")
    (tmp_path / "config.json").write_text("{}")
    assert compose([f"model.name_or_path={tmp_path}"]).model.name_or_path == str(tmp_path)


def test_missing_config_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--config-dir"):
        compose([], tmp_path / "nope")


# ----------------------------------------------------------------------------- eval files
def test_eval_and_training_files_are_saved_as_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative eval or training file is read from the directory grpo runs in; config.yaml keeps its
    absolute path, so `grpo eval run=RUN` finds it from anywhere. Options stay names."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    monkeypatch.chdir(tmp_path)
    cfg = compose(["eval.datasets=[data/test.jsonl,math500]"])
    assert cfg.eval.datasets == [str(tmp_path / "data" / "test.jsonl"), "math500"]
    assert f"- {tmp_path / 'data' / 'test.jsonl'}" in to_yaml(cfg)
    absolute = compose([f"eval.datasets=[{tmp_path / 'data' / 'test.jsonl'}]"])
    assert absolute.eval.datasets == [str(tmp_path / "data" / "test.jsonl")]
    # the training file too (grpo eval run= reads it to leave its problems out); a hub id stays as it is
    assert compose(["dataset=jsonl", "dataset.path=data/train.jsonl"]).dataset.path == str(tmp_path / "data" / "train.jsonl")
    assert compose(["dataset=hf", "dataset.path=openai/gsm8k"]).dataset.path == "openai/gsm8k"


def test_a_local_hf_dataset_folder_is_saved_as_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dataset=hf reads a folder (save_to_disk, data files) as well as a Hub id: a relative folder is
    saved absolute, so `grpo eval run=RUN` and `resume=RUN` find it from another directory."""
    (tmp_path / "data" / "saved").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = compose(["dataset=hf", "dataset.path=data/saved"])
    assert cfg.dataset.path == str(tmp_path / "data" / "saved")
    assert compose(["dataset=hf", "dataset.path=org/not_here"]).dataset.path == "org/not_here"  # no such folder: a Hub id


@pytest.mark.parametrize(("entries", "message"), [
    ("[data/test.jsonl,math500]", "eval.datasets: data/test.jsonl: no such file in {tmp}; fix the path (a .jsonl "
                                  "file, one JSON object per line) or drop it from eval.datasets"),
    ("[{tmp}/test.jsonl]", "eval.datasets: {tmp}/test.jsonl: no such file; fix the path (a .jsonl file, one JSON "
                           "object per line) or drop it from eval.datasets"),
    ("[dir.jsonl]", "eval.datasets: dir.jsonl: not a file in {tmp}; fix the path (a .jsonl file, one JSON object "
                    "per line) or drop it from eval.datasets"),
    ("[a/test.jsonl,b/Test.jsonl]", "eval.datasets: a/test.jsonl and b/Test.jsonl would both be reported as "
                                    "eval/test/...; rename one of the files"),
    ("[chain_sum,a/chain_sum.jsonl]", "eval.datasets: chain_sum and a/chain_sum.jsonl would both be reported as "
                                      "eval/chain_sum/...; rename the file"),
    ("[a/test.jsonl,a/test.jsonl]", "eval.datasets=['a/test.jsonl', 'a/test.jsonl']: a dataset is listed twice"),
    ("[data/test.json]", "eval.datasets: unknown dataset option 'data/test.json'; available: aime24, amc23, chain_sum, "
                         "countdown, gsm8k, hf, jsonl, math, math500, reasoning_gym, or the path of a .jsonl file"),
])
def test_bad_eval_files_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entries: str,
                                            message: str) -> None:
    for folder in ("a", "b", "dir.jsonl"):
        (tmp_path / folder).mkdir()
    for file in ("a/test.jsonl", "b/Test.jsonl", "a/chain_sum.jsonl"):
        (tmp_path / file).write_text('{"question": "1+1", "answer": "2"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        compose([f"eval.datasets={entries.format(tmp=tmp_path)}"])
    assert str(caught.value) == message.format(tmp=tmp_path)


def test_a_missing_eval_file_stops_train_before_anything_loads(grpo, tmp_path: Path) -> None:
    for command in ("config", "train"):
        result = grpo(command, "recipe=quickstart", "eval.datasets=[held/test.jsonl]", f"output_dir={tmp_path / 'run'}",
                      cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (f"error: eval.datasets: held/test.jsonl: no such file in {tmp_path}; fix the "
                                         "path (a .jsonl file, one JSON object per line) or drop it from eval.datasets")
        assert not (tmp_path / "run").exists()
