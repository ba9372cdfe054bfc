"""Attention over one packed row (a prompt, then G completions of it) done three ways, forward+backward,
at one decoder layer's shapes (default SmolLM2-135M's: 9 query heads, 3 key/value heads, dim 64).

    python benchmarks/packed_attention.py [--prompt 47] [--completion 36] [--group 8] [--repeats 80]

mask:    what the learner does now (grpo_cli/logprobs.py `pack_segments`): SDPA over the whole row
         under its block mask, so every query scores every key of the row, masked or not.
gather:  the prompt causally on its own, then each completion's queries against [its prompt's keys;
         its own keys], those keys gathered by index (as rows of any lengths would need).
views:   the same split with the keys as views: the prompt's keys expanded over the G completions and
         concatenated with each completion's own (completions of one length).

Each way's output and gradients are checked against `mask` before it is timed. Only the arithmetic
of attention is timed here. Folded into a model's attention (a transformers AttentionInterface
function), the gather way gained nothing on a whole SmolLM2 forward+backward of such a row: the
copies it needs cost what the smaller attention saved (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo_cli.logprobs import pack_segments  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=47, help="prompt tokens (default 47: the CPU benchmark's)")
    p.add_argument("--completion", type=int, default=36, help="tokens per completion (default 36)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt, G (default 8)")
    p.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("Q", "KV", "DIM"))
    p.add_argument("--repeats", type=int, default=80, help="timed forward+backward passes per way")
    args = p.parse_args()
    P, C, G = args.prompt, args.completion, args.group
    H, KV, D = args.heads
    N = P + G * C
    # The learner's own row and mask: each completion's last token predicts nothing, so C + 1 tokens.
    row = pack_segments([list(range(P))] * G, [[0] * (C + 1)] * G, pad_id=0, device=torch.device("cpu"),
                        row_tokens=N)
    assert row.allowed.shape == (1, N, N)
    row_mask = row.allowed[:, None]
    index = torch.stack([torch.cat([torch.arange(P), P + g * C + torch.arange(C)]) for g in range(G)])
    own_mask = torch.ones(P + C, P + C, dtype=torch.bool).tril()[P:]  # a completion's queries: (C, P + C)

    def mask(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=row_mask, enable_gqa=True)

    def split(q: Tensor, k: Tensor, v: Tensor, keys: Callable[[Tensor], Tensor]) -> Tensor:
        q, k, v = q[0], k[0], v[0]
        prompt = F.scaled_dot_product_attention(q[:, :P], k[:, :P], v[:, :P], is_causal=True, enable_gqa=True)
        queries = q[:, P:].unflatten(1, (G, C)).transpose(0, 1)  # (G, H, C, D)
        out = F.scaled_dot_product_attention(queries, keys(k), keys(v), attn_mask=own_mask, enable_gqa=True)
        return torch.cat([prompt, out.transpose(0, 1).flatten(1, 2)], 1)[None]

    def gathered(t: Tensor) -> Tensor:
        return t[:, index].transpose(0, 1)  # (G, KV, P + C, D)

    def views(t: Tensor) -> Tensor:
        return torch.cat([t[:, :P].expand(G, -1, -1, -1), t[:, P:].unflatten(1, (G, C)).transpose(0, 1)], 2)

    ways = {"mask": mask, "gather": lambda q, k, v: split(q, k, v, gathered),
            "views": lambda q, k, v: split(q, k, v, views)}
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, h, N, D, generator=generator) for h in (H, KV, KV)]

    def run(way: Callable[..., Tensor]) -> tuple[Tensor, list[Tensor]]:
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = way(*leaves)
        out.backward(torch.ones_like(out))
        return out.detach(), [t.grad for t in leaves]

    want, want_grads = run(mask)
    print(f"one row: prompt {P} + {G} x {C} tokens = {N}; heads {H}/{KV}, dim {D}; {torch.get_num_threads()} threads")
    print("| way | ms per layer, forward+backward | max |output - mask's| | max |gradient - mask's| |\n"
          "| --- | --- | --- | --- |")
    for name, way in ways.items():
        out, grads = run(way)
        out_err = (out - want).abs().max().item()
        grad_err = max((g - w).abs().max().item() for g, w in zip(grads, want_grads, strict=True))
        if out_err > 1e-4 or grad_err > 1e-4:
            raise SystemExit(f"{name}: differs from the masked attention ({out_err:.1e}, {grad_err:.1e})")
        for _ in range(3):
            run(way)
        start = time.perf_counter()
        for _ in range(args.repeats):
            run(way)
        ms = (time.perf_counter() - start) / args.repeats * 1e3
        print(f"| {name} | {ms:.2f} | {out_err:.1e} | {grad_err:.1e} |")


if __name__ == "__main__":
    main()
