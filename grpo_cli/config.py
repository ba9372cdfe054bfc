"""Composition of conf/ + recipes/ + command-line overrides into the configuration schema.

Hydra composes YAML files; the typed schema (grpo_cli.schema) is registered as the base of the root config,
so Hydra itself rejects unknown keys and values of the wrong type while it composes. What Hydra
cannot check (a value outside a fixed set of choices, relations between fields) is checked in
`validate`. Every user mistake surfaces as a `UserError`: one line, naming the key and the fix.

Defaults live in the schema; the YAML files in conf/ document them field by field and recipes overlay them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from grpo_cli.errors import UserError, did_you_mean
from grpo_cli.schema import Config, ModelConfig, OptimizerConfig, RewardTerm, RolloutConfig

PACKAGE_DIR = Path(__file__).resolve().parent
GROUPS = ("model", "dataset", "rewards", "optimizer", "rollout", "trainer", "logging")


# ----------------------------------------------------------------------------- locations
def config_dir() -> Path:
    """conf/ beside the package in a wheel, at the top of the repository in a source checkout."""
    inside = PACKAGE_DIR / "conf"
    return inside if inside.is_dir() else PACKAGE_DIR.parent / "conf"


def recipe_dirs(extra: Path | None = None) -> list[Path]:
    """Built-in recipes first; a user's `--config-dir` (its recipes/ or recipe/ folder) wins on clashes."""
    inside = PACKAGE_DIR / "recipes"
    dirs = [inside if inside.is_dir() else PACKAGE_DIR.parent / "recipes"]
    if extra is not None:
        dirs += [d for d in (extra / "recipes", extra / "recipe") if d.is_dir()]
    return dirs


