"""GiGPO equations against hand-computed examples, and the degenerate cases."""
import math

import pytest
import torch

import gigpo
from core import Sample
from distill import DistillConfig
from gigpo import GiGPOConfig


def close(a, b, tol=1e-4):
    return all(abs(x - y) < tol for x, y in zip(a, b)) and len(a) == len(b)


# --- Eq. 3: episode-level relative advantage ---------------------------------------------

def test_episode_advantage_std():
    # mean 5, unbiased std sqrt(100/3) = 5.7735 -> ±0.8660
    a = gigpo.episode_advantages(torch.tensor([10.0, 0.0, 0.0, 10.0]), "std")
    assert close(a.tolist(), [0.8660, -0.8660, -0.8660, 0.8660])


def test_episode_advantage_no_norm():
    a = gigpo.episode_advantages(torch.tensor([10.0, 0.0, 0.0, 10.0]), "none")
    assert a.tolist() == [5.0, -5.0, -5.0, 5.0]


def test_episode_all_equal_is_zero():
    for norm in ("std", "none"):
        assert gigpo.episode_advantages(torch.tensor([3.0, 3.0, 3.0]), norm).tolist() == [0.0, 0.0, 0.0]


def test_episode_group_of_one_passes_raw_score():
    assert gigpo.episode_advantages(torch.tensor([7.0]), "std").tolist() == [7.0]


def test_episode_step_weighted_variant_with_std():
    # τ0 wins in 2 steps (R = 10), τ1 loses in 3 with one invalid step (R = -0.1). episode_stats
    # "step": rows 10,10,-0.1,-0.1,-0.1 -> mean 3.94, unbiased std sqrt(122.412/4) = 5.53199
    cfg = GiGPOConfig(episode_stats="step", norm="std", gamma=1.0, omega=0.0)
    adv, parts = gigpo.group_advantages([[0.0, 10.0], [0.0, 0.0, 0.0]], [[True, True], [True, False, True]],
                                        [["a", "b"], ["c", "d", "e"]], cfg)
    assert close(parts["episode"][0], [6.06 / 5.53199] * 2) and close(parts["episode"][1], [-4.04 / 5.53199] * 3)
    assert close(adv[0], [1.09545] * 2)  # ω = 0: A = A^E
    # episode_stats "trajectory" (Eq. 3): mean 4.95, std of [10, -0.1] = 7.14178 -> ±0.70711
    adv, parts = gigpo.group_advantages([[0.0, 10.0], [0.0, 0.0, 0.0]], [[True, True], [True, False, True]],
                                        [["a", "b"], ["c", "d", "e"]], GiGPOConfig(norm="std", gamma=1.0, omega=0.0))
    assert close(parts["episode"][0], [0.70711] * 2) and close(parts["episode"][1], [-0.70711] * 3)
    assert close([parts["episode"][0][0], parts["episode"][1][0]],
                 gigpo.episode_advantages(torch.tensor([10.0, -0.1]), "std").tolist())


def test_bad_norm_is_clear_error():
    with pytest.raises(ValueError, match="gigpo.norm"):
        gigpo.episode_advantages(torch.tensor([1.0, 2.0]), "zscore")


# --- Eq. 6: discounted step returns --------------------------------------------------------

def test_discounted_returns():
    assert gigpo.discounted_returns([0.0, 0.0, 10.0], 0.5) == [2.5, 5.0, 10.0]
    assert gigpo.discounted_returns([1.0, 1.0], 1.0) == [2.0, 1.0]
    assert gigpo.discounted_returns([], 0.9) == []


# --- Eq. 5, 7-8: anchor-state groups and the step-level advantage ------------------------------

def test_step_groups_include_repeated_visits():
    groups = gigpo.step_groups([["a", "b", "a"], ["a", "c"]])
    assert groups == {"a": [(0, 0), (0, 2), (1, 0)], "b": [(0, 1)], "c": [(1, 1)]}


def test_step_advantage_hand_example():
    # step group "a": returns [1, 3] -> mean 2, std sqrt(2) -> ∓0.7071; singletons -> 0
    adv = gigpo.step_advantages([[1.0, 2.0], [3.0, 4.0]], [["a", "b"], ["a", "c"]], "std")
    assert close(adv[0], [-0.7071, 0.0]) and close(adv[1], [0.7071, 0.0])
    adv = gigpo.step_advantages([[1.0, 2.0], [3.0, 4.0]], [["a", "b"], ["a", "c"]], "none")
    assert adv == [[-1.0, 0.0], [1.0, 0.0]]


