"""Model resolution and loading: the embedded default offline, local folders, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_cli.errors import UserError
from grpo_cli.models import load_model, load_tokenizer, resolve, torch_dtype
from grpo_cli.schema import ModelConfig


def test_builtin_model_loads_offline(smollm2_dir: Path) -> None:
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct")
    model = load_model(cfg, torch.device("cpu"))
    tokenizer = load_tokenizer(cfg)
    assert resolve(cfg.name_or_path) == str(smollm2_dir)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    assert len(tokenizer) == 49_152 and model.config.head_dim == 64
    assert model.dtype == torch.float32
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    # The dequantised weights are the real model: greedy decoding answers this one right.
    assert "5" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_tiny_model_fixture_is_small_and_loadable(tiny_model_dir: Path) -> None:
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.device("cpu"))
    n_params = sum(p.numel() for p in model.parameters())
    assert 3_000_000 < n_params < 3_500_000
    assert model.config.head_dim == 64 and model.config.num_hidden_layers == 2
    assert load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir))).pad_token is not None


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-model", "~/missing-model", "a/b/c"])
def test_missing_path_is_a_user_error(path: str) -> None:
    with pytest.raises(UserError, match="no such directory"):
        resolve(path)


def test_unreachable_hub_id_is_a_user_error() -> None:
    with pytest.raises(UserError, match="not a local directory, a built-in model"):
        load_tokenizer(ModelConfig(name_or_path="nobody/no-such-model-xyz"))


def test_folder_without_a_model_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"cannot load {tmp_path}"):
        load_model(ModelConfig(name_or_path=str(tmp_path)), torch.device("cpu"))


def test_auto_dtype_is_fp32_on_cpu_and_bf16_on_cuda() -> None:
    assert torch_dtype("auto", torch.device("cpu")) == torch.float32
    assert torch_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert torch_dtype("float16", torch.device("cpu")) == torch.float16


def test_a_cache_that_cannot_be_written_is_named_before_the_built_in_model_is_converted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion (~20 s) wrote into GRPO_CACHE only at its end: a cache that cannot be written (HOME
    read-only, GRPO_CACHE mistyped) was a traceback, from mkdir or after the conversion."""
    import grpo_cli.models as models

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted before checking the cache")

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "file" / "cache"))
    monkeypatch.setattr(models, "_convert_gguf", must_not_convert)
    with pytest.raises(UserError) as caught:
        models.resolve("smollm2-135m-instruct")
    assert str(caught.value) == (f"built-in model smollm2-135m-instruct: cannot write its converted copy in "
                                 f"{tmp_path / 'file' / 'cache' / 'models'} (Not a directory); set GRPO_CACHE to a "
                                 "writable folder")
