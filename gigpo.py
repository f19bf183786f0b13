"""GiGPO: Group-in-Group Policy Optimization (Feng et al., 2025, arXiv 2505.10978).

SIRI's Phase 0 (warmup) trains the agent with GiGPO, and Phase 2 adds its distillation
term on top of the same loss. This module holds:

* the advantage equations, each one pure function on plain lists / tensors
  (GiGPO Eq. 3 episode term, Eq. 6-8 step term, Eq. 9 joint advantage);
* the per-token losses: PPO-clip (GiGPO Eq. 10), the KL penalty, SIRI's distillation term;
* ``objective``: SIRI's whole loss, L = L_PPO-clip + β·KL (− c·H) + λ·L_distill, on one screen;
* ``update``: the plumbing around it, one optimisation pass over a batch of `core.Sample`s.

A *group* is G trajectories of the same task from the same initial state. A *step group*
is every step of one group (all G trajectories, repeated visits included) whose anchor
state, the current observation, is identical.
"""
from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

import distributed
from core import Sample


@dataclass
class GiGPOConfig:
    """GiGPO hyper-parameters. Values from the GiGPO paper / its ALFWorld script unless noted."""

    group_size: int = 8
    """G: rollouts per task (one group). GiGPO ALFWorld: 8."""
    gamma: float = 0.95
    """γ: discount of the step-level returns R_t. GiGPO ALFWorld: 0.95."""
    omega: float = 1.0
    """ω: weight of the step-level advantage A^S in A = A^E + ω·A^S. GiGPO: 1."""
    norm: str = "std"
    """F_norm of both relative advantages: "std" (group std + eps) or "none" (1). GiGPO: std."""
    episode_stats: str = "trajectory"
    """Group statistics of A^E over "trajectory" (paper Eq. 3: one value per rollout) or
    "step" (the public GiGPO code: every step row carries its episode return, so long
    episodes weigh more in the mean/std). Our default follows the paper."""
    eps: float = 1e-6
    """Added to the std in the normalisation."""
    invalid_penalty: float = 0.1
    """c: the invalid-action penalty coefficient (GiGPO's ALFWorld script: 0.1)."""
    invalid_penalty_mode: str = "reward"
    """Where the penalty enters (`step_rewards` / `group_advantages`). "reward" (ours): it is a
    reward, r_t − c, so it lowers R(τ) once per invalid step and is discounted into the step returns
    of earlier steps. "row" (the public GiGPO code, verl-agent's `apply_invalid_action_penalty`):
    after the returns are computed, c is subtracted from the invalid step's own row only, from its
    copy of the episode score and from its own step return. Our default is "reward" because then
    the penalty is part of the MDP the equations are written for (one R(τ) per trajectory, as
    Eq. 3 reads), and the steps that led into an invalid action share its blame."""
    clip_eps: float = 0.2
    """ε of the PPO clip (GiGPO: 0.2)."""
    clip_ratio_c: float = 3.0
    """c of dual-clip PPO (Ye et al., 2020): the loss of a negative-advantage token is capped at
    −c·A, so a token whose ratio has grown far above 1 cannot dominate the batch. 0 = off.
    The public GiGPO code: 3.0 (verl's `clip_ratio_c`), which we follow."""
    beta_kl: float = 0.01
    """β: KL coefficient to the reference policy (base model = adapter disabled). GiGPO: 0.01."""
    kl_estimator: str = "k3"
    """KL estimator per token: "k3" (Schulman's low-variance exp(r)-r-1, GiGPO's 'low_var_kl') or "k1" (log-ratio)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient. The public GiGPO code uses verl's default 0.001 (its ALFWorld
    script does not override it); our choice is 0, because the KL term to the reference already
    keeps the policy from collapsing and the bonus would pull against the skills Phase 2 distils.
    `gigpo_defaults=verl-agent` sets 0.001."""
    old_logprobs: str = "auto"
    """π_old of the PPO ratio: "sampler" (the log-probs the decoder recorded while sampling),
    "recompute" (the policy's own log-probs before the first optimiser step, as verl-agent does:
    the first mini-batch's from its grad forward, detached; the other mini-batches' from one no-grad
    forward beforehand) or "auto" (recompute on CUDA, sampler on CPU). In float32 on CPU the two
    agree to ~1e-6 and recomputing costs a no-grad forward over all mini-batches but the first; in
    bf16 on a GPU the sampler's kernels differ from the training forward's and the first ratio
    would not be 1. Distillation samples keep their
    sampler log-probs: they were drawn under the skill prompt, which the update does not score."""
    loss_agg: str = "token-mean"
    """Aggregation of per-token losses: "token-mean" (all action tokens of a mini-batch weigh
    the same; GiGPO's default) or "seq-mean-token-mean" (mean per response, then over responses)."""
    ppo_epochs: int = 1
    """Passes over the batch per iteration (GiGPO: 1)."""
    minibatches: int = 1
    """Optimiser steps per epoch: the batch is shuffled and split into this many mini-batches.
    Our choice for the CPU preset; the GiGPO script uses mini-batches of 256 samples."""
    token_budget: int = 8192
    """Micro-batch size in (prompt + response) tokens; gradients are accumulated over micro-batches."""
    lr: float = 1e-6
    """AdamW learning rate (GiGPO, full fine-tune: 1e-6; LoRA wants larger, see presets)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm (GiGPO/verl: 1.0)."""

    def __post_init__(self):
        choices = {"norm": ("std", "none"), "episode_stats": ("trajectory", "step"),
                   "invalid_penalty_mode": ("reward", "row"), "kl_estimator": ("k3", "k1"),
                   "loss_agg": ("token-mean", "seq-mean-token-mean"),
                   "old_logprobs": ("auto", "sampler", "recompute")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"gigpo.{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        for key in ("group_size", "ppo_epochs", "minibatches", "token_budget"):
            if getattr(self, key) < 1:
                raise ValueError(f"gigpo.{key}={getattr(self, key)}: must be at least 1")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gigpo.gamma={self.gamma}: must lie in [0, 1]")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"gigpo.clip_eps={self.clip_eps}: must lie in (0, 1)")
        if self.clip_ratio_c != 0 and self.clip_ratio_c <= 1:
            raise ValueError(f"gigpo.clip_ratio_c={self.clip_ratio_c}: must be > 1 (dual clip) or 0 (off)")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"gigpo.lr and gigpo.grad_clip must be > 0 (got {self.lr}, {self.grad_clip})")
        if min(self.beta_kl, self.entropy_coef, self.invalid_penalty, self.eps) < 0:
            raise ValueError("gigpo.beta_kl, entropy_coef, invalid_penalty and eps must be >= 0")


