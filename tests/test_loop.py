"""The loop's pure pieces: the data stream and which completions a step trains on."""

from __future__ import annotations

import pytest
import torch

from grpo_cli.config import compose
from grpo_cli.loop import Round, epoch_note, prompt_indices, resume_position, training_rows
from grpo_cli.rollout import Sample


def _stream(steps: int, count: int, fits: list[bool], seed: int = 3, position: int = 0) -> tuple[list[list[int]], int]:
    """`steps` batches of the data stream from `position`, one prompt_indices call each, as the loop takes them."""
    batches = []
    for _ in range(steps):
        batch, position = prompt_indices(position, count, fits, seed)
        batches.append(batch)
    return batches, position


def test_prompt_indices_are_one_stream_across_calls_and_epochs() -> None:
    whole, end = _stream(6, 2, [True] * 4)
    assert end == 12  # three epochs of 4 rows, two batches each
    resumed = _stream(4, 2, [True] * 4, position=_stream(2, 2, [True] * 4)[1])[0]
    assert whole[:2] + resumed == whole  # a resume at the saved position sees the same data
    for epoch in range(3):  # each epoch is a permutation of the rows
        assert sorted(whole[2 * epoch] + whole[2 * epoch + 1]) == [0, 1, 2, 3]
    # 50 rows: two different shuffles coinciding by chance is out of the question.
    two_epochs = sum(_stream(2, 50, [True] * 50)[0], [])
    assert two_epochs[:50] != two_epochs[50:]  # each epoch reshuffles
    assert _stream(1, 50, [True] * 50, seed=4)[0][0] != two_epochs[:50]  # the seed changes the order


def test_any_64_bit_seed_shuffles_and_the_seeds_that_worked_keep_their_order() -> None:
    """seed * 7919 + epoch went straight to torch.Generator.manual_seed, which takes 64-bit seeds:
    seed=10**16 (or a `date +%s%N`) stopped the first step with 'Overflow when unpacking long long'."""
    big = 10**16
    (batch,), _ = _stream(1, 4, [True] * 4, seed=big)
    # (10**16 * 7919) mod 2**64 = 79190000000000000000 - 4 * 18446744073709551616 = 5403023705161793536
    assert (big * 7919) % (1 << 64) == 5403023705161793536
    assert batch == torch.randperm(4, generator=torch.Generator().manual_seed(5403023705161793536)).tolist()
    # A negative seed, which torch read as its 64-bit two's complement before: the same order as then.
    (batch,), _ = _stream(1, 10, [True] * 10, seed=-1)
    assert batch == torch.randperm(10, generator=torch.Generator().manual_seed(-7919)).tolist()


def test_a_batch_never_straddles_two_epochs_so_never_holds_a_row_twice() -> None:
    # 10 rows in batches of 4: each epoch gives two batches, and its last 2 rows are skipped.
    batches, end = _stream(6, 4, [True] * 10)
    assert end == 28  # 2 epochs of 10, then 8 rows into the third
    for b in batches:
        assert len(set(b)) == 4
    for epoch in range(3):
        seen = batches[2 * epoch] + batches[2 * epoch + 1]
        assert len(set(seen)) == 8  # two whole batches of distinct rows per epoch
    # The stream as one shuffle per epoch: epoch 1's batches are its order's first 8 rows.
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 7919 + 1)).tolist()
    assert batches[2] + batches[3] == order[:8]


def test_rows_that_do_not_fit_are_passed_over_without_reordering_the_others() -> None:
    fits = [True] * 12
    full = sum(_stream(4, 3, fits)[0], [])  # epoch 0: all 12 rows in 4 batches
    short = list(fits)
    short[full[4]] = False  # leave out the 5th row of the stream
    batches, end = _stream(3, 3, short)
    assert sum(batches, []) == full[:4] + full[5:10]  # the same order, that row skipped
    assert end == 10  # right after the last row taken
    # The 2 usable rows left in epoch 0 are too few for a batch: the next one is epoch 1's first 3.
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3 * 7919 + 1)).tolist()
    ahead = [i for i in order if short[i]][:3]
    assert _stream(1, 3, short, position=end)[0] == [ahead]


def test_a_batch_larger_than_the_usable_rows_runs_across_epochs() -> None:
    (batch,), end = _stream(1, 5, [True, False, True])  # 2 usable rows for 5 places: repeats are unavoidable
    assert sorted(set(batch)) == [0, 2]
    assert len(batch) == 5
    third = torch.randperm(3, generator=torch.Generator().manual_seed(3 * 7919 + 2)).tolist()
    assert batch[4] == next(i for i in third if i != 1)  # two whole epochs, then the third's first usable row
    assert end == 6 + [i != 1 for i in third].index(True) + 1  # and just past it