def find_recipes(extra: Path | None = None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in recipe_dirs(extra):
        found.update({p.stem: p for p in sorted(d.glob("*.yaml"))})
    return found


def recipe_description(path: Path) -> str:
    return str(load_recipe(path).get("description", ""))


def load_recipe(path: Path) -> Any:
    return load_yaml(path, f"fix the recipe, or move it out of {path.parent}")


# ----------------------------------------------------------------------------- composition
def _register(extra: Path | None) -> None:
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    schema = OmegaConf.structured(Config)
    _writable(schema)
    store.store(name="grpo_schema", node=schema)
    for name, path in find_recipes(extra).items():
        store.store(group="recipe", name=name, node=load_recipe(path), package="_global_")


def _writable(node: Any) -> None:
    """Frozen dataclasses make every node read-only; composition must be free to merge into them."""
    if isinstance(node, DictConfig):
        OmegaConf.set_readonly(node, False)
        for key in node:
            _writable(node._get_node(key))


def compose(overrides: list[str], config_dir_extra: str | Path | None = None) -> Config:
    """Compose conf/ + recipes + overrides (Hydra's grammar) into a validated `Config`."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    extra = user_config_dir(config_dir_extra)
    _register(extra)
    overrides = list(overrides)
    if extra is not None:
        overrides.append(f"hydra.searchpath=[file://{extra}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            raw = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(explain(e)) from None
    except ValueError as e:  # `rollout=true`, `rewards=5`: Hydra's defaults list takes option names only
        if "Config group override" not in str(e):
            raise
        raise UserError(_not_an_option(overrides)) from None
    except yaml.YAMLError as e:  # a config group option (conf/ or --config-dir) that is not YAML
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{mark.name if mark else 'a config file'} is not valid YAML ({_yaml_problem(e)}); "
                        "fix it, or move it out of your --config-dir") from None
    finally:
        GlobalHydra.instance().clear()
    recipe = raw.hydra.runtime.choices.get("recipe")
    with _open(raw):
        del raw["hydra"]
        raw.recipe = None if recipe in (None, "null") else recipe
    _check_known_keys(raw, Config, "")
    try:
        cfg: Config = OmegaConf.to_object(raw)
    except OmegaConfBaseException as e:
        raise UserError(explain(e)) from None
    cfg = dataclasses.replace(cfg, rewards=_reward_terms(cfg.rewards))
    validate(cfg)
    return _absolute_paths(cfg)


def resume_config(run_dir: str, overrides: list[str]) -> Config:
    """The saved config.yaml of a run, with key=value overrides on top (e.g. trainer.max_steps=200)."""
    from omegaconf.errors import OmegaConfBaseException

    saved = Path(run_dir).expanduser() / "config.yaml"
    if not saved.is_file():
        raise UserError(f"resume={run_dir}: not a run directory (no config.yaml); pass the folder a previous "
                        "`grpo train` wrote")
    check_saved_config_overrides("resume", overrides, "trainer.max_steps=200", "a resumed run keeps its recipe and "
                                 "group options (model=, rewards=, ...); start a new run to change them")
    schema = OmegaConf.structured(Config)
    _writable(schema)
    run_config = load_yaml(saved, "the run's saved config is damaged: repair it, or start a new run")
    try:
        merged = OmegaConf.merge(schema, run_config, _from_dotlist(overrides))
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UserError(explain(e)) from None
    cfg = dataclasses.replace(cfg, rewards=_reward_terms(cfg.rewards), resume=str(run_dir))
    trained = OmegaConf.merge(schema, run_config)  # the run's own settings, as merged ones resolve
    for key in FIXED_ON_RESUME:  # the overrides came in as written: compare the values they resolve to
        was, now = OmegaConf.select(trained, key), OmegaConf.select(merged, key)
        if was != now:
            raise UserError(f"resume={run_dir}: {key} cannot change on resume (the run's weights and optimizer "
                            f"state have {key}={was}); start a new run for {key}={now}, from this run's weights "
                            f"with model.name_or_path={Path(run_dir) / 'checkpoints'}/step-NNNNNN if you like")
    validate(cfg)
    return _absolute_paths(cfg)


def _from_dotlist(overrides: list[str]) -> DictConfig:
    """key=value overrides read as YAML values (as OmegaConf reads a dotlist); one that is not YAML, such
    as a list missing its ']', is a UserError naming it."""
    import yaml

    for o in overrides:
        try:
            OmegaConf.from_dotlist([o])
        except yaml.YAMLError as e:
            raise UserError(_unparsable(o, f"'{o}' is not a valid value ({_yaml_problem(e)})")) from None
    return OmegaConf.from_dotlist(overrides)


# What shapes a checkpoint's trainable parameters, and so its optimizer state: a resume that changed one
# stopped with a traceback from torch's optimizer (a parameter group that doesn't match ...) or from peft.
FIXED_ON_RESUME = ("model.lora_rank", "model.lora_alpha", "model.lora_target_modules")  # alpha: the scale of the trained update


def check_saved_config_overrides(flag: str, overrides: list[str], example: str, hint: str) -> None:
    """A run's saved config (resume=, eval's run=) takes key=value overrides of its keys only: its
    recipe and group options stay as they ran, and +key / ~key would change its shape."""
    for o in overrides:
        if not re.fullmatch(r"[\w.]+=.*", o) or o.split("=", 1)[0] in (*GROUPS, "recipe"):
            raise UserError(f"with {flag}=, the run's saved config is used and overrides set its keys "
                            f"(e.g. {example}); '{o}' is not one: {hint}")


def load_yaml(path: Path, fix: str) -> Any:
    """OmegaConf.load, with a file that is not YAML (or not UTF-8 text) as a one-line UserError naming it."""
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({_yaml_problem(e)}); {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; {fix}") from None


def _yaml_problem(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    return (getattr(error, "problem", None) or "cannot parse it") + (f", line {mark.line + 1}" if mark else "")


class _open:
    """Temporarily lift struct/readonly flags so the composed config can be edited."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> None:
        OmegaConf.set_struct(self.cfg, False)
        OmegaConf.set_readonly(self.cfg, False)

    def __exit__(self, *_: object) -> None:
        OmegaConf.set_struct(self.cfg, True)


def user_config_dir(path: str | Path | None) -> Path | None:
    """--config-dir, resolved; one that does not exist is a UserError (not silently no recipes)."""
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise UserError(f"--config-dir {path}: no such directory; pass a folder holding your recipes/ and config groups")
    return p


