"""A randomly initialised model with Qwen2.5-0.5B's architecture and SmolLM2's tokenizer, for the GPU
benchmark where no hub is reachable (RESULTS.md, "Speed vs TRL on a GPU").

    python benchmarks/random_model.py /tmp/qwen05-random [--dtype bfloat16]

24 layers, hidden 896, 14 query / 2 key-value heads, MLP 4864, tied embeddings, as Qwen2.5-0.5B;
the vocabulary is SmolLM2's 49,152 words (the tokenizer that ships with grpo), so 402M parameters.
Random weights almost never emit EOS: every completion runs to max_new_tokens, the same generation
work on both sides of a benchmark, step after step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write the model and tokenizer to")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from grpo_cli.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {args.dtype}")


if __name__ == "__main__":
    main()
