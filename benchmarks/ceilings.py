"""The ceilings a GRPO step is compared with: the same work done bare, outside any training loop.

    python benchmarks/ceilings.py vllm    SPEC.json RESULT.json
    python benchmarks/ceilings.py hf      SPEC.json RESULT.json
    python benchmarks/ceilings.py learner SPEC.json RESULT.json

vllm:    the `LLM` of grpo's own vLLM engine, made from grpo train's config (so every engine
         argument is the one grpo train uses: dtype, eager mode, max_model_len, KV-cache bound,
         processed log-probs, CPU scheduling, GPU sleep mode), generating G samples of each step's prompts with the
         sampled tokens' log-probs, and nothing else: no weight pushes, no rewards.
hf:      transformers `generate` on the same model and dtype, one call per step of the P x G
         left-padded prompts (as grpo's hf engine and TRL batch them), plain sampling, nothing else:
         no log-prob recording, no stop strings.
learner: plain transformers, the same model and dtype: for each step, forward+backward of the
         step's P x G sequences (its real prompts, completions of the step's mean length as logged
         by grpo, random tokens) in micro-batches of the same size, logits only at completion
         positions; the reference model's forward over the same batch (when beta > 0); one AdamW step.
         Its linear layers, the output layer's too, multiply as grpo's learner's do: through oneDNN
         where grpo's model.cpu_matmul puts them there (grpo_cli/onednn.py), so that the ceiling
         shows the loop's overhead, not a difference of matrix-product kernels.

The first step's prompts are a warm-up (vllm: a whole generation; learner: one micro-batch), not
reported. Each phase runs in its own process (bench.py starts it) so its peak memory is its own;
on a GPU the result also holds the process's peak of allocated GPU memory (gpu_peak_bytes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process, as grpo runs it
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _device(spec: dict):  # noqa: ANN202
    import torch

    return torch.device("cuda" if spec["device"] == "cuda" else "cpu")


def _sync(spec: dict) -> None:
    import torch

    if spec["device"] == "cuda":
        torch.cuda.synchronize()


def _prompt_ids(spec: dict) -> list[list[list[int]]]:
    """Token ids of every step's prompts, tokenized as grpo's engine does (no special tokens added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    P = spec["prompts_per_step"]
    ids = [tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in spec["rows"]]
    return [ids[i:i + P] for i in range(0, len(ids), P)]


# ----------------------------------------------------------------------------- vLLM generation
def vllm_ceiling(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from grpo_cli.config import compose
    from grpo_cli.rollout import make_engine

    # The `LLM` grpo train's engine makes (from the same config), used bare: every engine argument is
    # grpo's own (on CPU: no chunked prefill and its token budget; on a GPU: sleep mode), never a copy.
    cfg = compose(spec["overrides"], Path(__file__).resolve().parent)
    start = time.perf_counter()
    llm = make_engine(cfg.rollout, cfg.model, spec["model"]).llm
    startup = time.perf_counter() - start
    G = spec["group_size"]
    steps = []
    for s, prompts in enumerate(_prompt_ids(spec)):
        # One request per prompt with n=G and its own seed, as grpo's engine sends them.
        params = [SamplingParams(n=G, max_tokens=spec["max_new_tokens"], temperature=spec["temperature"],
                                 top_p=spec["top_p"], top_k=spec["top_k"], logprobs=0, seed=s * 100_003 + i * G)
                  for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        if s > 0:  # step 0 is the warm-up
            steps.append({"seconds": seconds, "tokens": tokens})
        print(f"[vllm] batch {s}{' (warm-up)' if s == 0 else ''}: {tokens} tokens in {seconds:.2f} s", flush=True)
    return {"startup_s": startup, "steps": steps}


# ----------------------------------------------------------------------------- transformers generate
def hf_ceiling(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    device, dtype = _device(spec), getattr(torch, spec["dtype"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device).eval()
    startup = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    eos: set[int] = set()
    for ids in (model.generation_config.eos_token_id, tokenizer.eos_token_id):  # grpo's hf engine stops at both
        if ids is not None:
            eos.update([ids] if isinstance(ids, int) else ids)
    pad = spec["pad_id"]
    sampler = (dict(do_sample=False) if spec["temperature"] == 0 else
               dict(do_sample=True, temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"]))
    config = GenerationConfig(**sampler, max_new_tokens=spec["max_new_tokens"], eos_token_id=sorted(eos),
                              pad_token_id=pad, use_cache=True)
    model.generation_config = GenerationConfig(eos_token_id=sorted(eos), pad_token_id=pad)  # no model defaults
    G = spec["group_size"]
    steps = []
    for s, prompts in enumerate(_prompt_ids(spec)):
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        ids, mask = ids.repeat_interleave(G, 0).to(device), mask.repeat_interleave(G, 0).to(device)
        torch.manual_seed(spec["seed"] + s)
        _sync(spec)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        _sync(spec)
        seconds = time.perf_counter() - start
        completions = out[:, width:].cpu()
        ended = torch.isin(completions, torch.tensor(sorted(eos)))
        # A row's tokens: up to and including its first EOS, else all of them.
        lengths = torch.where(ended.any(1), ended.int().argmax(1) + 1, completions.shape[1])
        tokens = int(lengths.sum())
        if s > 0:  # step 0 is the warm-up
            steps.append({"seconds": seconds, "tokens": tokens})
        print(f"[hf] batch {s}{' (warm-up)' if s == 0 else ''}: {tokens} tokens in {seconds:.2f} s", flush=True)
    return {"startup_s": startup, "steps": steps}


# ----------------------------------------------------------------------------- forward + backward
def learner_ceiling(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from grpo_cli import onednn

    device, dtype = _device(spec), getattr(torch, spec["dtype"])
    G, M = spec["group_size"], spec["micro_batch_size"]
    pad = spec["pad_id"]
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device).train()
    policy.config.use_cache = False
    if spec["gradient_checkpointing"]:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    if spec["beta"] != 0:
        reference = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device).eval()
        reference.requires_grad_(False)
    linear = "torch"
    if onednn.wanted(spec.get("cpu_matmul", "torch"), device, sharded=False):
        for model in (policy, reference):
            if model is not None and onednn.use_onednn(model, output_layer=True):
                linear = "onednn"
    optimizer = torch.optim.AdamW(policy.parameters(), lr=spec["lr"], betas=tuple(spec["adam_betas"]),
                                  eps=spec["adam_eps"], weight_decay=spec["weight_decay"])
    generator = torch.Generator().manual_seed(spec["seed"])
    vocab = policy.config.vocab_size

    def micro_batches(prompts: list[list[int]], length: int):  # noqa: ANN202
        rows = [p for p in prompts for _ in range(G)]  # each prompt G times, as in a GRPO batch
        for i in range(0, len(rows), M):
            chunk = rows[i:i + M]
            width = max(map(len, chunk))
            completion = torch.randint(0, vocab, (len(chunk), length), generator=generator)
            # Prompts left-padded so every completion ends the row: logits are needed at the last length + 1.
            ids = torch.full((len(chunk), width + length), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):width] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            ids[:, width:] = completion
            yield ids.to(device), mask.to(device), completion.to(device)

    def completion_logprobs(model, ids, mask, completion, length: int):  # noqa: ANN001, ANN202
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=length + 1).logits[:, :-1]  # (B, T, V)
        logits = logits.float() / spec["temperature"]
        return logits.log_softmax(-1).gather(-1, completion[..., None]).squeeze(-1)  # (B, T)

    steps_prompts = _prompt_ids(spec)
    lengths = spec["completion_lengths"]  # per measured step, from grpo's metrics
    # Warm-up on one micro-batch: allocator, kernels, and AdamW's state (allocated at its first step,
    # which grpo's measured steps are also past).
    warm = next(micro_batches(steps_prompts[0], lengths[0]))
    completion_logprobs(policy, *warm, lengths[0]).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    steps = []
    for s, prompts in enumerate(steps_prompts[1:]):
        length = lengths[s]
        batches = list(micro_batches(prompts, length))
        fwd_bwd = ref = 0.0
        for ids, mask, completion in batches:
            if reference is not None:
                _sync(spec)
                start = time.perf_counter()
                with torch.no_grad():
                    completion_logprobs(reference, ids, mask, completion, length)
                _sync(spec)
                ref += time.perf_counter() - start
            start = time.perf_counter()
            (completion_logprobs(policy, ids, mask, completion, length).mean() / len(batches)).backward()
            _sync(spec)
            fwd_bwd += time.perf_counter() - start
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), spec["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(spec)
        opt = time.perf_counter() - start
        steps.append({"fwd_bwd_s": fwd_bwd, "ref_s": ref, "optimizer_s": opt, "completion_len": length})
        print(f"[learner] step {s + 1}: fwd+bwd {fwd_bwd:.1f} s, reference {ref:.1f} s, AdamW {opt:.2f} s "
              f"({len(prompts) * G} x ({len(prompts[0])}+{length}) tokens)", flush=True)
    return {"steps": steps, "linear": linear}


if __name__ == "__main__":
    mode, spec_path, result_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["repo"])
    result = {"vllm": vllm_ceiling, "hf": hf_ceiling, "learner": learner_ceiling}[mode](spec)
    if spec["device"] == "cuda":
        import torch

        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(result_path).write_text(json.dumps(result, indent=1))