# ----------------------------------------------------------------------------- local files
def is_eval_file(entry: str) -> bool:
    """Whether an `eval.datasets` entry is a JSON-lines file of problems, not an option of conf/dataset/."""
    return entry.lower().endswith(".jsonl")


def eval_label(entry: str) -> str:
    """The name an `eval.datasets` entry has in metrics (eval/<label>/<metric>): an option's own name,
    a file's stem in lower case (data/Test.jsonl -> test), as `dataset=jsonl` itself is labelled."""
    return Path(entry).stem.lower() if is_eval_file(entry) else entry


def _absolute_paths(cfg: Config) -> Config:
    """Local files as absolute paths: eval files, a `dataset=jsonl` training file, a `dataset=hf` local
    folder (save_to_disk, data files; a path that is no folder here is a Hub id) and the files of
    reward functions. A relative one is read from the directory grpo is run in (Hydra's compose API
    leaves the working directory alone); the run's config.yaml then names the file itself, so
    `grpo eval run=RUN` (which also reads the training file, to leave its problems out) and
    `resume=` find them from any directory."""
    datasets = [os.path.abspath(Path(d).expanduser()) if is_eval_file(d) else d for d in cfg.eval.datasets]
    dataset = cfg.dataset
    local = dataset.source == "jsonl" or (dataset.source == "hf" and Path(dataset.path or "").expanduser().is_dir())
    if local and dataset.path:
        dataset = dataclasses.replace(dataset, path=os.path.abspath(Path(dataset.path).expanduser()))
    rewards = {label: dataclasses.replace(term, fn=_absolute_reward_file(term.fn)) for label, term in cfg.rewards.items()}
    return dataclasses.replace(cfg, dataset=dataset, eval=dataclasses.replace(cfg.eval, datasets=datasets),
                               rewards=rewards)


def _absolute_reward_file(fn: str | None) -> str | None:
    """A reward function in a file (`FILE.py:FUNCTION`, grpo_cli.rewards.custom) with the file's absolute path."""
    from grpo_cli.rewards import custom

    if fn is None or not custom.is_custom(fn) or not custom.is_file(fn):
        return fn
    where, _, name = fn.rpartition(":")
    return f"{os.path.abspath(Path(where).expanduser())}:{name}"


