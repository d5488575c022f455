"""The collapse measure and alarm: exact values on constructed states, and the alarm's patience."""

import itertools

import torch

from calm_dist.ops.collapse import mean_pairwise_cosine
from calm_dist.training.collapse_alarm import CollapseAlarm


def _brute_force(states):
    pairs = [torch.nn.functional.cosine_similarity(states[i], states[j], dim=0).item()
             for i, j in itertools.permutations(range(len(states)), 2)]
    return sum(pairs) / len(pairs)


def test_mean_pairwise_cosine_equals_the_pairwise_average():
    states = torch.randn(37, 16, generator=torch.Generator().manual_seed(0)) + 0.3
    assert abs(mean_pairwise_cosine(states) - _brute_force(states)) < 1e-6


def test_mean_pairwise_cosine_limits():
    direction = torch.randn(64)
    assert abs(mean_pairwise_cosine(direction.repeat(10, 1) * torch.rand(10, 1)) - 1.0) < 1e-6  # one direction
    assert abs(mean_pairwise_cosine(torch.eye(8))) < 1e-7  # orthogonal states
    assert abs(mean_pairwise_cosine(torch.cat([torch.eye(4), -torch.eye(4)])) - (-1 / 7)) < 1e-6


def test_alarm_fires_only_when_a_signal_persists():
    alarm = CollapseAlarm(patience_logs=3, patience_evals=2)
    assert alarm.on_train(10, {"cos": 0.99}) is None
    assert alarm.on_train(20, {"cos": 0.50}) is None  # the streak is broken
    assert alarm.on_train(30, {"cos": 0.99}) is None
    assert alarm.on_train(40, {"cos": 0.97}) is None
    message = alarm.on_train(50, {"cos": 0.999})
    assert message and "step 50" in message and "0.999" in message
    assert alarm.on_train(60, {"cos": 0.999}) is None  # once per episode
    assert alarm.on_train(70, {"loss": 1.0}) is None  # other stages log no cos

    alarm = CollapseAlarm(patience_evals=3, grace_steps=150)
    assert alarm.on_eval(100, {"loss": 17.5, "uncond": 17.2}) is None  # in the grace period: not counted
    assert alarm.on_eval(150, {"loss": 17.5, "uncond": 17.2}) is None
    assert alarm.on_eval(200, {"loss": 17.3, "uncond": 17.2}) is None  # 1st
    assert alarm.on_eval(300, {"loss": 16.0, "uncond": 17.2}) is None  # 7% below: learning, streak broken
    assert alarm.on_eval(400, {"loss": 17.15, "uncond": 17.2}) is None  # 0.3% below: at the level (1st)
    assert alarm.on_eval(500, {"loss": 17.2, "uncond": 17.2}) is None  # 2nd
    message = alarm.on_eval(600, {"loss": 17.3, "uncond": 17.2})  # 3rd
    assert message and "unconditional level" in message and "step 600" in message
    assert alarm.on_eval(700, {"loss": 17.3, "uncond": 17.2}) is None  # once per episode


def test_fewer_than_two_states_have_no_pair():
    from calm_dist.ops.collapse import pairwise_cosine_tensor

    assert float(pairwise_cosine_tensor(torch.randn(1, 8))) == 0.0  # finite: a 3d step is never skipped for it
