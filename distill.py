"""SIRI Phase 2: internalisation of validated skills by selective distillation.

Rollouts run *with* a validated skill in the prompt; their action tokens are re-scored under
the *plain* prompt (skill removed) and pushed up there, but only where it pays:

* trajectory-level utility: the skill-guided trajectory's return beats the mean return of
  the paired plain group (same task, same seeds);
* action-level advantage: its GiGPO joint advantage, computed inside the skill-guided group,
  is positive.

Loss (added to the GiGPO loss on the plain rollouts):

    L = L_GiGPO(plain) + λ · L_distill
    L_distill = agg_{t ∈ S}  −A_t · clip(log ρ_t)   (min(·, log(1+ε)) for A_t ≥ 0, max(·, log(1−ε)) for A_t < 0)
    ρ_t = π_θ(a_t | c_plain) / μ(a_t | c_skill)

where S is the selected token set, μ the policy that sampled a_t under the skill context
(its recorded log-probs) and agg the GiGPO token aggregation. This module selects S and builds its
training samples; the per-token loss, `gigpo.distill_token_loss`, sits beside GiGPO's own terms
in `gigpo.objective`, where the whole loss reads on one screen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from core import Sample
from gigpo import GiGPOConfig, compute_advantages


@dataclass
class DistillConfig:
    """Phase 2 hyper-parameters (the paper gives no values; ours are marked as our choice)."""

    lam: float = 1.0
    """λ: weight of L_distill against the GiGPO loss. Our choice: 1.0, equal footing."""
    clip_eps: float = 0.2
    """ε of the importance-ratio clip of L_distill (our choice: GiGPO's PPO ε)."""
    utility_filter: bool = True
    """Keep only skill-guided trajectories whose return beats their paired plain group's mean.
    False = the "no utility filter" ablation."""
    advantage_filter: bool = True
    """Keep only steps with positive GiGPO advantage. False together with utility_filter=False
    is the "no selection" ablation (distil every skill-guided token)."""
    advantage_reference: str = "union"
    """The group a skill-guided step's GiGPO advantage (the action-level filter, and A_t in the
    loss) is computed in: "guided" (the skill-guided rollouts of the task only) or "union" (the
    task's paired plain and skill-guided rollouts together, same seeds, one group of 2G).
    Our choice: "union", because the question the filter asks is whether the skill-guided action
    beats what the plain policy does from the same state; inside the guided group alone, a task
    where every guided rollout wins gets A^E = 0 and the comparison with the plain arm survives
    only in the utility filter."""
    iterations: int = 2
    """Phase 2 iterations per SIRI round."""
    tasks_per_iter: int = 4
    """Tasks per Phase 2 iteration (each played G times with the skill and G times without)."""

    def __post_init__(self):
        if self.advantage_reference not in ("union", "guided"):
            raise ValueError(f"distill.advantage_reference={self.advantage_reference!r}: choose union or guided")
        if self.lam < 0 or not 0 < self.clip_eps < 1:
            raise ValueError(f"distill.lam must be >= 0 and distill.clip_eps in (0, 1) (got {self.lam}, {self.clip_eps})")
        if self.iterations < 0 or self.tasks_per_iter < 1:
            raise ValueError(f"distill.iterations must be >= 0 and distill.tasks_per_iter >= 1 "
                             f"(got {self.iterations}, {self.tasks_per_iter})")


# ---------------------------------------------------------------------------------------
# ALGO LOGIC
# ---------------------------------------------------------------------------------------


def utility_mask(skill_returns: Sequence[float], plain_returns: Sequence[float]) -> list[bool]:
    """Trajectory-level utility: keep τ_skill iff R(τ_skill) > mean_j R(τ_plain_j) of its paired group."""
    baseline = sum(plain_returns) / len(plain_returns)
    return [r > baseline for r in skill_returns]


def selection_masks(skill_returns: Sequence[float], plain_returns: Sequence[float],
                    skill_advantages: Sequence[Sequence[float]], cfg: DistillConfig) -> list[list[bool]]:
    """Which steps of ONE skill-guided group are distilled: utility ∧ (A_t > 0).

    ``skill_advantages[i][t]``: GiGPO joint advantage of step t of skill-guided trajectory i.
    Returns mask[i][t]; every response token of a selected step is distilled.
    """
    keep_traj = utility_mask(skill_returns, plain_returns) if cfg.utility_filter else [True] * len(skill_returns)
    return [[keep and (a > 0 or not cfg.advantage_filter) for a in adv]
            for keep, adv in zip(keep_traj, skill_advantages)]


# ---------------------------------------------------------------------------------------
# Plumbing: from paired rollouts to training samples
# ---------------------------------------------------------------------------------------


def distill_samples(skill_trajs: Sequence, plain_trajs: Sequence, gigpo_cfg: GiGPOConfig,
                    cfg: DistillConfig) -> tuple[list[Sample], dict]:
    """Select the skill-guided steps to distil and turn them into ``Sample(kind="distill")``.

    Skill-guided and plain trajectories are paired through their ``group`` key (same task,
    same seed). The prompt of each sample is the step's ``plain_prompt_ids``: the skill text
    is not in the context the tokens are scored under.
    """
    if cfg.advantage_reference == "union":  # Eq. 9 over plain + guided rollouts of each task (same group key)
        skill_adv = compute_advantages(list(skill_trajs) + list(plain_trajs), gigpo_cfg)[:len(skill_trajs)]
    elif cfg.advantage_reference == "guided":  # Eq. 9 inside the skill-guided groups
        skill_adv = compute_advantages(skill_trajs, gigpo_cfg)
    else:
        raise ValueError(f"distill.advantage_reference must be 'union' or 'guided', got {cfg.advantage_reference!r}")
    plain_returns: dict[str, list[float]] = {}
    for t in plain_trajs:
        plain_returns.setdefault(t.group, []).append(t.reward_sum)
    by_group: dict[str, list[int]] = {}
    for k, t in enumerate(skill_trajs):
        by_group.setdefault(t.group, []).append(k)

    samples, offered, kept, kept_trajs = [], 0, 0, 0
    per_type: dict[str, dict[str, int]] = {}  # tokens offered / past the utility filter / kept, per task type
    for group, members in by_group.items():
        if group not in plain_returns:
            raise ValueError(f"skill-guided group {group!r} has no paired plain group")
        returns = [skill_trajs[k].reward_sum for k in members]
        useful = utility_mask(returns, plain_returns[group]) if cfg.utility_filter else [True] * len(members)
        masks = selection_masks(returns, plain_returns[group], [skill_adv[k] for k in members], cfg)
        for k, mask, use in zip(members, masks, useful):
            kept_trajs += any(mask)
            counts = per_type.setdefault(skill_trajs[k].task_type, {"offered": 0, "useful": 0, "kept": 0})
            for step, adv, keep in zip(skill_trajs[k].steps, skill_adv[k], mask):
                offered += len(step.response_ids)
                counts["offered"] += len(step.response_ids)
                counts["useful"] += len(step.response_ids) if use else 0
                step.distilled = bool(keep and step.response_ids)
                if step.distilled:
                    if step.plain_prompt_ids is None:
                        raise ValueError("skill-guided step has no plain_prompt_ids; roll out with skill=...")
                    samples.append(Sample(step.plain_prompt_ids, step.response_ids, step.logprobs, adv, "distill",
                                          allowed=step.allowed))
                    kept += len(step.response_ids)
                    counts["kept"] += len(step.response_ids)
    metrics = {"distill/tokens_offered": offered, "distill/tokens_kept": kept,
               "distill/trajectories_kept": kept_trajs, "distill/trajectories": len(skill_trajs),
               "per_type": per_type}
    return samples, metrics