# ----------------------------------------------------------------------------- validation
def validate(cfg: Config) -> None:
    """Checks Hydra's types cannot express: fixed choices and relations between fields."""
    _check_choices(cfg, "")
    positive = {
        "rollout.group_size": cfg.rollout.group_size,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout.max_prompt_tokens": cfg.rollout.max_prompt_tokens,
        "rollout.sync_every": cfg.rollout.sync_every,
        "trainer.prompts_per_step": cfg.trainer.prompts_per_step,
        "trainer.micro_batch_size": cfg.trainer.micro_batch_size,
        "trainer.num_iterations": cfg.trainer.num_iterations,
        "trainer.save_every": cfg.trainer.save_every,
        "logging.log_every": cfg.logging.log_every,
        "rollout.cpu_kv_cache_mib": cfg.rollout.cpu_kv_cache_mib,
        "rollout.hf_max_rows": cfg.rollout.hf_max_rows,
        "dataset.size": cfg.dataset.size,
        "eval.n": cfg.eval.n,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{key}={value}: must be at least 1")
    if cfg.loss.tis_cap is not None and cfg.loss.tis_cap <= 0:
        raise UserError(f"loss.tis_cap={cfg.loss.tis_cap}: must be above 0 (e.g. 2.0), or null to turn it off")
    for key, value in {"trainer.lr": cfg.trainer.lr, "loss.beta": cfg.loss.beta,
                       "trainer.max_resample": cfg.trainer.max_resample, "trainer.warmup_steps": cfg.trainer.warmup_steps,
                       "loss.clip_low": cfg.loss.clip_low, "loss.clip_high": cfg.loss.clip_high,
                       "trainer.max_steps": cfg.trainer.max_steps,
                       "logging.samples_per_step": cfg.logging.samples_per_step}.items():
        if value < 0:
            raise UserError(f"{key}={value}: must not be negative")
    if cfg.trainer.max_resample > 100:  # round r of step s samples with seed ... + 101 s + r (loop.train)
        raise UserError(f"trainer.max_resample={cfg.trainer.max_resample}: at most 100 extra rounds a step (more would "
                        "repeat the next step's sampling seed); lower it")
    if not -(1 << 63) <= cfg.seed < 1 << 64:  # torch.manual_seed's range: past it, a traceback at start-up
        raise UserError(f"seed={cfg.seed}: out of range; torch takes 64-bit seeds (below 2**64), e.g. seed=42")
    if cfg.trainer.keep_last < 0:
        raise UserError(f"trainer.keep_last={cfg.trainer.keep_last}: use the number of latest checkpoints to keep, "
                        "or 0 to keep them all")
    if not cfg.trainer.max_grad_norm > 0:  # clip_grad_norm_ with a negative bound flips every gradient
        raise UserError(f"trainer.max_grad_norm={cfg.trainer.max_grad_norm}: must be above 0 (e.g. 1.0)")
    if cfg.loss.clip_low >= 1:
        raise UserError(f"loss.clip_low={cfg.loss.clip_low}: must be below 1 (the ratio is clipped at 1 - clip_low)")
    if not cfg.loss.adv_eps > 0:  # a group whose rewards are all equal has std 0: 0 / (0 + eps)
        raise UserError(f"loss.adv_eps={cfg.loss.adv_eps}: must be above 0 (e.g. 1e-4), it guards the division by the std")
    _validate_model(cfg.model)
    _validate_optimizer(cfg.optimizer)
    _validate_sampling(cfg.rollout)
    _validate_eval(cfg)
    _validate_servers(cfg.rollout)
    if cfg.dataset.source in ("hf", "jsonl") and not cfg.dataset.path:
        example = "data/train.jsonl (one JSON object per line)" if cfg.dataset.source == "jsonl" else "openai/gsm8k"
        raise UserError(f"dataset.path is required for dataset.source={cfg.dataset.source}; e.g. dataset.path={example}")
    if cfg.dataset.source == "reasoning_gym":
        from grpo_cli.data import check_task

        check_task(cfg.dataset.task)
    if not cfg.rewards:
        raise UserError("no rewards configured; choose a reward set, e.g. rewards=r1_zero")
    _validate_rewards(cfg.rewards)
    if cfg.dataset.answer_column is None:
        from grpo_cli.rewards import ANSWER_REWARDS

        if cfg.dataset.source == "reasoning_gym":
            raise UserError("dataset.answer_column=null: a reasoning-gym task has its answers; null is for hf or "
                            "jsonl data without reference answers")
        for label, term in cfg.rewards.items():
            if (term.fn or label) in ANSWER_REWARDS:
                raise UserError(f"rewards.{label} ({term.fn or label}) checks answers against the reference, and "
                                "dataset.answer_column=null gives none: drop the term with ~rewards."
                                f"{label}, or name the data's answer column")


def _validate_rewards(terms: dict[str, RewardTerm]) -> None:
    """Build each term once (cheap: nothing loads until a reward is first called), so that an unknown
    reward or argument fails here, in `grpo config` too, not after the model has loaded."""
    from grpo_cli.rewards import build_reward

    for label, term in terms.items():
        fn = term.fn or label
        try:
            build_reward(fn, **term.args)
        except ValueError as e:
            where = f"rewards.{label}" + (f" ({fn})" if fn != label else "")
            message = re.sub(r"^reward '[^']*': ", "", str(e))
            if message.startswith("unknown reward"):
                message += (f"; name one (or your own function, FILE.py:FUNCTION) with rewards.{label}.fn=NAME, "
                            f"or drop the term with ~rewards.{label}")
            raise UserError(f"{where}: {message}") from None


def _validate_model(m: ModelConfig) -> None:
    from grpo_cli.models import BUILTIN_MODELS

    folder = Path(m.name_or_path).expanduser()  # a folder wins over a Hub id of the same name (models.resolve)
    if m.name_or_path not in BUILTIN_MODELS and folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"model.name_or_path={m.name_or_path}: the folder holds no model (no config.json); pass a "
                        "Hugging Face model folder (config.json, weights, tokenizer) such as a run's "
                        f"checkpoints/step-NNNNNN, a Hub id (org/name) or a built-in model: {', '.join(BUILTIN_MODELS)}")
    if m.lora_rank < 0:
        raise UserError(f"model.lora_rank={m.lora_rank}: use 0 (train every weight) or a LoRA rank such as 16")
    if not 0 <= m.lora_dropout < 1:
        raise UserError(f"model.lora_dropout={m.lora_dropout}: a probability, at least 0 and below 1 (e.g. 0.05)")
    if m.lora_alpha <= 0:  # the update is scaled by lora_alpha / lora_rank: at 0 nothing trains
        raise UserError(f"model.lora_alpha={m.lora_alpha}: must be above 0 (the update is scaled by "
                        "lora_alpha / lora_rank; e.g. twice the rank)")
    if "all-linear" in m.lora_target_modules and len(m.lora_target_modules) > 1:  # peft took it as a layer name
        raise UserError(f"model.lora_target_modules={list(m.lora_target_modules)}: all-linear stands alone (every "
                        "linear layer but the output layer); use [all-linear], or list the layers, e.g. [q_proj,v_proj]")