def test_step_group_of_one_is_zero_and_equal_returns_zero():
    assert gigpo.step_advantages([[5.0]], [["x"]], "std") == [[0.0]]
    assert gigpo.step_advantages([[2.0], [2.0]], [["x"], ["x"]], "std") == [[0.0], [0.0]]


def test_repeated_visit_within_one_trajectory_forms_a_group():
    adv = gigpo.step_advantages([[1.0, 3.0]], [["a", "a"]], "none")
    assert adv == [[-1.0, 1.0]]


# --- Eq. 9 and the whole group, invalid penalty included ---------------------------------------

def test_group_advantages_full_hand_example():
    cfg = GiGPOConfig(gamma=0.5, omega=1.0, norm="none", invalid_penalty=0.1)
    rewards = [[0.0, 10.0], [0.0, 0.0, 0.0]]
    valid = [[True, True], [True, False, True]]
    anchors = [["s0", "s1"], ["s0", "x", "s1"]]
    adv, parts = gigpo.group_advantages(rewards, valid, anchors, cfg)
    # r = [[0, 10], [0, -0.1, 0]];  R = [10, -0.1];  A^E = [5.05, -5.05]
    assert close(parts["returns"], [10.0, -0.1])
    assert close(parts["episode"][0], [5.05, 5.05]) and close(parts["episode"][1], [-5.05] * 3)
    # discounted: [[5, 10], [-0.05, -0.1, 0]]
    assert close(parts["step_returns"][0], [5.0, 10.0]) and close(parts["step_returns"][1], [-0.05, -0.1, 0.0])
    # s0: [5, -0.05] -> ±2.525 ; s1: [10, 0] -> ±5 ; x alone -> 0
    assert close(adv[0], [7.575, 10.05])
    assert close(adv[1], [-7.575, -5.05, -10.05])


def test_row_penalty_mode_hand_example():
    """The public GiGPO code's form: returns from the environment's rewards, then c off the invalid
    row's own episode score and its own step return (not discounted into earlier steps)."""
    rewards = [[0.0, 10.0], [0.0, 0.0, 0.0]]
    valid = [[True, True], [True, False, True]]
    anchors = [["s0", "s1"], ["s0", "x", "s1"]]
    cfg = GiGPOConfig(gamma=0.5, omega=1.0, norm="none", invalid_penalty=0.1, invalid_penalty_mode="row")
    adv, parts = gigpo.group_advantages(rewards, valid, anchors, cfg)
    # R = [10, 0], mean 5; row scores [[10, 10], [0, -0.1, 0]] -> A^E [[5, 5], [-5, -5.1, -5]]
    assert close(parts["returns"], [10.0, 0.0])
    assert close(parts["episode"][0], [5.0, 5.0]) and close(parts["episode"][1], [-5.0, -5.1, -5.0])
    # step returns [[5, 10], [0, -0.1, 0]]: the first step of τ1 is not charged (reward mode: -0.05)
    assert close(parts["step_returns"][0], [5.0, 10.0]) and close(parts["step_returns"][1], [0.0, -0.1, 0.0])
    # s0: [5, 0] -> ±2.5; s1: [10, 0] -> ±5; x alone -> 0
    assert close(adv[0], [7.5, 10.0]) and close(adv[1], [-7.5, -5.1, -10.0])
    # episode_stats "step" (the public code's statistics): rows 10,10,0,-0.1,0 -> mean 3.98
    cfg_step = GiGPOConfig(gamma=0.5, omega=0.0, norm="none", invalid_penalty=0.1, invalid_penalty_mode="row",
                           episode_stats="step")
    adv, parts = gigpo.group_advantages(rewards, valid, anchors, cfg_step)
    assert close(parts["episode"][0], [6.02, 6.02]) and close(parts["episode"][1], [-3.98, -4.08, -3.98])


def test_bad_penalty_mode_is_clear_error():
    with pytest.raises(ValueError, match="invalid_penalty_mode"):
        GiGPOConfig(invalid_penalty_mode="episode")


