"""The CPU learner's oneDNN linear layers (grpo_cli/onednn.py): the same products and gradients as
nn.Linear, on the layers meant, and the setting that turns them on or off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_cli import onednn
from grpo_cli.config import compose
from grpo_cli.errors import UserError
from grpo_cli.learner import Learner
from grpo_cli.onednn import OneDNNLinear, use_onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")
CPU = torch.device("cpu")


def _layer(weight: list[list[float]], bias: list[float] | None) -> OneDNNLinear:
    layer = torch.nn.Linear(len(weight[0]), len(weight), bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        if bias is not None:
            layer.bias.copy_(torch.tensor(bias))
    layer.__class__ = OneDNNLinear
    return layer


def test_product_and_gradients_by_hand() -> None:
    # y = x W^T + b with x = [[1, 2], [3, -1]], W = [[3, 4], [5, 6], [-2, 1]], b = [0.5, 0, -1]:
    #   row 1: [1*3+2*4, 1*5+2*6, 1*-2+2*1] + b = [11.5, 17, -1]
    #   row 2: [3*3-1*4, 3*5-1*6, 3*-2-1*1] + b = [5.5, 9, -8]
    # loss = sum(y * g) with g = [[1, 0, 2], [0, -1, 1]]:
    #   dL/dx = g W = [[3+0-4, 4+0+2], [0-5-2, 0-6+1]] = [[-1, 6], [-7, -5]]
    #   dL/dW = g^T x = [[1, 2], [-3, 1], [2*1+1*3, 2*2+1*-1]] = [[1, 2], [-3, 1], [5, 3]]
    #   dL/db = column sums of g = [1, -1, 3]
    layer = _layer([[3, 4], [5, 6], [-2, 1]], [0.5, 0, -1])
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    y = layer(x)
    assert y.tolist() == [[11.5, 17.0, -1.0], [5.5, 9.0, -8.0]]
    (y * torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])).sum().backward()
    assert x.grad.tolist() == [[-1.0, 6.0], [-7.0, -5.0]]
    assert layer.weight.grad.tolist() == [[1.0, 2.0], [-3.0, 1.0], [5.0, 3.0]]
    assert layer.bias.grad.tolist() == [1.0, -1.0, 3.0]


@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_on_a_batch_of_rows(bias: bool) -> None:
    """(batch, rows, features) input, a non-contiguous incoming gradient: within fp32 rounding of
    the float64 product, as nn.Linear is."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 160, bias=bias)
    fast = torch.nn.Linear(96, 160, bias=bias)
    fast.load_state_dict(plain.state_dict())
    assert use_onednn_layers(fast) == 1 and type(fast) is OneDNNLinear
    x = torch.randn(3, 37, 96, dtype=torch.float64)
    grad = torch.randn(160, 37, 3, dtype=torch.float64).permute(2, 1, 0)  # strided, as backward hands them
    exact = torch.nn.functional.linear(x, plain.weight.double(), plain.bias.double() if bias else None)
    xs = x.float().requires_grad_()
    y = fast(xs)
    assert torch.allclose(y.double(), exact, rtol=0, atol=2e-5 * exact.abs().max().item())
    (y * grad.float()).sum().backward()
    x64 = x.clone().requires_grad_()
    w64 = plain.weight.detach().double().requires_grad_()
    b64 = plain.bias.detach().double().requires_grad_() if bias else None
    (torch.nn.functional.linear(x64, w64, b64) * grad).sum().backward()
    for got, want in ((xs.grad, x64.grad), (fast.weight.grad, w64.grad)) + (((fast.bias.grad, b64.grad),) if bias else ()):
        assert torch.allclose(got.double(), want, rtol=0, atol=2e-5 * want.abs().max().item())


def use_onednn_layers(layer: torch.nn.Linear) -> int:
    """use_onednn on a bare layer (it takes a model with an output layer)."""

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def get_output_embeddings(self) -> None:
            return None

    return use_onednn(Holder())