def _validate_optimizer(o: OptimizerConfig) -> None:
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise UserError(f"optimizer.betas={list(o.betas)}: needs two values, each at least 0 and below 1, "
                        "e.g. optimizer.betas=[0.9,0.99]")
    if not o.eps > 0:  # torch's AdamW refuses a negative one only once the model has loaded
        raise UserError(f"optimizer.eps={o.eps}: must be above 0 (e.g. 1e-8)")
    if o.weight_decay < 0:
        raise UserError(f"optimizer.weight_decay={o.weight_decay}: must not be negative (0 = none, e.g. 0.01)")


def _validate_sampling(r: RolloutConfig) -> None:
    if r.group_size < 2:
        raise UserError(f"rollout.group_size={r.group_size}: GRPO compares completions within a group; use 2 or more")
    if not 0 < r.temperature:
        raise UserError(f"rollout.temperature={r.temperature}: training samples need a temperature above 0")
    if not 0 < r.top_p <= 1:
        raise UserError(f"rollout.top_p={r.top_p}: must be above 0 and at most 1 (1.0 = off)")
    if r.top_k < 0:  # vLLM spells "off" -1; here it is 0, for every engine
        raise UserError(f"rollout.top_k={r.top_k}: use 0 to turn top-k off, or a number of tokens such as 50")
    if "" in r.stop:  # found in every text: both engines stopped each completion at its first token
        raise UserError("rollout.stop holds an empty string, which would end every completion after its first token; "
                        "remove it (rollout.stop=[] for none)")
    if not 0 < r.gpu_memory_utilization <= 1:
        raise UserError(f"rollout.gpu_memory_utilization={r.gpu_memory_utilization}: a share of the GPU's memory, "
                        "above 0 and at most 1 (e.g. 0.35)")