# ---------------------------------------------------------------------------------------
# ALGO LOGIC: advantages
# ---------------------------------------------------------------------------------------


def relative(values: torch.Tensor, stats: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """(x − mean(S)) / F_norm(S): values made relative to the statistics of a set S.

    F_norm = std(S) + eps (unbiased std, as torch.std) when ``norm == "std"``, else 1.
    Rules for degenerate sets (one rule each, tested):
    * all of S equal → F_norm = 1 (so a group whose values are all equal gets 0 everywhere);
    * S of one → F_norm = 1; the callers decide what a group of one gets (episode: raw score, step: 0).
    """
    if norm not in ("std", "none"):
        raise ValueError(f"gigpo.norm must be 'std' or 'none', got {norm!r}")
    centred = values - stats.mean()
    if norm == "none" or stats.numel() < 2 or bool((stats == stats[0]).all()):
        return centred
    return centred / (stats.std() + eps)


def normalise(values: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Relative advantage inside one group: (x − mean(x)) / F_norm(x) (see `relative`)."""
    return relative(values, values, norm, eps)


def episode_advantages(returns: torch.Tensor, norm: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """GiGPO Eq. 3, episode-level relative advantage of the G rollouts of one group.

        A^E(τ_i) = (R(τ_i) − mean_j R(τ_j)) / F_norm({R(τ_j)})

    ``returns``: (G,) total return of each trajectory. Returns (G,).
    Degenerate group of one (G = 1): our choice, as in the public GiGPO code, is to pass
    the raw return through (A^E = R), so that a run with G = 1 still has a learning signal.
    """
    if returns.numel() == 1:
        return returns.clone()
    return normalise(returns, norm, eps)


def episode_terms(scores: Sequence[Sequence[float]], returns: torch.Tensor, cfg: GiGPOConfig) -> list[list[float]]:
    """A^E for every step row of one group (`group_advantages`).

    ``scores[i][t]``: the episode score that step t of τ_i carries: R(τ_i), minus c on an invalid
    row in "row" penalty mode. ``returns``: R(τ_i). Statistics (`gigpo.episode_stats`):
    "trajectory": Eq. 3, mean and std over the G returns (then every row of τ_i gets A^E(τ_i)
    in "reward" mode); "step": the public GiGPO code, over every row's score, so a long
    episode weighs |τ_i| times. A group of one passes its scores through (`episode_advantages`).
    """
    if cfg.episode_stats == "trajectory":
        stats = returns
    elif cfg.episode_stats == "step":
        stats = torch.tensor([v for row in scores for v in row], dtype=torch.float64)
    else:
        raise ValueError(f"gigpo.episode_stats must be 'trajectory' or 'step', got {cfg.episode_stats!r}")
    if len(scores) == 1:
        return [list(scores[0])]
    return [relative(torch.tensor(row, dtype=torch.float64), stats, cfg.norm, cfg.eps).tolist() for row in scores]


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """GiGPO Eq. 6 (inner sum): discounted return from each step, R_t = Σ_k γ^k r_{t+k}."""
    out, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def step_groups(anchors: Sequence[Sequence[str]]) -> dict[str, list[tuple[int, int]]]:
    """GiGPO Eq. 5, anchor-state grouping inside ONE task group.

    ``anchors[i][t]`` is the anchor key of step t of trajectory i. Returns
    {anchor: [(i, t), ...]}: all steps of the group (across its G trajectories, repeated
    visits included) that start from the same observation. Insertion order is deterministic.
    """
    groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, traj_anchors in enumerate(anchors):
        for t, key in enumerate(traj_anchors):
            groups[key].append((i, t))
    return dict(groups)


def step_advantages(step_returns: Sequence[Sequence[float]], anchors: Sequence[Sequence[str]],
                    norm: str = "std", eps: float = 1e-6) -> list[list[float]]:
    """GiGPO Eq. 7-8, step-level relative advantage.

        A^S(a_t^i) = (R_t^i − mean_{(j,k) ∈ G^S(s)} R_k^j) / F_norm,   s = anchor of step t of τ_i

    ``step_returns[i][t]``: discounted return R_t of step t of trajectory i (Eq. 6).
    Degenerate step group of one: A^S = 0 (no other action from this state to compare with).
    """
    out = [[0.0] * len(r) for r in step_returns]
    for members in step_groups(anchors).values():
        if len(members) < 2:
            continue  # a step group of one gets advantage 0
        values = torch.tensor([step_returns[i][t] for i, t in members], dtype=torch.float64)
        for (i, t), a in zip(members, normalise(values, norm, eps).tolist()):
            out[i][t] = a
    return out


def joint_advantage(a_episode: float, a_step: float, omega: float) -> float:
    """GiGPO Eq. 9: A = A^E + ω · A^S. Every response token of step t gets this value."""
    return a_episode + omega * a_step


def step_rewards(rewards: Sequence[float], valid: Sequence[bool], invalid_penalty: float) -> list[float]:
    """Reward of each step with the invalid-action penalty as a reward ("reward" mode):
    r_t = r_t^env − c · 1[invalid_t]. It lowers R(τ) and is discounted into earlier step returns."""
    return [r - (0.0 if ok else invalid_penalty) for r, ok in zip(rewards, valid)]


def group_advantages(rewards: Sequence[Sequence[float]], valid: Sequence[Sequence[bool]],
                     anchors: Sequence[Sequence[str]], cfg: GiGPOConfig) -> tuple[list[list[float]], dict]:
    """All advantages of ONE task group of trajectories (plain lists in, plain lists out).

    Returns (A[i][t], parts): parts holds the returns R(τ_i), the episode term A^E[i][t] (one
    value per trajectory except in "row" penalty mode, where an invalid row has its own), the
    step term A^S[i][t] and the step returns R_t, for logging and tests.
    The two penalty modes (`GiGPOConfig.invalid_penalty_mode`):
      "reward": r_t ← r_t − c·1[invalid_t], then R(τ), Eq. 6 returns, A^E and A^S as written.
      "row":    R(τ) and R_t from the environment's rewards, then on each invalid row
                R(τ) ← R(τ) − c (that row's copy only) and R_t ← R_t − c.
    """
    if cfg.invalid_penalty_mode == "reward":
        r = [step_rewards(rw, ok, cfg.invalid_penalty) for rw, ok in zip(rewards, valid)]
        penalty = [[0.0] * len(x) for x in r]
    elif cfg.invalid_penalty_mode == "row":
        r = [list(rw) for rw in rewards]
        penalty = [[0.0 if ok else cfg.invalid_penalty for ok in v] for v in valid]
    else:
        raise ValueError(f"gigpo.invalid_penalty_mode must be 'reward' or 'row', got {cfg.invalid_penalty_mode!r}")
    returns = torch.tensor([sum(x) for x in r], dtype=torch.float64)  # R(τ_i), undiscounted
    scores = [[returns[i].item() - p for p in penalty[i]] for i in range(len(r))]
    a_ep = episode_terms(scores, returns, cfg)  # Eq. 3
    r_t = [[g - p for g, p in zip(discounted_returns(x, cfg.gamma), pen)]  # Eq. 6
           for x, pen in zip(r, penalty)]
    a_st = step_advantages(r_t, anchors, cfg.norm, cfg.eps)  # Eq. 7-8
    adv = [[joint_advantage(e, a, cfg.omega) for e, a in zip(a_ep[i], a_st[i])]  # Eq. 9
           for i in range(len(r))]
    return adv, {"returns": returns.tolist(), "episode": a_ep, "step": a_st, "step_returns": r_t}


def compute_advantages(trajectories: Sequence, cfg: GiGPOConfig) -> list[list[float]]:
    """Joint GiGPO advantages for a batch of ``core.Trajectory`` objects.

    Trajectories are grouped by their ``group`` key (one task, one initial state); each group
    is handled by ``group_advantages``. Returns A[k][t] aligned with trajectories[k].steps.
    """
    by_group: dict[str, list[int]] = defaultdict(list)
    for k, traj in enumerate(trajectories):
        by_group[traj.group].append(k)
    out: list[list[float]] = [[] for _ in trajectories]
    for members in by_group.values():
        trajs = [trajectories[k] for k in members]
        adv, _ = group_advantages([[s.reward for s in t.steps] for t in trajs],
                                  [[s.valid for s in t.steps] for t in trajs],
                                  [[s.anchor for s in t.steps] for t in trajs], cfg)
        for k, a in zip(members, adv):
            out[k] = a
    return out


# ---------------------------------------------------------------------------------------
# ALGO LOGIC: losses
# ---------------------------------------------------------------------------------------


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from samples of π_θ.

    k3 (Schulman 2020, "Approximating KL divergence"; GiGPO's ``low_var_kl``):
        KL ≈ exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1   (≥ 0, unbiased, low variance)
    k1: KL ≈ log π_θ − log π_ref.
    The k3 value is clamped to [-10, 10] as in the GiGPO code, for numerical safety.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator != "k3":
        raise ValueError(f"gigpo.kl_estimator must be 'k3' or 'k1', got {estimator!r}")
    log_ratio = ref_logp - logp
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-10.0, 10.0)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  clip_eps: float, clip_ratio_c: float = 0.0) -> torch.Tensor:
    """Per-token PPO-clip policy loss (GiGPO Eq. 10, the min(...) term, negated), dual-clipped.

        ρ_t = π_θ(a_t) / π_old(a_t),   L_t = −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)
        dual clip (clip_ratio_c = c > 1, tokens with A_t < 0 only):  L_t ← min(L_t, −c·A_t)

    All tensors (N,) over action tokens. A positive-advantage token lowers the loss when its
    probability rises (until the clip). Without the dual clip a negative-advantage token whose
    ratio has grown to ρ ≫ 1+ε keeps a loss −ρA that grows without bound; the dual clip caps
    it at −cA (and stops its gradient there), as the public GiGPO code does with c = 3.
    """
    ratio = torch.exp(logp - old_logp)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    if clip_ratio_c > 0:
        if clip_ratio_c <= 1:
            raise ValueError(f"gigpo.clip_ratio_c must be > 1 (or 0 = off), got {clip_ratio_c}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -clip_ratio_c * advantages), loss)
    return loss


def distill_token_loss(logp_plain: torch.Tensor, logp_sampler: torch.Tensor, advantages: torch.Tensor,
                       clip_eps: float) -> torch.Tensor:
    """SIRI Phase 2's per-token distillation loss (distill.py selects the tokens), log ρ_t clipped on the side the advantage pushes it:

        A_t ≥ 0:  −A_t · min(log ρ_t, log(1 + ε))
        A_t < 0:  −A_t · max(log ρ_t, log(1 − ε))       ρ_t = π_θ(a_t|c_plain) / μ(a_t|c_skill)

    ``logp_plain``: log π_θ(a_t | plain prompt), with grad; ``logp_sampler``: the sampling
    log-probs under the skill prompt (constants); ``advantages``: A_t (> 0 for the tokens the
    default selection keeps).

    Our choice, because the paper gives no formula: below the clip the gradient is
    −A_t ∇log π_θ(a_t|c_plain), an advantage-weighted log-likelihood that does not vanish
    when the plain policy still finds the skill's action unlikely (as ρ·A would); once the
    plain policy already gives the token (1+ε) times the sampler's probability, the token is
    internalised and the gradient stops, like PPO's clip does for positive advantages.
    Negative advantages reach this loss only when the advantage filter is off (the
    `no_selection` ablation); without the lower clip, −A·log ρ would push such a token's
    probability towards 0 with no bound. Our choice: clip at log(1 − ε), PPO's lower bound,
    so a negative token stops once the plain policy gives it (1 − ε) times the sampler's
    probability, rather than exclude such tokens, which would make the ablation a different
    selection rule instead of "no selection".
    """
    log_ratio = logp_plain - logp_sampler
    clipped = torch.where(advantages >= 0, torch.clamp(log_ratio, max=math.log1p(clip_eps)),
                          torch.clamp(log_ratio, min=math.log1p(-clip_eps)))
    return -advantages * clipped


def aggregate(token_losses: list[torch.Tensor], mode: str, n_tokens: int, n_seqs: int) -> torch.Tensor:
    """Sum of one micro-batch's share of the mini-batch loss.

    ``token-mean``: Σ_tokens l / (tokens in the mini-batch);
    ``seq-mean-token-mean``: Σ_seq mean_tokens(l) / (responses in the mini-batch).
    Dividing by mini-batch totals (not micro-batch ones) makes gradient accumulation exact.
    """
    if mode == "token-mean":
        return sum(l.sum() for l in token_losses) / max(n_tokens, 1)
    if mode == "seq-mean-token-mean":
        return sum(l.mean() for l in token_losses if l.numel()) / max(n_seqs, 1)
    raise ValueError(f"gigpo.loss_agg must be 'token-mean' or 'seq-mean-token-mean', got {mode!r}")


# ---------------------------------------------------------------------------------------
# ALGO LOGIC: the whole objective
# ---------------------------------------------------------------------------------------


def objective(samples: Sequence[Sample], logps: Sequence[torch.Tensor], entropies: Sequence[torch.Tensor],
              old: Sequence[torch.Tensor], ref: Sequence[torch.Tensor | None], totals: dict[str, int],
              cfg: GiGPOConfig, distill=None) -> tuple[torch.Tensor, dict[str, float]]:
    """SIRI's loss on one micro-batch's share of a mini-batch, per action token t of each sample:

        pg samples (plain rollouts, Phase 0 and 2):   l_t = L_clip(ρ_t, A) + β·KL_t − c_ent·H_t
        distill samples (Phase 2, selected tokens):   l_t = L_distill(π_θ(a_t|c_plain) / μ(a_t|c_skill), A)
        L = agg(l)[pg tokens] + λ · agg(l)[distill tokens]

    ρ_t = π_θ/π_old (GiGPO Eq. 10, `ppo_clip_loss`), KL_t to the reference policy (`kl_penalty`),
    H_t the entropy, L_distill `distill_token_loss`, agg `aggregate` (divided by the mini-batch's
    ``totals``: "pg_tokens", "pg_seqs", "distill_tokens", "distill_seqs", summed over ranks). A is the
    sample's advantage on every token of its response. ``old``: π_old's log-probs (distill
    samples: the sampler's under the skill prompt); ``ref``: π_ref's, None where β = 0.
    ``distill``: `distill.DistillConfig` (λ = distill.lam, ε = distill.clip_eps); needed only
    when a distill sample is present. Returns (L, detached sums of each term for the logs).
    """
    pg, dist, stats = [], [], defaultdict(float)
    for s, logp, ent, old_t, ref_t in zip(samples, logps, entropies, old, ref):
        adv = torch.full_like(logp, s.advantage)
        if s.kind not in ("pg", "distill"):
            raise ValueError(f"a training sample of kind {s.kind!r}: the objective knows 'pg' and 'distill'")
        if s.kind == "distill":
            if distill is None:
                raise ValueError("a distillation sample needs distill=DistillConfig (pass cfg.distill to update)")
            loss_t = distill_token_loss(logp, old_t, adv, distill.clip_eps)
            stats["distill_loss"] += loss_t.detach().sum().item()
            dist.append(loss_t)
            continue
        loss_t = ppo_clip_loss(logp, old_t, adv, cfg.clip_eps, cfg.clip_ratio_c)             # GiGPO Eq. 10
        stats["pg_loss"] += loss_t.detach().sum().item()
        stats["clip_frac"] += ((logp - old_t).exp().sub(1).abs() > cfg.clip_eps).sum().item()
        if ref_t is not None:
            kl = kl_penalty(logp, ref_t, cfg.kl_estimator)
            loss_t = loss_t + cfg.beta_kl * kl
            stats["kl"] += kl.detach().sum().item()
        if cfg.entropy_coef:
            loss_t = loss_t - cfg.entropy_coef * ent
        stats["entropy"] += ent.detach().sum().item()
        pg.append(loss_t)
    loss = aggregate(pg, cfg.loss_agg, totals["pg_tokens"], totals["pg_seqs"]) if pg else torch.zeros(())
    if dist:
        loss = loss + distill.lam * aggregate(dist, cfg.loss_agg, totals["distill_tokens"], totals["distill_seqs"])
    return loss, stats


# ---------------------------------------------------------------------------------------
# Update step (plumbing around the objective)
# ---------------------------------------------------------------------------------------


def samples_from(trajectories: Sequence, advantages: Sequence[Sequence[float]]) -> list[Sample]:
    """One ``Sample`` per step with at least one response token."""
    return [Sample(s.prompt_ids, s.response_ids, s.logprobs, a, allowed=s.allowed)
            for traj, adv in zip(trajectories, advantages)
            for s, a in zip(traj.steps, adv) if s.response_ids]


def padded_tokens(lengths: Sequence[tuple[int, int]], batches: Sequence[Sequence[int]],
                  right_padded: bool = False) -> tuple[int, int]:
    """(real, padded) token counts of micro-batches of rows in `Policy.score`'s layouts: each batch
    is a (b, longest prompt + longest response) tensor (left-padded prompts), or with right_padded
    a (b, longest prompt-and-response) one (`Policy._score_batch`)."""
    real = sum(sum(lengths[k]) for b in batches for k in b)
    width = (lambda b: max(sum(lengths[k]) for k in b)) if right_padded else \
        (lambda b: max(lengths[k][0] for k in b) + max(lengths[k][1] for k in b))
    padded = sum(len(b) * width(b) for b in batches if b)
    return real, padded


def old_logprobs_source(cfg: GiGPOConfig, device: torch.device) -> str:
    """"sampler" or "recompute": `GiGPOConfig.old_logprobs` with "auto" resolved for ``device``."""
    if cfg.old_logprobs == "auto":
        return "recompute" if torch.device(device).type == "cuda" else "sampler"
    if cfg.old_logprobs not in ("sampler", "recompute"):
        raise ValueError(f"gigpo.old_logprobs must be 'auto', 'sampler' or 'recompute', got {cfg.old_logprobs!r}")
    return cfg.old_logprobs


def score_rows(policy, samples: Sequence[Sample], rows: Sequence[int], token_budget: int,
               reference: bool = False) -> dict[int, torch.Tensor]:
    """{k: log π(response | prompt) of samples[k]} for k in rows, no grad, float32, in one pass of
    `Policy.score` (length-sorted micro-batches); reference=True scores with the adapter disabled."""
    if not rows:
        return {}
    with torch.no_grad():
        logps = policy.score([samples[k].prompt_ids for k in rows], [samples[k].response_ids for k in rows],
                             token_budget, reference=reference, allowed=[samples[k].allowed for k in rows])
    return {k: lp.float() for k, lp in zip(rows, logps)}


def update(policy, optimizer, samples: list[Sample], cfg: GiGPOConfig, distill_cfg=None, seed: int = 0) -> dict:
    """PPO epochs over ``samples``: shuffle, split into mini-batches, accumulate micro-batches.

    The loss of a mini-batch is `objective` (SIRI's total objective; the distill term only in
    Phase 2, with ``distill_cfg``: λ and ε of `distill.DistillConfig`). A non-finite loss skips that optimiser step and is counted (``skipped_nonfinite``).
    Returns metrics averaged over optimiser steps, and the seconds spent scoring with the policy
    (forward with grad: ``score_s``), scoring with the reference (``ref_score_s``), re-scoring
    π_old (``old_score_s``) and in backward passes (``backward_s``); the rest of the update is
    bookkeeping and optimiser steps. ``pad_frac``: the share of the grad forwards' tokens that
    was padding.

    Forwards (our choice: as few as the math allows). Each response is scored with grad once per
    epoch (log π and the entropy, from the same logits). log π_ref needs other weights (the
    adapter off), so one more forward, no grad, once per update, not per epoch: the base is
    frozen. It is a separate pass rather than extra rows of the grad forward, because such rows
    would go through the backward pass too (zero gradient, full cost). π_old with
    ``old_logprobs=recompute``: the first mini-batch of the first epoch is scored before any
    optimiser step, so its grad forward *is* π_old (taken detached: the ratio starts at exactly
    1); only the other mini-batches' rows are re-scored beforehand (none with one mini-batch).
    Every pass cuts its rows into length-sorted micro-batches with little padding (`Policy.pack_rows`).

    Data-parallel (torchrun, see distributed.py): each rank passes its own samples; mini-batch
    k is the union of every rank's k-th mini-batch. The token / response totals that ``aggregate``
    divides by are summed over ranks and so are the gradients, so the step equals one process's
    step on the union. Every rank takes the same number of steps (a rank with fewer mini-batches
    pads with empty ones) and a non-finite loss on any rank skips the step on all.
    """
    params = [p for p in policy.model.parameters() if p.requires_grad]
    if distill_cfg is None and any(s.kind == "distill" for s in samples):
        raise ValueError("update() got distillation samples but no distill_cfg (pass cfg.distill)")
    rng = random.Random(seed)
    size = math.ceil(len(samples) / max(cfg.minibatches, 1)) or 1
    epochs = []  # epochs[e] = mini-batches (lists of sample indices), shuffled as before any step
    for _epoch in range(cfg.ppo_epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        minis = [order[start:start + size] for start in range(0, len(order), size)]
        if distributed.world_size() > 1:  # same step count on every rank (len(minis) <= minibatches)
            minis += [[] for _ in range(max(cfg.minibatches, 1) - len(minis))]
        epochs.append(minis)
    pg_rows = [k for k, s in enumerate(samples) if s.kind == "pg"]
    lengths = [(len(s.prompt_ids), len(s.response_ids)) for s in samples]
    seconds = {"score_s": 0.0, "ref_score_s": 0.0, "backward_s": 0.0, "old_score_s": 0.0}  # wall time, summed

    # Before the first step, no grad: π_old where it is re-scored, π_ref of every pg row.
    old = {k: torch.tensor(s.old_logprobs, dtype=torch.float32) for k, s in enumerate(samples)}  # sampler's
    recompute = old_logprobs_source(cfg, policy.device) == "recompute"
    from_forward = [k for k in (epochs[0][0] if epochs and epochs[0] else []) if samples[k].kind == "pg"] \
        if recompute else []
    old.update({k: None for k in from_forward})  # filled by the first grad forward
    t0 = time.perf_counter()
    if recompute:
        old.update(score_rows(policy, samples, [k for k in pg_rows if k not in from_forward], cfg.token_budget))
    t1 = time.perf_counter()
    ref = score_rows(policy, samples, pg_rows, cfg.token_budget, reference=True) if cfg.beta_kl > 0 else {}
    seconds["old_score_s"], seconds["ref_score_s"] = t1 - t0, time.perf_counter() - t1

    sums: dict[str, float] = defaultdict(float)
    n_steps = skipped = 0
    n_real = n_padded = 0  # tokens of the grad forwards, and with their padding
    outcomes: list[bool] = []  # per mini-batch: step taken (True) or skipped as non-finite (False)
    for minis in epochs:
        for mini in minis:
            pg = [k for k in mini if samples[k].kind == "pg"]
            dist = [k for k in mini if samples[k].kind == "distill"]
            totals = dict(zip(("pg_tokens", "distill_tokens", "pg_seqs", "distill_seqs"), distributed.all_reduce_sum(
                [sum(lengths[k][1] for k in pg), sum(lengths[k][1] for k in dist), len(pg), len(dist)])))
            if totals["pg_seqs"] + totals["distill_seqs"] == 0:
                continue  # empty on every rank (only when distributed): no step
            optimizer.zero_grad(set_to_none=True)
            stats: dict[str, float] = defaultdict(float)
            finite = True
            batches = [[mini[j] for j in b] for b in policy.pack_rows([lengths[k] for k in mini], cfg.token_budget)]
            real, padded = padded_tokens(lengths, batches, getattr(policy, "causal_layout", False))
            n_real, n_padded = n_real + real, n_padded + padded
            for mb in batches:
                t0 = time.perf_counter()
                logps, ents = policy.score([samples[k].prompt_ids for k in mb], [samples[k].response_ids for k in mb],
                                           cfg.token_budget, with_entropy=True, entropy_grad=cfg.entropy_coef > 0,
                                           allowed=[samples[k].allowed for k in mb])
                seconds["score_s"] += time.perf_counter() - t0
                for k, logp in zip(mb, logps):
                    if old[k] is None:  # first mini-batch, no step taken yet: π_old = this very forward
                        old[k] = logp.detach().float()
                loss, terms = objective([samples[k] for k in mb], logps, ents,
                                        [old[k].to(lp.device, lp.dtype) for k, lp in zip(mb, logps)],
                                        [ref[k].to(lp.device, lp.dtype) if k in ref else None for k, lp in zip(mb, logps)],
                                        totals, cfg, distill_cfg)
                for key, value in terms.items():
                    stats[key] += value
                if not torch.isfinite(loss):
                    finite = False
                    break
                t0 = time.perf_counter()
                loss.backward()
                seconds["backward_s"] += time.perf_counter() - t0
                stats["loss"] += loss.item()
            missing = [k for k in mini if old[k] is None]  # a non-finite loss broke off first: no step follows
            t0 = time.perf_counter()
            old.update(score_rows(policy, samples, missing, cfg.token_budget))
            seconds["old_score_s"] += time.perf_counter() - t0
            keys = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "distill_loss")
            reduced = distributed.all_reduce_sum([float(not finite)] + [stats[k] for k in keys])
            finite = reduced[0] == 0  # a non-finite loss on any rank skips the step on every rank
            stats.update(zip(keys, reduced[1:]))
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                outcomes.append(False)
                continue
            distributed.all_reduce_grads(params)  # Σ over ranks (the losses are already / global totals)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                outcomes.append(False)
                continue
            optimizer.step()
            n_steps += 1
            outcomes.append(True)
            sums["loss"] += stats["loss"]
            sums["grad_norm"] += grad_norm.item()
            for key in ("pg_loss", "kl", "entropy", "clip_frac"):
                sums[key] += stats[key] / max(totals["pg_tokens"], 1)
            sums["distill_loss"] += stats["distill_loss"] / max(totals["distill_tokens"], 1)
    out = {k: v / max(n_steps, 1) for k, v in sums.items()}
    pg_tokens, distill_tokens = distributed.all_reduce_sum(
        [sum(len(s.response_ids) for s in samples if s.kind == k) for k in ("pg", "distill")])
    out.update(seconds, pad_frac=1.0 - n_real / n_padded if n_padded else 0.0)
    if recompute and pg_rows:  # verl-agent's training/rollout_probs_diff_max: how far the sampler was off
        out["old_prob_diff_max"] = max(
            (old[k].cpu().exp() - torch.tensor(samples[k].old_logprobs).exp()).abs().max().item() for k in pg_rows)
    taken = [k for k, ok in enumerate(outcomes) if ok]
    out.update(skipped_leading=taken[0] if taken else len(outcomes),  # skipped before the first step taken
               skipped_trailing=len(outcomes) - 1 - taken[-1] if taken else len(outcomes))
    out.update(optimizer_steps=n_steps, skipped_nonfinite=skipped,
               pg_tokens=int(pg_tokens), distill_tokens=int(distill_tokens))
    return out
