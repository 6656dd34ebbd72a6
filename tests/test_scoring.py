"""Scores and budgets on synthetic statistics with known answers."""

import pytest
import torch

from compressor.calibration import StateStatistics
from compressor.errors import CompressorError
from compressor.budgets import plan_by_budget
from compressor.scoring import score_heads


def statistics(ranks, norms, others=None):
    """Two layers (indices 0 and 2) of 4 heads with 8 × 8 states, constant over two time steps; ``others`` maps
    further metric names to [layer, head] values."""
    values = {"threshold_rank": ranks, "nuclear_norm": norms, **(others or {})}
    mean = {name: torch.tensor(v, dtype=torch.float32)[None].expand(2, -1, -1) for name, v in values.items()}
    return StateStatistics(
        mean=mean, std={}, times=torch.tensor([64, 128]), layers=[0, 2], heads=[4, 4], state_shapes=[(8, 8), (8, 8)],
    )


STATS = statistics(
    ranks=[[8, 4, 2, 0], [6, 6, 1, 1]], norms=[[1, 4, 2, 0], [8, 1, 2, 4]],
    others={"stable_rank": [[2, 1, 4, 8], [1, 2, 3, 4]], "entropy_rank": [[4, 4, 8, 2], [0, 2, 6, 8]],
            "frobenius_norm": [[1, 2, 3, 4], [5, 6, 7, 10]]},
)


def test_joint_score_is_the_papers_equation_14():
    scores = score_heads(STATS, "joint", alpha=0.25)
    expected_layer0 = 0.25 * torch.tensor([8, 4, 2, 0]) / 8 + 0.75 * torch.tensor([1, 4, 2, 0]) / 8
    assert torch.allclose(scores[0], expected_layer0)
    assert torch.allclose(score_heads(STATS, "rank")[2], torch.tensor([6, 6, 1, 1]) / 8)
    assert torch.allclose(score_heads(STATS, "norm")[2], torch.tensor([8, 1, 2, 4]) / 8)


@pytest.mark.parametrize("method, layer, expected", [
    ("stable_rank", 0, [2 / 8, 1 / 8, 4 / 8, 8 / 8]),  # ranks over d = min(d_k, d_v) = 8
    ("entropy_rank", 2, [0, 2 / 8, 6 / 8, 8 / 8]),
    ("frobenius", 0, [0.1, 0.2, 0.3, 0.4]),  # norms over the model's largest head (10, in layer 2)
])
def test_every_metric_has_its_own_score(method, layer, expected):
    assert torch.allclose(score_heads(STATS, method)[layer], torch.tensor(expected))


def test_metrics_are_averaged_over_time():
    stats = statistics(ranks=[[8, 4, 2, 0], [6, 6, 1, 1]], norms=[[1, 4, 2, 0], [8, 1, 2, 4]])
    stats.mean["threshold_rank"] = torch.stack([stats.mean["threshold_rank"][0], torch.zeros(2, 4)])
    assert torch.allclose(score_heads(stats, "rank")[0], torch.tensor([4, 2, 1, 0]) / 8)


def test_unknown_methods_are_refused():
    with pytest.raises(CompressorError, match="unknown method 'svd'"):
        score_heads(STATS, "svd")


def test_random_scores_depend_on_the_seed_only():
    assert torch.equal(score_heads(STATS, "random", seed=3)[0], score_heads(STATS, "random", seed=3)[0])
    assert not torch.equal(score_heads(STATS, "random", seed=3)[0], score_heads(STATS, "random", seed=4)[0])


def test_budget_removes_from_the_chosen_end_until_reached():
    scores = score_heads(STATS, "rank")
    head_bytes = {0: 128, 2: 128}
    high = plan_by_budget(scores, head_bytes, 0.25, remove="high")
    assert high.removed_by_rule == [(0, 0), (2, 0)]  # rank 8, then the first of the tied 6s
    assert high.kept == {0: [1, 2, 3], 2: [1, 2, 3]}
    low = plan_by_budget(scores, head_bytes, 0.3, remove="low")  # 0.3 × 8 heads = 2.4 -> 3 heads
    assert low.removed_by_rule == [(0, 3), (2, 2), (2, 3)]


def test_minimum_heads_per_layer_is_honoured_and_impossible_budgets_refused():
    scores = {0: torch.tensor([9.0, 8.0, 7.0, 6.0]), 2: torch.tensor([0.0, 0.0, 0.0, 0.0])}
    plan = plan_by_budget(scores, {0: 1, 2: 1}, 0.5, remove="high", min_heads_per_layer=2)
    assert plan.kept[0] == [2, 3] and len(plan.kept[2]) == 2
    with pytest.raises(CompressorError, match="at most 50.0% is possible"):
        plan_by_budget(scores, {0: 1, 2: 1}, 0.6, remove="high", min_heads_per_layer=2)
    with pytest.raises(CompressorError, match="strictly between 0 and 1"):
        plan_by_budget(scores, {0: 1, 2: 1}, 1.0)