def _validate_servers(r: RolloutConfig) -> None:
    if r.tensor_parallel_size < 1:
        raise UserError(f"rollout.tensor_parallel_size={r.tensor_parallel_size}: must be at least 1")
    if r.server_timeout_s <= 0:
        raise UserError(f"rollout.server_timeout_s={r.server_timeout_s}: must be above 0 (seconds)")
    if r.engine == "vllm_server" and not r.servers:
        raise UserError("rollout.engine=vllm_server needs rollout.servers, the `grpo rollout-server` addresses, "
                        "e.g. rollout.servers=[127.0.0.1:8000]")
    for address in r.servers:
        if not re.fullmatch(r"(?:https?://)?[\w.\-]+:\d+/?", str(address)):
            raise UserError(f"rollout.servers: '{address}' is not host:port (e.g. 127.0.0.1:8000)")


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    if not e.k:  # else the results hold no pass@k or maj@k at all, and nothing says why
        raise UserError(f"eval.k=[]: list at least one k, e.g. eval.k=[1] (each k between 1 and eval.n={e.n})")
    bad_k = [k for k in e.k if not 1 <= k <= e.n]
    if bad_k:
        raise UserError(f"eval.k={list(e.k)}: every k must be between 1 and eval.n={e.n}; raise eval.n or drop k={bad_k[0]}")
    for key, value in {"eval.limit": e.limit, "eval.max_new_tokens": e.max_new_tokens}.items():
        if value is not None and value < 1:
            raise UserError(f"{key}={value}: must be at least 1, or null for no limit")
    if e.temperature < 0:
        raise UserError(f"eval.temperature={e.temperature}: must not be negative (0 = greedy)")
    if not 0 < e.top_p <= 1:
        raise UserError(f"eval.top_p={e.top_p}: must be above 0 and at most 1")
    if cfg.trainer.eval_every < 0:
        raise UserError(f"trainer.eval_every={cfg.trainer.eval_every}: use 0 (never) or a number of steps")
    if cfg.trainer.eval_every and cfg.trainer.eval_every % cfg.logging.log_every:
        raise UserError(f"trainer.eval_every={cfg.trainer.eval_every} is not a multiple of logging.log_every="
                        f"{cfg.logging.log_every}: metrics.jsonl would miss the eval figures")
    options = sorted(p.stem for p in (config_dir() / "dataset").glob("*.yaml"))
    for name in e.datasets:
        if is_eval_file(name):
            path = Path(name).expanduser()
            if not path.is_file():
                what = "not a file" if path.exists() else "no such file"
                where = "" if path.is_absolute() else f" in {Path.cwd()}"
                raise UserError(f"eval.datasets: {name}: {what}{where}; fix the path (a .jsonl file, one JSON "
                                "object per line) or drop it from eval.datasets")
        elif name not in options:
            raise UserError(f"eval.datasets: unknown dataset option '{name}'; available: {', '.join(options)}"
                            f"{did_you_mean(name, options)}, or the path of a .jsonl file")
    if len(set(e.datasets)) != len(e.datasets):
        raise UserError(f"eval.datasets={list(e.datasets)}: a dataset is listed twice")
    labelled: dict[str, str] = {}
    for name in e.datasets:
        label = eval_label(name)
        other = labelled.setdefault(label, name)
        if other != name:
            fix = "rename one of the files" if is_eval_file(other) and is_eval_file(name) else "rename the file"
            raise UserError(f"eval.datasets: {other} and {name} would both be reported as eval/{label}/...; {fix}")


def _check_choices(node: Any, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"{key}={value}: expected one of {', '.join(choices)}{did_you_mean(str(value), choices)}")
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")


# ----------------------------------------------------------------------------- error messages

_ANY_LABEL = object()


# How to write each list setting on the command line (quoted where a shell or Hydra's grammar needs it).
LIST_EXAMPLES = {
    "model.lora_target_modules": "model.lora_target_modules=[q_proj,v_proj]",
    "optimizer.betas": "optimizer.betas=[0.9,0.99]",
    "rollout.stop": "'rollout.stop=[\"</answer>\"]'",
    "rollout.servers": "rollout.servers=[127.0.0.1:8000]",
    "logging.reflection_words": "'logging.reflection_words=[wait,\"let me check\"]'",
    "eval.k": "eval.k=[1,8]",
    "eval.datasets": "eval.datasets=[math500,aime24]",
}


def _schema_parent(key: str) -> tuple[str, Any] | None:
    """For a dotted key, its last part and the schema class of its parent (None if the parent is unknown)."""
    node: Any = Config
    *parents, leaf = key.split(".")
    for part in parents:
        if node is _ANY_LABEL:  # rewards.<label>: any label, then a RewardTerm
            node = RewardTerm
            continue
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
        node = _ANY_LABEL if (node == dict[str, Any] and part == "rewards") else node
    return (leaf, node) if dataclasses.is_dataclass(node) else None


def _schema_keys(key: str) -> tuple[str, list[str]] | None:
    """For a dotted key, its last part and the keys its parent node knows (None if the parent is unknown)."""
    found = _schema_parent(key)
    return None if found is None else (found[0], [f.name for f in dataclasses.fields(found[1])])