def test_other_inputs_take_nn_linear() -> None:
    """Half precision, one dimension, no rows, and no gradient wanted: the same results as nn.Linear."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(layer.state_dict())
    use_onednn_layers(layer)
    for x in (torch.randn(8), torch.randn(0, 8), torch.randn(5, 8)):
        assert torch.allclose(layer(x), reference(x), atol=1e-6)
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None and torch.allclose(y, reference(x), atol=1e-6)
    half = layer.to(torch.bfloat16)
    xb = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(half(xb), torch.nn.functional.linear(xb, half.weight, half.bias))


def test_use_onednn_leaves_output_layer_and_adapters(tiny_model_dir: Path) -> None:
    """Every decoder linear layer changes class; the output layer (the log-probs' own products) and
    LoRA's adapters do not, and the state dict is the same."""
    pytest.importorskip("peft")
    cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.lora_rank=4", "loss.beta=0"])
    learner = Learner(cfg, CPU, pad_id=0)
    model = learner.policy
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds and all(kind is not torch.nn.Linear for name, kind in kinds.items()
                         if name.endswith(("q_proj.base_layer", "down_proj.base_layer")))
    assert all(kinds[name] is torch.nn.Linear for name in kinds if name.endswith(("lora_A.default", "lora_B.default")))
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert getattr(model.get_output_embeddings().weight, onednn._MARK)


def _grads(tiny_model_dir: Path, matmul: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    cfg = compose([f"model.name_or_path={tiny_model_dir}", f"model.cpu_matmul={matmul}", "loss.beta=0.1",
                   "trainer.micro_batch_size=3", "trainer.lr=0"])
    torch.manual_seed(0)
    learner = Learner(cfg, CPU, pad_id=0)
    changed = sum(type(m) is OneDNNLinear for m in learner.policy.modules())
    assert (changed > 0) == (matmul == "auto")
    prompts = [[5, 6, 7]] * 4 + [[9, 10]] * 4
    completions = [[11, 12, 13, 2], [14, 2], [15, 16, 17, 18, 19], [20], [21, 22], [23, 24, 25], [26], [27, 28, 29, 30]]
    engine = [[-1.5] * len(c) for c in completions]
    stats = learner.update(prompts, completions, engine, torch.tensor([1.0, -1.0, 0.5, -0.5, 0.3, -0.3, 1.2, -1.2]))
    return stats, {n: p.grad.clone() for n, p in learner.policy.named_parameters() if p.grad is not None}


def test_learner_update_matches_torch_products(tiny_model_dir: Path) -> None:
    """A whole update (policy, reference, output layer, embedding) with oneDNN products: the same
    loss, KL and gradients as with torch's own, to fp32 rounding."""
    stats, grads = _grads(tiny_model_dir, "auto")
    want_stats, want_grads = _grads(tiny_model_dir, "torch")
    for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
        assert stats[key] == pytest.approx(want_stats[key], rel=1e-5, abs=1e-7), key
    assert grads.keys() == want_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        scale = want_grads[name].abs().max().item()
        assert torch.allclose(grad, want_grads[name], rtol=0, atol=1e-5 * scale + 1e-12), name


def test_setting(monkeypatch) -> None:
    choose = onednn.wanted
    assert choose("auto", CPU, sharded=False) and choose("onednn", CPU, sharded=False)
    assert not choose("torch", CPU, sharded=False)
    assert not choose("auto", torch.device("cuda"), sharded=False)
    assert not choose("auto", CPU, sharded=True)  # FSDP's sharded layers keep their own
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert not choose("auto", CPU, sharded=False)
    with pytest.raises(UserError, match=r"^model.cpu_matmul=onednn: .*use model.cpu_matmul=auto or model.cpu_matmul=torch$"):
        choose("onednn", CPU, sharded=False)


def test_product_only_for_marked_weights() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(5, 16), torch.randn(32, 16)
    exact = (x.double() @ w.double().t())
    assert torch.equal(onednn.product(x, w), x @ w.t())  # unmarked: torch's own
    setattr(w, onednn._MARK, True)
    assert torch.allclose(onednn.product(x, w).double(), exact, atol=1e-5)
    g = torch.randn(5, 32)
    assert torch.allclose(onednn.product(g, w, transposed=False).double(), g.double() @ w.double(), atol=1e-5)
