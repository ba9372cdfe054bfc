"""`reward_model`: score (prompt, completion) pairs with a Hugging Face sequence-classification
model (e.g. a Bradley-Terry reward model with one output logit).

With a chat template, the reward model's tokenizer renders a user/assistant pair: the user turn is
the dataset's `problem` (the question itself, not the policy's rendered prompt, which already holds
the policy's own template and special tokens), the assistant turn the completion; a conversational
dataset's problem (a list of messages) is the conversation the completion answers. Without one, the
text is the plain concatenation prompt + completion: what the policy saw, then what it wrote.
The model is loaded lazily, once, on first use; a local folder is checked when the reward is
built (it exists and holds a ...ForSequenceClassification model: a causal LM would load with a random
score head), a Hub id on load (a head missing from the checkpoint raises).
Batches are right-padded with the model's own pad id (config.pad_token_id, the id it looks for to find
each row's last token): with left padding, models that number positions 0..n-1 regardless of the
attention mask would score a padded sequence differently from the same one alone.
Over-long inputs are truncated from the left so the scored final token is the completion's, to
`max_length` or the model's own limit (config.max_position_embeddings, tokenizer.model_max_length),
whichever is shorter: past its learned positions a BERT-style model raises.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import RewardFn


class _Scorer:
    def __init__(self, path: str, batch_size: int, device: str | None, max_length: int,
                 label_index: int | None):
        self.path, self.batch_size, self.device = path, batch_size, device
        self.max_length, self.label_index = max_length, label_index
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None
        self._failed: Exception | None = None  # a failed load is not retried for each completion

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._failed is not None:
                raise self._failed
            if self._loaded is None:
                try:
                    self._loaded = self._load_once()
                except Exception as e:
                    self._failed = e
                    raise
            return self._loaded

    def _load_once(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(self.path)
        model, info = AutoModelForSequenceClassification.from_pretrained(self.path, output_loading_info=True)
        if info["missing_keys"]:
            raise ValueError(f"{self.path!r} lacks {', '.join(sorted(info['missing_keys'])[:3])}: it is not a "
                             "sequence-classification model (its head would be random weights)")
        model = model.to(device).eval()
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is not None:
            # The model finds each row's last token by this id: pad with it, not the tokenizer's own.
            pad = tokenizer.convert_ids_to_tokens(text_config.pad_token_id)
            if pad is None:
                raise ValueError(f"{self.path!r}: config.pad_token_id {text_config.pad_token_id} is not "
                                 "in its tokenizer's vocabulary")
            tokenizer.pad_token = pad
        else:
            if tokenizer.pad_token is None:
                if tokenizer.eos_token is None:
                    raise ValueError(f"tokenizer of {self.path!r} has neither a pad nor an eos token")
                tokenizer.pad_token = tokenizer.eos_token
            text_config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        for limit in (getattr(text_config, "max_position_embeddings", None), tokenizer.model_max_length):
            if isinstance(limit, int) and limit > 0:
                self.max_length = min(self.max_length, limit)
        num_labels = model.config.num_labels
        if num_labels != 1 and self.label_index is None:
            raise ValueError(f"{self.path!r} has {num_labels} labels: set label_index")
        if self.label_index is not None and not 0 <= self.label_index < num_labels:
            raise ValueError(f"label_index {self.label_index} out of range for {num_labels} labels")
        return tokenizer, model

    def texts(self, tokenizer: Any, prompts: Sequence[Any], completions: Sequence[str],
              problems: Sequence[Any] | None = None) -> list[str]:
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            question = prompt if problems is None else problems[i]
            if isinstance(question, list):  # a conversational dataset's problem: a list of messages
                messages = [*question, {"role": "assistant", "content": completion}]
            else:
                messages = [{"role": "user", "content": str(question)}, {"role": "assistant", "content": completion}]
            if getattr(tokenizer, "chat_template", None):
                out.append(tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                out.append(str(prompt) + completion)
        return out

    def __call__(self, completions: list[str], prompt: Sequence[Any], problem: Sequence[Any] | None = None,
                 **_: Any) -> list[float]:
        import torch

        if len(prompt) != len(completions):
            raise ValueError(f"'prompt' has {len(prompt)} entries for {len(completions)} completions")
        tokenizer, model = self._load()
        texts = self.texts(tokenizer, prompt, completions, problem)
        # A chat template already renders BOS/special tokens itself.
        add_special = not getattr(tokenizer, "chat_template", None)
        scores: list[float] = []
        index = 0 if self.label_index is None else self.label_index
        for start in range(0, len(texts), self.batch_size):
            batch = tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=self.max_length, add_special_tokens=add_special)
            batch = {k: v.to(model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                logits = model(**batch).logits
            scores.extend(logits[:, index].float().cpu().tolist())
        return scores


def reward_model(model_name_or_path: str, batch_size: int = 8, device: str | None = None,
                 max_length: int = 4096, label_index: int | None = None) -> RewardFn:
    """Logit of a sequence-classification model as the reward. `label_index` picks the logit
    for models with several labels (required then); `device` defaults to cuda if available;
    `max_length` (tokens, cut from the left) is capped at the model's own limit."""
    if not isinstance(model_name_or_path, str) or not model_name_or_path:
        raise ValueError(f"model_name_or_path must be a non-empty string, got {model_name_or_path!r}")
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if device is not None and not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'cuda:0' or 'cpu', got {device!r}")
    if label_index is not None and (isinstance(label_index, bool) or not isinstance(label_index, int)):
        raise ValueError(f"label_index must be an integer, got {label_index!r}")
    _check_folder(model_name_or_path)
    return _Scorer(model_name_or_path, batch_size, device, max_length, label_index)


def _check_folder(path: str) -> None:
    """A local folder must hold a sequence-classification model; a Hub id is checked when it loads."""
    folder = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) and not folder.is_dir():  # a path, not a Hub id (org/name)
        what = "not a folder" if folder.exists() else "no such folder"
        raise ValueError(f"model_name_or_path={path}: {what}; pass a reward model's folder or a Hub id (org/name)")
    if not folder.is_dir():
        return
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return  # a PEFT adapter: transformers loads its base model, and the head is checked on load
    if not (folder / "config.json").is_file():
        raise ValueError(f"model_name_or_path={path}: the folder holds no model (no config.json)")
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # transformers says what is wrong with it when it loads
    if architectures and not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"model_name_or_path={path} is a {architectures[0]}, not a sequence-classification model "
                         "(...ForSequenceClassification): loaded as one, its score head would be random weights; "
                         "pass a reward model")