def keys_named(name: str) -> list[str]:
    """The dotted keys whose last part is `name`: ["trainer.lr"] for "lr"."""
    hints = typing.get_type_hints(Config)
    groups = [group for group, kind in hints.items() if dataclasses.is_dataclass(kind)]
    return ([name] if name in hints else []) + [f"{g}.{name}" for g in groups if name in typing.get_type_hints(hints[g])]


def _field_type(key: str) -> Any:
    """The schema's type of a dotted key (None if the schema does not type it)."""
    found = _schema_parent(key)
    return None if found is None else typing.get_type_hints(found[1]).get(found[0])


def _is_text(key: str) -> bool:
    """Whether the schema types `key` as a string (a value that may need quotes on the command line)."""
    return _field_type(key) in (str, str | None)


def _unparsable(override: str, first: str) -> str:
    """An override Hydra's grammar rejects: most often a value with characters such as < > / : that
    must be quoted, or a list written as a bare value."""
    key, sep, value = override.partition("=")
    key = key.lstrip("+~")
    if sep and key in LIST_EXAMPLES:
        items = [i.strip().strip("\"'") for i in value.strip().strip("[]").split(",") if i.strip()]
        example = f"'{key}=[{','.join(json.dumps(i) for i in items)}]'" if items else LIST_EXAMPLES[key]
        return f"cannot parse override '{override}': {key} takes a list; quote its items, e.g. {example}"
    if sep and _is_text(key):
        return f"cannot parse override '{override}': quote a value with special characters, e.g. '{key}=\"{value}\"'"
    return f"cannot parse override: {first}; overrides look like key=value, +new_key=value or ~key"


