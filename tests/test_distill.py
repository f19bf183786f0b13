"""Phase 2 selection and distillation loss on hand-made batches."""
import dataclasses
import math

import pytest
import torch

import distill
import gigpo
from core import Step, Trajectory
from distill import DistillConfig
from gigpo import GiGPOConfig


def make_traj(group, index, rewards, anchors, skill=True):
    steps = [Step(prompt_ids=[1, 2, 3, 99], response_ids=[7, 8], logprobs=[-1.0, -2.0], text="",
                  action="a", valid=True, reward=r, done=False, won=False, anchor=a, obs=a,
                  plain_prompt_ids=[1, 2, 3] if skill else None)
             for r, a in zip(rewards, anchors)]
    return Trajectory(task_id=group.split("@")[0], task_type="pick_and_place_simple", group=group, index=index,
                      skill_id="s1" if skill else None, steps=steps, won=rewards[-1] > 0)


def test_utility_mask_hand_example():
    # paired plain group mean return = (10 + 0) / 2 = 5
    assert distill.utility_mask([10.0, 5.0, 0.0], [10.0, 0.0]) == [True, False, False]


def test_selection_masks_keep_only_utility_positive_and_positive_advantage():
    cfg = DistillConfig()
    masks = distill.selection_masks([10.0, 0.0], [0.0, 0.0], [[0.5, -0.2, 1.0], [2.0, 3.0]], cfg)
    assert masks == [[True, False, True], [False, False]]


def test_selection_ablations():
    adv = [[0.5, -0.2], [2.0, -1.0]]
    no_util = distill.selection_masks([10.0, 0.0], [5.0], adv, DistillConfig(utility_filter=False))
    assert no_util == [[True, False], [True, False]]
    no_sel = distill.selection_masks([10.0, 0.0], [5.0], adv,
                                     DistillConfig(utility_filter=False, advantage_filter=False))
    assert no_sel == [[True, True], [True, True]]


def test_distill_token_loss_hand_values():
    a = torch.tensor([2.0, 2.0])
    sampler = torch.log(torch.tensor([0.5, 0.5]))
    plain = torch.log(torch.tensor([0.25, 1.0]))
    loss = gigpo.distill_token_loss(plain, sampler, a, clip_eps=0.2)
    # token 1: log ρ = ln .5 -> -2 * (-0.6931) = 1.3863 ; token 2: log ρ = ln 2 > ln 1.2 -> -2 ln 1.2
    assert loss.tolist() == pytest.approx([2 * math.log(2), -2 * math.log(1.2)], abs=1e-5)


def test_distill_gradient_is_weighted_loglik_below_clip_and_zero_above():
    plain = torch.log(torch.tensor([0.01, 0.9])).requires_grad_(True)
    sampler = torch.log(torch.tensor([0.5, 0.5]))
    gigpo.distill_token_loss(plain, sampler, torch.tensor([3.0, 3.0]), 0.2).sum().backward()
    assert plain.grad.tolist() == pytest.approx([-3.0, 0.0])  # no vanishing at small ρ; stops once internalised


def test_distill_negative_advantage_is_clipped_below():
    """no_selection ablation: a negative-advantage token is pushed down only until ρ = 1 − ε."""
    sampler = torch.log(torch.tensor([0.5, 0.5]))
    plain = torch.log(torch.tensor([0.45, 0.1])).requires_grad_(True)
    a = torch.tensor([-2.0, -2.0])
    loss = gigpo.distill_token_loss(plain, sampler, a, clip_eps=0.2)
    # token 1: log ρ = ln .9 > ln .8 -> 2·ln .9 ; token 2: log ρ = ln .2 < ln .8 -> clipped: 2·ln .8
    assert loss.tolist() == pytest.approx([2 * math.log(0.9), 2 * math.log(0.8)], abs=1e-5)
    loss.sum().backward()
    assert plain.grad.tolist() == pytest.approx([2.0, 0.0])  # descent lowers token 1; token 2 has stopped


def test_advantage_reference_union_vs_guided():
    """The skill-guided steps' advantages inside the guided group, or over guided + plain (same seeds)."""
    gcfg = GiGPOConfig(gamma=1.0, omega=1.0, norm="none", invalid_penalty=0.0)
    skill = [make_traj("t1@0", 0, [0.0, 10.0], ["o0", "o1"]), make_traj("t1@0", 1, [0.0, 10.0], ["o0", "o2"])]
    plain = [make_traj("t1@0", 0, [0.0, 0.0], ["o0", "o3"], skill=False),
             make_traj("t1@0", 1, [0.0, 0.0], ["o0", "o3"], skill=False)]
    cfg = DistillConfig(utility_filter=False)
    # guided only: both win -> A^E = 0; o0: [10, 10] -> 0; o1, o2 alone -> 0: nothing is kept
    samples, m = distill.distill_samples(skill, plain, gcfg, dataclasses.replace(cfg, advantage_reference="guided"))
    assert samples == [] and m["distill/tokens_kept"] == 0
    # union: R = [10, 10, 0, 0], mean 5 -> A^E = +5; o0: [10, 10, 0, 0] -> +5; o1, o2 alone -> 0
    samples, m = distill.distill_samples(skill, plain, gcfg, cfg)
    assert [s.advantage for s in samples] == pytest.approx([10.0, 5.0, 10.0, 5.0]) and m["distill/tokens_kept"] == 8


def test_distill_samples_use_plain_prompt_and_selected_steps():
    gcfg = GiGPOConfig(gamma=1.0, omega=1.0, norm="none", invalid_penalty=0.0)
    skill = [make_traj("t1@0", 0, [0.0, 10.0], ["o0", "o1"]), make_traj("t1@0", 1, [0.0, 0.0], ["o0", "o2"])]
    plain = [make_traj("t1@0", 0, [0.0, 0.0], ["o0", "o3"], skill=False),
             make_traj("t1@0", 1, [0.0, 0.0], ["o0", "o3"], skill=False)]
    samples, m = distill.distill_samples(skill, plain, gcfg, DistillConfig())
    # only trajectory 0 beats the plain mean (0); its A^E = +5, both steps positive
    assert len(samples) == 2 and all(s.kind == "distill" for s in samples)
    assert all(s.prompt_ids == [1, 2, 3] for s in samples)  # the skill token 99 is gone
    assert all(s.advantage > 0 for s in samples)
    assert m["distill/tokens_offered"] == 8 and m["distill/tokens_kept"] == 4


def test_unpaired_group_is_a_clear_error():
    skill = [make_traj("t1@0", 0, [10.0], ["o"])]
    plain = [make_traj("t2@0", 0, [0.0], ["o"], skill=False)]
    with pytest.raises(ValueError, match="paired plain group"):
        distill.distill_samples(skill, plain, GiGPOConfig(), DistillConfig())