def _state(step: int, position: int, rows: int = 8, sha256: str = "a", seed: int = 3) -> dict:
    """A checkpoint's trainer state as resume_position reads it."""
    return {"step": step, "data_position": position, "data": {"rows": rows, "sha256": sha256, "seed": seed}}


def test_a_resume_with_the_same_data_goes_on_at_the_saved_position() -> None:
    assert resume_position(_state(2, 4), {"rows": 8, "sha256": "a", "seed": 3}) == (4, None)
    # A checkpoint from before the data was saved with its position: as it always resumed.
    assert resume_position({"step": 2, "data_position": 4}, {"rows": 12, "sha256": "b", "seed": 3}) == (4, None)


def test_a_resume_with_other_data_starts_the_next_pass_over_it() -> None:
    """Position 4 of 8 rows read against 12 rows was 4 rows into another shuffle of them: the rest of
    that pass (8 rows) repeated some prompts already drawn and never reached others."""
    new = {"rows": 12, "sha256": "b", "seed": 3}
    assert resume_position(_state(2, 4), new) == (
        12, "data: the training data changed since step 2 (8 -> 12 rows): starting a new pass over it at step 3")
    # Passes 0 and 1 over the old data taken, pass 2 begun (18 = 2 * 8 + 2): the new data's pass 3, at 3 * 12.
    assert resume_position(_state(9, 18), new)[0] == 36
    # Pass 1 finished and pass 2 not begun (16 = 2 * 8): the new data's pass 2, at 2 * 12.
    assert resume_position(_state(8, 16), new)[0] == 24
    # Fewer rows: 8 -> 3, position 4 -> pass 1 of the 3 rows, at 3.
    assert resume_position(_state(2, 4), {"rows": 3, "sha256": "c", "seed": 3}) == (
        3, "data: the training data changed since step 2 (8 -> 3 rows): starting a new pass over it at step 3")
    assert resume_position(_state(2, 4), {"rows": 8, "sha256": "b", "seed": 3}) == (
        8, "data: the training data changed since step 2 (8 rows, with other problems or answers): starting a new "
           "pass over it at step 3")
    assert resume_position(_state(2, 4), {"rows": 8, "sha256": "a", "seed": 5}) == (
        8, "data: the training data's order changed since step 2 (seed 3 -> 5, which shuffles it): starting a new "
           "pass over it at step 3")
    assert resume_position(_state(2, 4), {"rows": 12, "sha256": "b", "seed": 5})[1] == (
        "data: the training data changed since step 2 (8 -> 12 rows; seed 3 -> 5, which shuffles it): starting a "
        "new pass over it at step 3")


def test_after_a_data_change_every_new_row_comes_once_in_the_next_pass() -> None:
    position, _ = resume_position(_state(2, 4), {"rows": 12, "sha256": "b", "seed": 3})
    batches, end = _stream(6, 2, [True] * 12, position=position)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(3 * 7919 + 1)).tolist()  # pass 1's shuffle
    assert sum(batches, []) == order and end == 24


def test_the_epoch_note_counts_whole_steps_per_epoch() -> None:
    cfg = compose(["trainer.prompts_per_step=4", "trainer.max_steps=60"])
    assert epoch_note(2000, cfg) == "data: 2000 prompts, 4 per step: an epoch is 500 steps; trainer.max_steps=60 is 0.12 epochs"
    assert epoch_note(10, cfg) == "data: 10 prompts, 4 per step: an epoch is 2 steps; trainer.max_steps=60 is 30 epochs"
    one = compose(["trainer.prompts_per_step=1", "trainer.max_steps=1"])
    assert epoch_note(1, one) == "data: 1 prompt, 1 per step: an epoch is 1 step; trainer.max_steps=1 is 1 epoch"
    assert epoch_note(3, cfg) == ("data: 3 prompts, fewer than the 4 a step takes (trainer.prompts_per_step): every "
                                  "step repeats some of them")
    dynamic = compose(["trainer.prompts_per_step=4", "trainer.dynamic_sampling=true"])
    assert epoch_note(10, dynamic) == ("data: 10 prompts, 4 per round: an epoch is at most 2 steps, fewer as dynamic "
                                       "sampling adds rounds")


