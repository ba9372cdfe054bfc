"""LoRA (peft): only adapters train, the reference is the adapter-free model, and what leaves the
learner (engine pushes, checkpoints) is the plain model with the adapters merged in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grpo_cli.config import compose
from grpo_cli.learner import Learner
from grpo_cli.logprobs import pack, sequence_logprobs

pytest.importorskip("peft")
CPU = torch.device("cpu")
PROMPTS = [[1, 2, 3], [1, 2, 3], [6, 7, 8, 9], [6, 7, 8, 9]]
COMPLETIONS = [[11, 12], [13, 14, 15, 16], [17], [18, 19, 20]]
ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])


def _plain(tiny_model_dir: Path, weights: dict[str, torch.Tensor] | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if weights is not None:
        model.load_state_dict(weights)
    return model


@pytest.fixture
def trained(tiny_model_dir: Path) -> Learner:
    cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.lora_rank=4", "loss.beta=0.1", "trainer.lr=1e-2",
                   "rollout.max_new_tokens=4"])
    learner = Learner(cfg, CPU, pad_id=0)
    engine = [[0.0] * len(c) for c in COMPLETIONS]
    for _ in range(2):
        learner.update(PROMPTS, COMPLETIONS, engine, ADVANTAGES)
    return learner


def test_only_adapters_train_and_the_reference_is_the_adapter_free_model(trained: Learner,
                                                                         tiny_model_dir: Path) -> None:
    assert trained.reference is None  # no second copy of the model
    assert trained.trainable and all("lora_" in n for n, p in trained.policy.named_parameters() if p.requires_grad)
    original = _plain(tiny_model_dir)
    for name, tensor in original.state_dict().items():  # the frozen base weights did not move
        base_name = name.replace(".weight", ".base_layer.weight") if "layers." in name and "proj" in name else name
        torch.testing.assert_close(trained.policy.state_dict()[base_name], tensor, rtol=0, atol=0)
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
    with torch.no_grad():
        ref = trained._reference_logprobs(batch, temperature=1.0)
        want, _ = sequence_logprobs(original, batch, temperature=1.0)
        policy, _ = sequence_logprobs(trained.policy, batch, temperature=1.0)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-6)
    assert (policy - ref).abs().max() > 1e-3  # the adapters did change the policy


def test_merged_weights_are_the_policy_under_the_plain_names(trained: Learner, tiny_model_dir: Path) -> None:
    merged = dict(trained.named_weights())
    original = _plain(tiny_model_dir)
    assert merged.keys() == original.state_dict().keys()
    plain = _plain(tiny_model_dir, merged)
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
    with torch.no_grad():
        got, _ = sequence_logprobs(plain, batch, temperature=1.0)
        want, _ = sequence_logprobs(trained.policy, batch, temperature=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_checkpoint_holds_a_plain_model_and_the_adapter_for_resuming(trained: Learner, tiny_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    trained.save_weights(tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = _plain(tmp_path)  # AutoModelForCausalLM reads the merged model
    for name, tensor in trained.named_weights():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    fresh = Learner(trained.cfg, CPU, pad_id=0)
    fresh.load_state_dict(trained.state_dict(), tmp_path)
    for (name, a), (_, b) in zip(fresh.named_weights(), trained.named_weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class _SyncedEngine:
    """Stands in for a vLLM engine that received `weights`: it scores tokens as the plain model
    holding them does (eval mode, no dropout), which is what a correct push gives."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def wake(self) -> None:
        pass

    def prompt_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        batch = pack([prompt_ids], [completion_ids], pad_id=0, device=CPU)
        with torch.no_grad():
            return sequence_logprobs(self.model, batch, temperature=1.0)[0][0].tolist()


def test_check_sync_measures_the_push_not_the_dropout(tiny_model_dir: Path) -> None:
    """rollout.check_sync with model.lora_dropout > 0: an engine holding exactly the merged weights
    reads ~1e-6, not the dropout noise of a train-mode forward (0.1-0.3 before the fix)."""
    from grpo_cli.loop import check_sync
    from grpo_cli.rollout import Sample

    cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.lora_rank=4", "model.lora_dropout=0.5",
                   "loss.beta=0", "trainer.lr=1e-2", "rollout.max_new_tokens=4"])
    learner = Learner(cfg, CPU, pad_id=0)
    for _ in range(2):  # non-zero adapters, so dropout changes the policy's output
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], ADVANTAGES)
    engine = _SyncedEngine(_plain(tiny_model_dir, dict(learner.named_weights())))
    probe = Sample(prompt_index=0, prompt_ids=list(range(100, 140)), completion_ids=list(range(500, 520)), text="",
                   logprobs=[], truncated=False)
    assert learner.policy.training
    assert check_sync(engine, learner, probe)["sync/logprob_diff_max"] < 1e-5
    assert learner.policy.training  # the learner trains on in train mode