def test_omega_weights_the_step_term():
    cfg = GiGPOConfig(gamma=1.0, omega=0.5, norm="none", invalid_penalty=0.0)
    adv, parts = gigpo.group_advantages([[1.0], [0.0]], [[True], [True]], [["a"], ["a"]], cfg)
    assert close(adv[0], [0.5 + 0.5 * 0.5]) and close(adv[1], [-0.5 - 0.5 * 0.5])


def test_compute_advantages_groups_by_group_key():
    class S:  # minimal stand-in for policy.Step: the fields compute_advantages reads
        def __init__(self, r, anchor):
            self.reward, self.valid, self.anchor = r, True, anchor

    class T:
        def __init__(self, group, rewards):
            self.group, self.steps = group, [S(r, "o") for r in rewards]

    cfg = GiGPOConfig(gamma=1.0, omega=0.0, norm="none")
    trajs = [T("g1", [10.0]), T("g2", [0.0]), T("g1", [0.0]), T("g2", [0.0])]
    adv = gigpo.compute_advantages(trajs, cfg)
    assert adv == [[5.0], [0.0], [-5.0], [0.0]]  # g1 compared only within g1


# --- losses -------------------------------------------------------------------------------

def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # k3 = exp(ln .5) - ln .5 - 1 = 0.5 + 0.6931 - 1
    assert abs(gigpo.kl_penalty(logp, ref, "k3").item() - 0.19315) < 1e-4
    assert abs(gigpo.kl_penalty(logp, ref, "k1").item() - math.log(2)) < 1e-6
    assert gigpo.kl_penalty(logp, logp, "k3").item() == 0.0


def test_k3_is_clamped_at_10():
    # log π_ref − log π_θ = 5: exp(5) − 5 − 1 = 142.41 -> 10 (verl's low_var_kl clamp); = 2: e² − 3 = 4.389 kept
    kl = gigpo.kl_penalty(torch.tensor([0.0, 0.0]), torch.tensor([5.0, 2.0]), "k3")
    assert close(kl.tolist(), [10.0, math.exp(2) - 3])


def test_ppo_clip_hand_values():
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5]))
    adv = torch.tensor([2.0, -2.0, 2.0])
    # ratio 1.5, A=2: -min(3, 2.4) = -2.4 ; A=-2: -min(-3, -2.4) = 3 ; ratio .5, A=2: -min(1, 1.6) = -1
    assert close(gigpo.ppo_clip_loss(logp, old, adv, 0.2).tolist(), [-2.4, 3.0, -1.0])


def test_dual_clip_hand_values():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([5.0, 2.0, 5.0, 0.5]))
    adv = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    # plain clip: ratio 5, A=-1 -> -min(-5, -1.2) = 5; ratio 2 -> 2; ratio 5, A=+1 -> -1.2; ratio .5, A=-1 -> .8
    assert close(gigpo.ppo_clip_loss(logp, old, adv, 0.2).tolist(), [5.0, 2.0, -1.2, 0.8])
    # dual clip c=3: the first loss is capped at -c·A = 3; the others are below the cap or have A > 0
    assert close(gigpo.ppo_clip_loss(logp, old, adv, 0.2, clip_ratio_c=3.0).tolist(), [3.0, 2.0, -1.2, 0.8])
    x = torch.log(torch.tensor([5.0, 2.0])).requires_grad_(True)
    gigpo.ppo_clip_loss(x, torch.zeros(2), torch.tensor([-1.0, -1.0]), 0.2, 3.0).sum().backward()
    assert close(x.grad.tolist(), [0.0, 2.0])  # capped: no gradient; below the cap: d(ρ)/d(log π) = ρ
    with pytest.raises(ValueError, match="clip_ratio_c"):
        GiGPOConfig(clip_ratio_c=0.5)


def test_loss_sign_raising_positive_advantage_token_lowers_loss():
    logp = torch.tensor([math.log(0.3)], requires_grad=True)
    loss = gigpo.ppo_clip_loss(logp, torch.tensor([math.log(0.3)]), torch.tensor([1.0]), 0.2).sum()
    loss.backward()
    assert logp.grad.item() < 0  # gradient descent raises log π of the positive-advantage token