def _round(tag: str, advantages: list[float], truncated: list[bool], group_size: int = 2) -> Round:
    samples = [Sample(prompt_index=i // group_size, prompt_ids=[1], completion_ids=[2], text=f"{tag}{i}",
                      logprobs=[0.0], truncated=t) for i, t in enumerate(truncated)]
    adv = torch.tensor(advantages)
    return Round(rows=[{}] * (len(advantages) // group_size), samples=samples, completions=[], scores=None,
                 advantages=adv, informative=(adv.view(-1, group_size) != 0).any(1))


def _picked(rounds: list[Round], *overrides: str) -> tuple[list[str], list[float]]:
    cfg = compose(["rollout.group_size=2", "trainer.prompts_per_step=2", *overrides])
    rows = training_rows(rounds, cfg)
    return [s.text for s in rows.samples], rows.advantages.tolist()


def test_without_filters_every_completion_of_the_round_trains() -> None:
    r = _round("a", [0.0, 0.0, 1.0, -1.0], [False, True, False, False])
    assert _picked([r]) == (["a0", "a1", "a2", "a3"], [0.0, 0.0, 1.0, -1.0])


def test_mask_truncated_drops_truncated_completions_and_keeps_the_others_advantages() -> None:
    r = _round("a", [0.5, -0.5, 1.0, -1.0], [False, True, True, False])
    assert _picked([r], "trainer.mask_truncated=true") == (["a0", "a3"], [0.5, -1.0])


def test_dynamic_sampling_keeps_informative_groups_up_to_prompts_per_step() -> None:
    first = _round("a", [0.0, 0.0, 1.0, -1.0], [False] * 4)   # group 0 flat, group 1 informative
    second = _round("b", [2.0, -2.0, 3.0, -3.0], [False] * 4)  # both informative; only one is needed
    assert _picked([first, second], "trainer.dynamic_sampling=true") == (["a2", "a3", "b0", "b1"],
                                                                        [1.0, -1.0, 2.0, -2.0])


def test_dynamic_sampling_with_no_informative_group_falls_back_to_the_first_round() -> None:
    first = _round("a", [0.0] * 4, [False] * 4)
    second = _round("b", [0.0] * 4, [False] * 4)
    assert _picked([first, second], "trainer.dynamic_sampling=true") == (["a0", "a1", "a2", "a3"], [0.0] * 4)


@pytest.mark.parametrize("flags", [(), ("trainer.dynamic_sampling=true",)])
def test_every_completion_truncated_leaves_nothing_to_train(flags: tuple[str, ...]) -> None:
    r = _round("a", [1.0, -1.0, 0.5, -0.5], [True] * 4)
    assert _picked([r], "trainer.mask_truncated=true", *flags) == ([], [])


def test_batch_scale_uses_the_std_of_every_ranks_rewards(monkeypatch) -> None:
    """loss.adv_scale=batch with two learner processes: each divides by the std of all 8 rewards
    (rank 0's 1,0,0,1 and rank 1's 0,0,0,1: 0.5175491695067657, worked out in test_loss.py), as
    one process sampling both halves would, not by its own half's."""
    from grpo_cli import distributed, loop
    from grpo_cli.loss import group_advantages

    other = [0.0, 0.0, 0.0, 1.0]  # rank 1's rewards: count, sum and sum of squares added by all_reduce
    monkeypatch.setattr(distributed, "all_reduce",
                        lambda values, op="sum": [values[0] + 4, values[1] + sum(other), values[2] + sum(other)])
    mine = torch.tensor([1.0, 0.0, 0.0, 1.0])
    std = loop._std_over_ranks(mine)
    assert std == pytest.approx(0.5175491695067657, rel=1e-12)
    b5 = 0.9659051524730883  # 0.5 / (std + 1e-4), as in test_loss.py's batch case
    got = group_advantages(mine, 4, scale="batch", batch_std=std)
    torch.testing.assert_close(got, torch.tensor([b5, -b5, -b5, b5]))
    assert not torch.allclose(group_advantages(mine, 4, scale="batch"), got)  # its own half's std: 0.577


class _FixedEngine:
    """An engine whose G samples per prompt are fixed; the rewards below do not read them."""

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size

    def wake(self) -> None: ...

    def sleep(self) -> None: ...

    def generate(self, prompts: list[str], sampling) -> list[Sample]:
        return [Sample(prompt_index=p, prompt_ids=[1], completion_ids=[2], text=f"p{p}s{j}", logprobs=[0.0],
                       truncated=False) for p in range(len(prompts)) for j in range(self.group_size)]


class _FixedRewards:
    """Totals [1, 0, 0, 1 | 0, 0, 0, 1] with row 6 flagged (its reference answer cannot be checked)."""

    def score_samples(self, samples, rows, prefill=""):
        from grpo_cli.rewards.base import RewardScores

        total = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        invalid = [False] * 6 + [True, False]
        return [s.text for s in samples], RewardScores(total=total, per_reward={"r": total}, errors={"r": 0},
                                                       first_error={}, invalid=invalid)


# Group 0 [1, 0, 0, 1]: mean 0.5, ddof=1 std sqrt(1/3) = 0.5773502691896257.
# Group 1 [0, 0, 0, 1]: mean 0.25, ddof=1 std 0.5 (worked out in test_loss.py).
# adv_eps 0.5: group 0: 0.5 / (0.5773502691896257 + 0.5) = 0.4641016151377546;
#              group 1: -0.25 / (0.5 + 0.5) = -0.25, 0.75 / 1.0 = 0.75.
# Row 6 (flagged invalid) gets 0 whatever its group gives it (-0.25 here).
G0 = 0.4641016151377546


@pytest.mark.parametrize(("overrides", "expected"), [
    (("loss.adv_scale=group", "loss.adv_eps=0.5"), [G0, -G0, -G0, G0, -0.25, -0.25, 0.0, 0.75]),
    (("loss.adv_scale=none",), [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, 0.0, 0.75]),
])
def test_collect_turns_rewards_into_advantages_as_configured(overrides: tuple[str, ...],
                                                             expected: list[float]) -> None:
    from grpo_cli import loop

    cfg = compose(["rollout.group_size=4", *overrides])
    r = loop.collect(cfg, _FixedEngine(4), _FixedRewards(), [{"prompt": "a"}, {"prompt": "b"}], seed=0,
                     timer=loop._Timer())
    torch.testing.assert_close(r.advantages, torch.tensor(expected), rtol=0, atol=1e-6)
    assert r.informative.tolist() == [True, True]


def test_groups_counts_each_group_that_keeps_a_completion_once() -> None:
    """`groups/trained`: under mask_truncated a group that keeps 1 of its 2 completions is one group trained
    (was: kept completions / group_size, 1.5 here)."""
    r = _round("a", [0.5, -0.5, 1.0, -1.0], [False, True, False, False])
    cfg = compose(["rollout.group_size=2", "trainer.prompts_per_step=2", "trainer.mask_truncated=true"])
    assert training_rows([r], cfg).groups == 2
    assert training_rows([_round("a", [0.5, -0.5, 1.0, -1.0], [True, True, False, True])], cfg).groups == 1


class _PresetRewards:
    """Each call scores its round with the next list of totals."""

    def __init__(self, *totals: list[float]) -> None:
        self.totals = list(totals)

    def score_samples(self, samples, rows, prefill=""):
        from grpo_cli.rewards.base import RewardScores

        total = self.totals.pop(0)
        return [s.text for s in samples], RewardScores(total=total, per_reward={"r": total}, errors={"r": 0},
                                                       first_error={}, invalid=[False] * len(total))


def test_dynamic_sampling_keeps_each_groups_advantages_from_its_own_round_under_batch_scale() -> None:
    """loss.adv_scale=batch with trainer.dynamic_sampling: a kept group is divided by the std of its own
    round's rewards, dropped groups included, so dropping a flat group does not change the others.
    Round 1 [1, 1 | 0, 1]: ddof=1 std 0.5 (mean 0.75, squares 3 * 0.0625 + 0.5625 = 0.75, / 3);
    group 1: -+0.5 / (0.5 + 1e-4) = -+0.9998000399920016.
    Round 2 [0, 0 | 0, 2]: ddof=1 std 1 (mean 0.5, squares 3 * 0.25 + 2.25 = 3, / 3);
    group 1: -+1 / (1 + 1e-4) = -+0.9999000099990001. Over the kept groups alone the stds would be 0.707 and 1.414."""
    from grpo_cli import loop

    cfg = compose(["rollout.group_size=2", "trainer.prompts_per_step=2", "trainer.dynamic_sampling=true",
                   "loss.adv_scale=batch"])
    rewards = _PresetRewards([1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0])
    rounds = [loop.collect(cfg, _FixedEngine(2), rewards, [{"prompt": "a"}, {"prompt": "b"}], seed=k,
                           timer=loop._Timer()) for k in range(2)]
    assert [r.informative.tolist() for r in rounds] == [[False, True], [False, True]]
    rows = training_rows(rounds, cfg)
    assert [s.text for s in rows.samples] == ["p1s0", "p1s1", "p1s0", "p1s1"] and rows.groups == 2
    a, b = 0.9998000399920016, 0.9999000099990001
    torch.testing.assert_close(rows.advantages, torch.tensor([-a, a, -b, b]), rtol=0, atol=1e-7)