def test_a_target_module_the_model_lacks_is_one_line_naming_its_layers(tiny_model_dir: Path) -> None:
    """peft's NoMatchingPeftModuleError came out as a traceback, once the model had loaded."""
    from grpo_cli.errors import UserError

    cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.lora_rank=4", "model.lora_target_modules=[qproj]"])
    with pytest.raises(UserError) as caught:
        Learner(cfg, CPU, pad_id=0)
    message = str(caught.value)
    assert message.startswith("model.lora_target_modules=['qproj']: Target modules {'qproj'} not found in the base "
                              "model.")
    assert message.endswith("; this model's linear layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
                            "v_proj (or use [all-linear])")  # not lm_head, the output layer
    assert "\n" not in message


@pytest.fixture(scope="module")
def phi3_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_families' tiny Phi-3: q/k/v fused in one qkv_proj, gate/up in one gate_up_proj."""
    from test_families import _build  # tests/ is on sys.path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("phi3")
    _build("phi3", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_target_modules_of_another_family_are_one_line_even_when_some_match(phi3_dir: Path) -> None:
    """Llama's attention list on Phi-3 put adapters on o_proj alone, silently (peft stops only when no name
    matches at all): q/k/v, most of what the user meant to train, stayed frozen."""
    from grpo_cli.errors import UserError

    cfg = compose([f"model.name_or_path={phi3_dir}", "model.lora_rank=4",
                   "model.lora_target_modules=[q_proj,k_proj,v_proj,o_proj]"])
    with pytest.raises(UserError) as caught:
        Learner(cfg, CPU, pad_id=0)
    assert str(caught.value) == (
        "model.lora_target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']: this model has no q_proj, k_proj, "
        "v_proj (only o_proj would get adapters); its linear layers are down_proj, gate_up_proj, o_proj, qkv_proj "
        "(or use [all-linear])")
    # The family's own names, and full module paths, are taken (peft matches a name or a path's end).
    for targets in ("[qkv_proj,o_proj]", "[model.layers.0.self_attn.qkv_proj,gate_up_proj]"):
        learner = Learner(compose([f"model.name_or_path={phi3_dir}", "model.lora_rank=4",
                                   f"model.lora_target_modules={targets}"]), CPU, pad_id=0)
        assert learner.trainable


@pytest.mark.parametrize(("targets", "named"), [("[q_proj,lm_head]", "lm_head"),
                                                ("[embed_tokens,q_proj]", "embed_tokens")])
def test_an_adapter_on_a_tied_embedding_is_one_line(tiny_model_dir: Path, targets: str, named: str) -> None:
    """The tiny model ties lm_head to embed_tokens (as SmolLM2 and the small Qwen2.5 do): the merged
    weights hold one tensor for both, so such an adapter was merged into one of them and lost in the
    other; vLLM then scored a probe 3.6 (lm_head) or 0.24 (embed_tokens) nats off the learner."""
    from grpo_cli.errors import UserError

    cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.lora_rank=4", f"model.lora_target_modules={targets}"])
    with pytest.raises(UserError) as caught:
        Learner(cfg, CPU, pad_id=0)
    assert str(caught.value) == (
        f"model.lora_target_modules={targets[1:-1].split(',')}: this model ties its output layer to its input "
        f"embedding (tie_word_embeddings), so an adapter on {named} cannot be merged into the one weight they share; "
        f"leave {named} out (e.g. [all-linear])")


def test_a_bf16_model_is_merged_and_saved_in_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    """peft keeps the adapters in fp32; base + delta promoted every adapted weight to fp32, so a bf16
    model's checkpoints held its linear layers at twice their size (0.48 GB instead of 0.27 for SmolLM2)."""
    from safetensors.torch import load_file

    cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.lora_rank=4", "model.dtype=bfloat16",
                   "loss.beta=0", "trainer.lr=1e-2", "rollout.max_new_tokens=4"])
    learner = Learner(cfg, CPU, pad_id=0)
    for _ in range(2):
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], ADVANTAGES)
    learner.save_weights(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    q = learner.policy.model.layers[0].self_attn.q_proj
    scale = cfg.model.lora_alpha / cfg.model.lora_rank
    lora_a, lora_b = q.lora_A["default"].weight, q.lora_B["default"].weight  # fp32 (peft's default)
    assert lora_b.abs().max() > 1e-3  # the update is there to round in
    want = (q.base_layer.weight.float() + (lora_b @ lora_a) * scale).to(torch.bfloat16)
    torch.testing.assert_close(saved["model.layers.0.self_attn.q_proj.weight"], want, rtol=0, atol=0)


def test_saving_the_adapter_asks_no_hub(trained: Learner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's save_pretrained looked the base model's config.json up on the Hub at every checkpoint of
    a Hub model (to see whether the vocabulary was resized, which grpo never does); offline, that was
    two warnings."""
    import peft.utils.save_and_load as save_and_load

    asked: list[str] = []
    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", lambda repo, name, **kw: asked.append(repo))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    trained.peft.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trained.save_weights(tmp_path)
    assert asked == []
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_loading_adapters_on_other_layers_names_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    """[q_proj,v_proj] when it trained, [all-linear] now, past the config's check (a config.yaml edited by
    hand): torch's "loaded state dict contains a parameter group that doesn't match" before."""
    from grpo_cli.learner import TrainingError

    base = [f"model.name_or_path={tiny_model_dir}", "model.lora_rank=4"]
    saved = Learner(compose([*base, "model.lora_target_modules=[q_proj,v_proj]"]), CPU, pad_id=0)
    saved.save_weights(tmp_path)
    fresh = Learner(compose(base), CPU, pad_id=0)
    with pytest.raises(TrainingError) as caught:
        fresh.load_state_dict(saved.state_dict(), tmp_path)
    assert str(caught.value) == (
        f"checkpoint {tmp_path} holds adapters on q_proj, v_proj, and model.lora_target_modules=['all-linear'] puts "
        "them on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj; resume with the run's own. "
        "model.lora_rank, lora_alpha and lora_target_modules stay as the run trained: start a new run to change them")


def test_a_resume_with_another_rank_leaves_the_run_resumable(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The run's config.yaml used to take model.lora_rank=8 before the load failed (a traceback), so
    the plain `grpo train resume=RUN` failed from then on too."""
    import subprocess
    import sys

    run = tmp_path / "run"
    train = ["train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", f"output_dir={run}",
             "model.lora_rank=4", "rollout=hf", "rollout.group_size=2", "rollout.max_new_tokens=4",
             "trainer.max_steps=1", "trainer.prompts_per_step=1", "trainer.save_every=1", "dataset.size=8"]

    def grpo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True, timeout=600)

    assert grpo(*train).returncode == 0
    saved = (run / "config.yaml").read_text()
    failed = grpo("train", f"resume={run}", "trainer.max_steps=2", "model.lora_rank=8")
    assert failed.returncode == 2  # a UserError
    assert failed.stderr.strip().startswith(f"error: resume={run}: model.lora_rank cannot change on resume (the "
                                            "run's weights and optimizer state have model.lora_rank=4)")
    assert len(failed.stderr.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == saved
    resumed = grpo("train", f"resume={run}", "trainer.max_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "checkpoints" / "step-000002").is_dir()


@pytest.mark.parametrize("iterations", [1, 2])
def test_old_logprobs_are_the_sampling_policy_without_dropout(tiny_model_dir: Path, iterations: int) -> None:
    """model.lora_dropout > 0: the log-probs the engine is compared with (rollout/logprob_diff_*, the
    importance weight) and, with num_iterations > 1, the ratio's old policy are the policy as the engine
    samples it, without dropout; a train-mode forward put 0.1-0.3 nats of dropout noise in them."""
    cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.lora_rank=4", "model.lora_dropout=0.5",
                   "loss.beta=0", "trainer.lr=1e-2", "rollout.max_new_tokens=4",
                   f"trainer.num_iterations={iterations}"])
    learner = Learner(cfg, CPU, pad_id=0)
    for _ in range(2):  # non-zero adapters, so dropout changes the policy's output
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], ADVANTAGES)
    plain = _plain(tiny_model_dir, dict(learner.named_weights()))  # what a correct push gives the engine
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
    with torch.no_grad():
        engine = sequence_logprobs(plain, batch, temperature=1.0)[0]
    engine_lists = [engine[i, : len(c)].tolist() for i, c in enumerate(COMPLETIONS)]
    (mb,) = learner._micro_batches(PROMPTS, COMPLETIONS, engine_lists)
    assert mb.old_logp is not None
    got = torch.zeros_like(engine)
    got[mb.rows] = torch.where(mb.packed.mask, mb.old_logp, 0.0)
    torch.testing.assert_close(got, torch.where(batch.mask, engine, 0.0), rtol=0, atol=1e-5)
    assert learner.policy.training  # the learner trains on in train mode
    stats = learner.update(PROMPTS, COMPLETIONS, engine_lists, ADVANTAGES)
    assert stats["rollout/logprob_diff_max"] < 1e-5
    if iterations == 1:
        assert stats["ratio_min"] == stats["ratio_max"] == 1.0  # the dropout sample over itself


def test_adapters_on_an_untied_embedding_and_output_layer_resume(phi3_dir: Path, tmp_path: Path) -> None:
    """Allowed when the two are untied (Phi-3 here): the resume compared the saved adapter's keys with peft's
    state dict, which adds the whole base embedding and output layer when either is adapted, and refused the
    run's own checkpoint ("holds adapters on embed_tokens, lm_head, qkv_proj, and ... puts them on embed_tokens,
    lm_head, qkv_proj, weight")."""
    cfg = compose([f"model.name_or_path={phi3_dir}", "model.lora_rank=4", "loss.beta=0", "trainer.lr=1e-2",
                   "model.lora_target_modules=[embed_tokens,lm_head,qkv_proj]"])
    learner = Learner(cfg, CPU, pad_id=0)
    for _ in range(2):
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], ADVANTAGES)
    learner.save_weights(tmp_path)
    fresh = Learner(cfg, CPU, pad_id=0)
    fresh.load_state_dict(learner.state_dict(), tmp_path)
    original = _plain(phi3_dir).state_dict()
    for (name, a), (_, b) in zip(fresh.named_weights(), learner.named_weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        if name.endswith(("embed_tokens.weight", "lm_head.weight", "qkv_proj.weight")):
            assert (a - original[name]).abs().max() > 1e-4, name  # each adapter trained, and came back


MOE = ["qwen2_moe", "qwen3_moe", "mixtral"]
ATTENTION = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
EXPERTS = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}  # transformers 5: fused 3-D parameters, not Linear
# What [all-linear] adapts in each layer: attention and every expert (Qwen2-MoE's shared one too), no router.
MOE_TARGETS = {
    "qwen2_moe": ATTENTION | EXPERTS | {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                        "mlp.shared_expert.down_proj"},
    "qwen3_moe": ATTENTION | EXPERTS,
    "mixtral": ATTENTION | EXPERTS,
}