def test_aggregate_modes():
    a, b = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([4.0])
    assert gigpo.aggregate([a, b], "token-mean", 4, 2).item() == pytest.approx(7 / 4)
    assert gigpo.aggregate([a, b], "seq-mean-token-mean", 4, 2).item() == pytest.approx((1 + 4) / 2)


def test_micro_batches_respect_the_budget_and_cut_padding():
    """`Policy.pack_rows` cuts the update's (and every scoring pass's) micro-batches: within the
    token budget, each row once, longest first; ragged lengths go into like-length batches, so
    that at most 1/8 of a scored tensor is padding (one tensor for all would be 29 % here)."""
    from decoder import Policy

    assert Policy.pack_rows([(10, 5)] * 7, 45) == [[0, 1, 2], [3, 4, 5], [6]]  # budget: 3 rows x 15 tokens
    lengths = [(300, 20), (600, 30), (310, 25), (590, 30), (295, 32)]  # (prompt, response) tokens
    cut = Policy.pack_rows(lengths, 100_000)
    assert cut == [[1, 3], [2, 0, 4]]
    real, padded = gigpo.padded_tokens(lengths, cut)
    real_one, padded_one = gigpo.padded_tokens(lengths, [[0, 1, 2, 3, 4]])
    assert real == real_one == sum(p + r for p, r in lengths)
    assert 1 - real / padded <= 0.125 < 0.29 < 1 - real_one / padded_one
    right = gigpo.padded_tokens(lengths, cut, right_padded=True)  # `Policy._score_batch`'s layout
    assert right[0] == real and real <= right[1] <= padded and right[1] == 2 * 630 + 3 * 335


def test_objective_hand_computed():
    """The whole loss on one pg sample and one distillation sample, by hand:
    pg (A = +1, β = 0.1, k3, c_ent = 0.01): token 1 ρ = 1 → −1, KL 0, H 1 → −1.01;
      token 2 ρ = 0.25/0.5 = 0.5: −min(0.5·1, clip(0.5, 0.8, 1.2)·1) = −0.5;
      KL = e^{ln 2} − ln 2 − 1 = 0.306853, H 2 → −0.5 + 0.0306853 − 0.02 = −0.4893147;
      token-mean over 2 pg tokens: −0.74965735.
    distill (A = +2, λ = 0.5, ε = 0.2): log ρ = ln(0.2/0.4) = −0.693147 < ln 1.2 → −2·(−0.693147)
      = 1.386294; λ· mean over 1 token = 0.693147.   L = −0.05651017."""
    ln = math.log
    samples = [Sample([1], [2, 3], [ln(0.5), ln(0.5)], 1.0), Sample([1], [4], [ln(0.4)], 2.0, "distill")]
    logps = [torch.tensor([ln(0.5), ln(0.25)], requires_grad=True), torch.tensor([ln(0.2)], requires_grad=True)]
    ents = [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]
    old = [torch.tensor(s.old_logprobs) for s in samples]
    ref = [torch.tensor([ln(0.5), ln(0.5)]), None]
    cfg = GiGPOConfig(clip_eps=0.2, clip_ratio_c=3.0, beta_kl=0.1, kl_estimator="k3", entropy_coef=0.01)
    totals = {"pg_tokens": 2, "pg_seqs": 1, "distill_tokens": 1, "distill_seqs": 1}
    loss, terms = gigpo.objective(samples, logps, ents, old, ref, totals, cfg, DistillConfig(lam=0.5, clip_eps=0.2))
    assert loss.item() == pytest.approx(-0.05651017, abs=1e-6)
    assert terms["kl"] == pytest.approx(0.306853, abs=1e-6) and terms["distill_loss"] == pytest.approx(1.386294, abs=1e-6)
    loss.backward()  # the distilled token's log-prob is pushed up: d L / d log π = −λ·A / 1 = −1
    assert logps[1].grad.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="distill=DistillConfig"):
        gigpo.objective(samples, logps, ents, old, ref, totals, cfg, None)
    with pytest.raises(ValueError, match="kind 'sft'"):  # a cold-start row is not an RL sample
        gigpo.objective([Sample([1], [2], [0.0], 1.0, "sft")], logps[1:], ents[1:], old[1:], [None], totals, cfg)