def explain(error: Exception) -> str:
    """Turn a Hydra/OmegaConf exception into one line that names the key and suggests the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ConfigTypeError, ValidationError

    cause = error.__cause__ or error
    text = str(cause)
    first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
    full_key = re.search(r"full_key: (\S+)", text)
    key = full_key.group(1) if full_key else None

    if isinstance(error, MissingConfigException):  # "Could not load" for an option in a list (model=[a,b])
        group, option = re.search(r"Could not (?:find|load) '(?:(.+)/)?([^'/]+)'", text).groups()
        if group and "/" in group:  # model=Qwen/Qwen2.5-0.5B: Hydra reads the '/' as a subgroup
            group, _, folder = group.partition("/")
            option = f"{folder}/{option}"
        if group == "recipe":
            options = sorted(find_recipes())
            return f"unknown recipe '{option}'; available: {', '.join(options)}{did_you_mean(option, options)}"
        options = sorted(p.stem for p in (config_dir() / (group or "")).glob("*.yaml"))
        hint = did_you_mean(option, options)
        if "/" in option and group == "model":  # a Hub id: no near-miss option to suggest
            hint = f"; a Hub id or a model folder goes in model.name_or_path={option}"
        elif ("/" in option or option.endswith((".jsonl", ".json"))) and group == "dataset":
            hint += (f"; a .jsonl file is dataset=jsonl dataset.path={option}, a Hub dataset or a folder "
                     f"dataset=hf dataset.path={option}")
        return f"unknown {group} option '{option}'; available: {', '.join(options)}{hint}"
    if isinstance(error, OverrideParseException):
        return _unparsable(error.override, first)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        append = re.search(r"To append to your config use (\S+)", str(error))
        if append and _addable(key):  # a key the schema allows that this config does not set yet
            return f"'{append.group(1)[1:]}' sets a key this config does not have yet; add it with a '+': {append.group(1)}"
        return _unknown_key(key)
    if isinstance(cause, ConfigTypeError) and "does not support deletion" in text and key:
        return f"cannot delete '{key}': every setting needs a value; set it instead ({key}=VALUE)"
    if "requires --multirun" in text or "Ambiguous value for argument" in text:
        return (f"{first}: a value with commas, or glob()/range()/choice()/interval(), asks for a sweep of several "
                "runs, which grpo does not do; give one value per key (a list is written [a,b])")
    if isinstance(cause, ValidationError) and key:
        value = re.search(r"Value '([^']*)' of type '\w+' could not be converted to (\w+)", text)
        if value:
            return f"bad value for '{key}': '{value.group(1)}' is not a valid {value.group(2).lower()}"
        if "is not Optional" in text:
            return f"bad value for '{key}': it cannot be null"
        if "is not a ListConfig" in text and key in LIST_EXAMPLES:
            return f"bad value for '{key}': it takes a list, e.g. {LIST_EXAMPLES[key]}"
        if "is not a valid bool" in text:
            optional = _field_type(key) == bool | None
            return f"bad value for '{key}': use true or false" + (" (or null: the default)" if optional else "")
        return f"bad value for '{key}': {first}"
    deleted = re.search(r"Could not delete from config. '([^']+)' does not exist", text)
    if deleted:
        return f"cannot delete '{deleted.group(1)}': no such key"
    existing = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if existing:
        key = existing.group(1)
        return f"'+{key}' adds a new key, but {key} already exists: drop the '+' ({key}=VALUE)"
    return f"invalid configuration: {first}" + (f" (at '{key}')" if key else "")


def _addable(key: str) -> bool:
    """Whether `key` may be added with '+': a schema field absent from the composed YAML (rewards.x.args),
    or any key of a free-form mapping (rewards, dataset.task_args, rewards.x.args)."""
    found = _schema_parent(key)
    if found is not None:
        return found[0] in {f.name for f in dataclasses.fields(found[1])}
    parent = key.rpartition(".")[0]
    return bool(parent) and _field_type(parent) == dict[str, Any]


def _not_an_option(overrides: list[str]) -> str:
    """A config group given a value Hydra reads as a bool or a number (`rollout=true`, `rewards=5`)."""
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key in (*GROUPS, "recipe") and re.fullmatch(r"(?i)\s*(true|false|[-+]?[\d_.]+(e[-+]?\d+)?|[-+]?(inf|nan))\s*",
                                                        value):
            if key == "recipe":
                return f"'{o}': recipe= takes a recipe's name: {', '.join(sorted(find_recipes()))} (see grpo recipes)"
            options = sorted(p.stem for p in (config_dir() / key).glob("*.yaml"))
            return (f"'{o}': {key}= takes the name of one of its options ({', '.join(options)}); to set a value "
                    f"inside the group, name its key ({key}.KEY=VALUE)")
    return "a config group takes the name of one of its options (e.g. rollout=hf); set a value with group.KEY=VALUE"


def _unknown_key(key: str) -> str:
    found = _schema_keys(key)
    hint = ""
    if found is not None:
        leaf, siblings = found
        hint = did_you_mean(leaf, siblings) or f" (known keys there: {', '.join(siblings)})"
    return f"unknown config key '{key}'{hint}"


def _check_known_keys(node: DictConfig, schema: Any, prefix: str) -> None:
    """`+key=value` bypasses Hydra's struct check; the schema has the last word."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in fields:
            raise UserError(_unknown_key(f"{prefix}{key}") + "; grpo has no such setting")
        child = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig):
            _check_known_keys(child, hints[key], f"{prefix}{key}.")


def _reward_terms(raw: Any) -> dict[str, RewardTerm]:
    known = [f.name for f in dataclasses.fields(RewardTerm)]
    terms = {}
    for label, term in (raw or {}).items():
        if not isinstance(term, dict):
            raise UserError(f"rewards.{label}: expected a mapping like {{weight: 1.0, args: {{}}}}, got {term!r}")
        for key in term:
            if key not in known:
                raise UserError(_unknown_key(f"rewards.{label}.{key}"))
        try:
            weight = float(term.get("weight", 1.0))
        except (TypeError, ValueError):
            raise UserError(f"bad value for 'rewards.{label}.weight': {term.get('weight')!r} is not a number") from None
        args = term.get("args") or {}
        if not isinstance(args, dict):
            raise UserError(f"rewards.{label}.args: expected a mapping of argument names to values, got {args!r}")
        terms[str(label)] = RewardTerm(fn=term.get("fn"), weight=weight, args=args)
    return terms


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: Config) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    return container