@pytest.fixture(scope="module")
def moe_dirs(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """test_families' tiny Qwen2-MoE (with a gated shared expert), Qwen3-MoE and Mixtral (4 experts, top 2)."""
    from test_families import _build
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    dirs = {}
    for family in MOE:
        torch.manual_seed(0)
        dirs[family] = tmp_path_factory.mktemp(family)
        _build(family, tokenizer).save_pretrained(dirs[family])
        tokenizer.save_pretrained(dirs[family])
    return dirs


def _adapted_weights(learner: Learner) -> set[str]:
    """The layer-0 weights that carry an adapter, as 'self_attn.q_proj' or 'mlp.experts.down_proj'."""
    from peft.tuners.lora import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "model.layers.0."
    names = set()
    for name, module in learner.policy.named_modules():
        if isinstance(module, BaseTunerLayer) and name.startswith(prefix):
            name = name[len(prefix):].replace(".base_layer", "")
            names.add(f"{name}.{module.parameter_name}" if isinstance(module, ParamWrapper) else name)
    return names


@pytest.mark.parametrize("family", MOE)
def test_all_linear_on_a_mixture_of_experts_adapts_attention_and_experts_not_routers(moe_dirs: dict[str, Path],
                                                                                  family: str) -> None:
    """peft's own all-linear put adapters on Qwen2-MoE's shared_expert_gate but none on its experts, and on
    Qwen3-MoE's and Mixtral's routers (mlp.gate)."""
    learner = Learner(compose([f"model.name_or_path={moe_dirs[family]}", "model.lora_rank=4"]), CPU, pad_id=0)
    assert _adapted_weights(learner) == MOE_TARGETS[family]
    assert all(".lora_" in n for n, p in learner.policy.named_parameters() if p.requires_grad)


def test_lora_dropout_on_experts_is_one_line_saying_what_to_do(moe_dirs: dict[str, Path]) -> None:
    """peft's ParamWrapper (the experts' adapters) takes no dropout: the message used to blame
    model.lora_target_modules=['all-linear'] and suggest [all-linear]."""
    from grpo_cli.errors import UserError

    for family, layers in [("mixtral", "k_proj,o_proj,q_proj,v_proj"),
                           ("qwen2_moe", "k_proj,o_proj,q_proj,shared_expert.down_proj,shared_expert.gate_proj,shared_expert.up_proj,v_proj")]:
        cfg = compose([f"model.name_or_path={moe_dirs[family]}", "model.lora_rank=4", "model.lora_dropout=0.1"])
        with pytest.raises(UserError) as caught:
            Learner(cfg, CPU, pad_id=0)
        assert str(caught.value) == (
            "model.lora_dropout=0.1: peft cannot put dropout on the adapters of a mixture of experts' fused expert "
            "weights (experts.down_proj, experts.gate_up_proj); set model.lora_dropout=0, or adapt the other layers "
            f"only: model.lora_target_modules=[{layers}]")
        learner = Learner(compose([f"model.name_or_path={moe_dirs[family]}", "model.lora_rank=4",
                                   "model.lora_dropout=0.1", f"model.lora_target_modules=[{layers}]"]), CPU, pad_id=0)
        assert learner.dropout  # the advice works


@pytest.mark.parametrize("family", MOE)
def test_lora_on_experts_merges_saves_and_resumes(moe_dirs: dict[str, Path], family: str, tmp_path: Path) -> None:
    """[all-linear] on a mixture of experts. The merged weights are the policy: the experts' adapters (peft's ParamWrapper on the fused 3-D weights, nested: state-dict names like
    mlp.experts.base_layer.base_layer.gate_up_proj) used to come out under those wrapped names and unmerged,
    so a push or checkpoint held the base experts (Mixtral's log-probs 1.04 off the learner's)."""
    from transformers import AutoModelForCausalLM

    cfg = compose([f"model.name_or_path={moe_dirs[family]}", "model.lora_rank=4", "loss.beta=0.1",
                   "trainer.lr=1e-2"])
    learner = Learner(cfg, CPU, pad_id=0)
    for _ in range(2):
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], ADVANTAGES)
    merged = dict(learner.named_weights())
    original = _plain(moe_dirs[family]).state_dict()
    assert merged.keys() == original.keys()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert (merged[name] - original[name]).abs().max() > 1e-4, name  # the experts' adapters trained, and merged
    plain = _plain(moe_dirs[family], merged)
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
    learner.policy.eval()
    with torch.no_grad():
        got, _ = sequence_logprobs(plain, batch, temperature=1.0)
        want, _ = sequence_logprobs(learner.policy, batch, temperature=1.0)
        base, _ = sequence_logprobs(_plain(moe_dirs[family]), batch, temperature=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (want - base)[batch.mask].abs().max() > 1e-2  # the adapters changed the policy
    learner.policy.train()

    learner.save_weights(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    for name, tensor in merged.items():  # Mixtral's checkpoint names (w1/w2/w3) come back as its own
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    fresh = Learner(cfg, CPU, pad_id=0)
    fresh.load_state_dict(learner.state_dict(), tmp_path)
    for (name, a), (_, b) in zip(fresh.named_weights(), learner.named_weights(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", MOE)
def test_full_training_of_experts_saves_and_resumes(moe_dirs: dict[str, Path], family: str, tmp_path: Path) -> None:
    """Without LoRA. The checkpoint holds the experts under their checkpoint names (Mixtral's
    block_sparse_moe.experts.<i>.w1, Qwen-MoE's experts.<i>.gate_proj), which a resume has to stack back
    into the model's fused mlp.experts.gate_up_proj / down_proj: it stopped on a TrainingError
    ("does not match the model")."""
    from safetensors.torch import load_file

    cfg = compose([f"model.name_or_path={moe_dirs[family]}", "trainer.lr=1e-2"])
    learner = Learner(cfg, CPU, pad_id=0)
    learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], ADVANTAGES)
    learner.save_weights(tmp_path)
    assert load_file(tmp_path / "model.safetensors").keys() == load_file(moe_dirs[family] / "model.safetensors").keys()
    trained, original = dict(learner.named_weights()), _plain(moe_dirs[family]).state_dict()
    fresh = Learner(cfg, CPU, pad_id=0)
    fresh.load_state_dict(learner.state_dict(), tmp_path)
    restored = dict(fresh.named_weights())
    assert restored.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(restored[name], trained[name], rtol=0, atol=0, msg=name)
    # The step moved the experts, so the restored ones are the trained ones, not the initial ones; each expert
    # is random and distinct, so one stacked in another's slot would fail the exact comparison above.
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        assert (trained[name] - original[name]).abs().max() > 1e-3, name


def test_loading_adapters_on_other_layers_names_the_experts_once(moe_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The experts' nested adapters were named 'base_layer, experts' (their keys: experts.base_layer.lora_A...)."""
    from grpo_cli.learner import TrainingError

    base = [f"model.name_or_path={moe_dirs['mixtral']}", "model.lora_rank=4"]
    saved = Learner(compose(base), CPU, pad_id=0)
    saved.save_weights(tmp_path)
    fresh = Learner(compose([*base, "model.lora_target_modules=[q_proj,v_proj]"]), CPU, pad_id=0)
    with pytest.raises(TrainingError) as caught:
        fresh.load_state_dict(saved.state_dict(), tmp_path)
    assert str(caught.value).startswith(
        f"checkpoint {tmp_path} holds adapters on experts, k_proj, o_proj, q_proj, v_proj, and "
        "model.lora_target_modules=['q_proj', 'v_proj'] puts them on q_proj, v_proj; resume with the run's own.")


@pytest.mark.parametrize(("family", "targets"), [("mixtral", "[q_proj,v_proj,w1,w2,w3]"),
                                                 ("qwen3_moe", "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"),
                                                 ("qwen2_moe", "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")])
def test_a_list_with_the_checkpoints_expert_names_adapts_the_experts(moe_dirs: dict[str, Path], family: str,
                                                                    targets: str) -> None:
    """peft maps the experts' names in the checkpoint (transformers 4's: Mixtral's w1/w2/w3, Qwen3-MoE's
    gate/up/down_proj) onto the fused expert weights; grpo refused such a list, saying the model has no
    such layers ("this model has no w1, w2, w3 (only q_proj, v_proj would get adapters)"). peft has no such
    mapping for Qwen2-MoE: the list adapted its shared expert (the same names) and left the experts frozen."""
    cfg = compose([f"model.name_or_path={moe_dirs[family]}", "model.lora_rank=4", "loss.beta=0",
                   "trainer.lr=1e-2", f"model.lora_target_modules={targets}"])
    learner = Learner(cfg, CPU, pad_id=0)
    attention = {"self_attn.q_proj", "self_attn.v_proj"} if family == "mixtral" else ATTENTION
    assert _adapted_weights(learner) == (MOE_TARGETS[family] if family == "qwen2_moe" else attention | EXPERTS)
    for _ in range(2):
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], ADVANTAGES)
    plain = _plain(moe_dirs[family], dict(learner.named_weights()))
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
    learner.policy.eval()
    with torch.no_grad():
        got, _ = sequence_logprobs(plain, batch, temperature=1.0)
        want, _ = sequence_logprobs(learner.policy, batch, temperature=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lora_dropout_on_listed_experts_is_one_line(moe_dirs: dict[str, Path]) -> None:
    from grpo_cli.errors import UserError

    cfg = compose([f"model.name_or_path={moe_dirs['mixtral']}", "model.lora_rank=4", "model.lora_dropout=0.05",
                   "model.lora_target_modules=[q_proj,w1,w2,w3]"])
    with pytest.raises(UserError) as caught:
        Learner(cfg, CPU, pad_id=0)
    assert str(caught.value) == (
        "model.lora_dropout=0.05: peft cannot put dropout on the adapters of a mixture of experts' fused expert "
        "weights (experts.down_proj, experts.gate_up_proj); set model.lora_dropout=0, or leave the experts out of "
        "model.lora_target_modules=['q_proj', 'w1', 'w2', 'w3']")
