"""The agent loop: `rollout` plays G episodes per task with a `decoder.Policy` in an
`envs.EnvManager` and returns them as `core.Trajectory`s.

One turn of every live slot: build the prompt from the state and the history (the environment's
own template), sample a response, parse its action (the environment's own grammar), step the
environment. Slots are decoded in waves (`SamplingConfig.waves`); with env worker processes a
wave's env step runs while the next wave decodes.
"""
from __future__ import annotations

import contextlib
import time

import torch
from tqdm import tqdm

from core import Step, Trajectory, skill_id
from decoder import Policy, SamplingConfig


def rollout(policy: Policy, envs, task_ids: list[str], group_size: int, cfg: SamplingConfig,
            skill: dict[str, str] | None = None, seed: int = 0, desc: str = "rollout",
            stats: dict | None = None) -> list[Trajectory]:
    """Play len(task_ids) x group_size episodes together, each to its end (won or max_steps).

    Slots are group-contiguous: [t0, t0, .., t0, t1, ..] (G copies of each task, identical initial
    states), so a group's prompts coincide at the first step and share one prefill (within a wave:
    cfg.waves > 1 decodes the slots in parts, see `SamplingConfig.waves`).
    skill: task_type -> skill text put in the prompt (None = plain prompts). Then every Step also
    carries plain_prompt_ids, the same prompt without the skill (Phase 2 re-scores actions on it).
    stats: if given, accumulates wall seconds "reset_s" (env reset), "prompt_s" (build + tokenize),
    "generate_s", "env_s" (env steps), "merge_s" (folding the adapter into the weights, once per
    rollout: `Policy.merged_adapter`), and counts "steps" (agent decisions), "env_steps" (valid actions
    the env executed; invalid ones never reach it) and "tokens" (generated).
    """
    t_merge = time.perf_counter()
    with policy.merged_adapter(cfg.merge_adapter and cfg.engine == "custom"):
        t_merge = time.perf_counter() - t_merge
        return _rollout(policy, envs, task_ids, group_size, cfg, skill, seed, desc, stats, t_merge)


def _rollout(policy, envs, task_ids, group_size, cfg, skill, seed, desc, stats, merge_s) -> list[Trajectory]:
    """`rollout`'s body, run while the merged copy (if any) is open."""
    slot_tasks = [t for t in task_ids for _ in range(group_size)]
    n = len(slot_tasks)
    waves = rollout_waves(len(task_ids), group_size, cfg.waves)
    generators = [torch.Generator(device=policy.device).manual_seed(wave_seed(seed, w)) for w in range(len(waves))]
    overlap = len(waves) > 1 and cfg.overlap_env and getattr(getattr(envs, "cfg", None), "num_workers", 0) > 0
    timing = dict(reset_s=0.0, prompt_s=0.0, generate_s=0.0, env_s=0.0, merge_s=merge_s, steps=0, env_steps=0,
                  tokens=0)
    states: list = [None] * n  # a slot's EnvState once its reset is in
    skills: list[str | None] = [None] * n
    trajs: list = [None] * n
    history: list[list[tuple[str, str | None]]] = [[] for _ in range(n)]

    def start(part) -> None:  # wait for the reset of a part of the slots and open their Trajectories
        t0 = time.perf_counter()
        for i, s in envs.reset_end(part).items():
            states[i], skills[i] = s, (skill or {}).get(s.task_type)
            trajs[i] = Trajectory(task_id=s.task_id, task_type=s.task_type, group=f"{s.task_id}@seed{seed}",
                                  index=i % group_size, skill_id=skill_id(s.task_type, skills[i]) if skills[i]
                                  else None, steps=[], won=False, task=s.task)
        timing["reset_s"] += time.perf_counter() - t0

    # With the overlap, every wave's games are loaded by a request of its own, so wave 0 decodes
    # while the workers still load the later waves' games; without, one reset of all the slots.
    t0 = time.perf_counter()
    resets = dict(enumerate(envs.reset_begin(slot_tasks, waves if overlap else [list(range(n))])))
    timing["reset_s"] += time.perf_counter() - t0
    if not overlap:
        start(resets.pop(0))
    pending: dict[int, tuple] = {}  # wave -> its env step in flight, and what its Steps need

    def finish(w: int) -> None:  # wait for wave w's env step and record its Steps
        t0 = time.perf_counter()
        handle, active, prompts, plain, gens, parsed = pending.pop(w)
        new_states = envs.step_end(handle)
        timing["env_s"] += time.perf_counter() - t0
        for i, p, pp, g, (action, valid) in zip(active, prompts, plain, gens, parsed):
            s, ns = states[i], new_states[i]
            trajs[i].steps.append(Step(
                prompt_ids=p, response_ids=g.ids, logprobs=g.logprobs, text=g.text, action=action,
                valid=valid, reward=ns.reward, done=ns.done, won=ns.won, anchor=s.anchor, obs=s.obs,
                plain_prompt_ids=pp, allowed=g.allowed))
            history[i].append((s.obs, action if valid else None))  # envs shows None as "(invalid)"
            states[i] = ns

    bar = tqdm(total=getattr(getattr(envs, "cfg", None), "max_steps", None), desc=desc, leave=False)
    try:
        while resets or pending or any(not s.done for s in states):
            decoded = False
            for w, slots in enumerate(waves):  # ping-pong: wave w decodes while wave w-1 steps
                if w in resets:
                    start(resets.pop(w))
                if w in pending:
                    finish(w)
                if not (active := [i for i in slots if not states[i].done]):
                    continue
                decoded = True
                t0 = time.perf_counter()
                prompts = [policy.chat_ids(envs.build_prompt(states[i], history[i], skills[i])) for i in active]
                plain = [policy.chat_ids(envs.build_prompt(states[i], history[i], None)) if skills[i] else None
                         for i in active]
                t1 = time.perf_counter()
                gens = policy.generate(prompts, cfg, generators[w],
                                       actions=[states[i].admissible for i in active] if cfg.constrain_actions else None)
                t2 = time.perf_counter()
                parsed = [envs.parse_action(g.text, states[i].admissible) for i, g in zip(active, gens)]
                handle = envs.step_begin({i: action if valid else None for i, (action, valid) in zip(active, parsed)})
                timing["env_s"] += time.perf_counter() - t2
                pending[w] = (handle, active, prompts, plain, gens, parsed)
                if not overlap:
                    finish(w)
                timing["prompt_s"] += t1 - t0
                timing["generate_s"] += t2 - t1
                timing["steps"] += len(active)
                timing["env_steps"] += sum(valid for _, valid in parsed)
                timing["tokens"] += sum(len(g.ids) for g in gens)
            bar.set_postfix(active=sum(not s.done for s in states))
            bar.update(int(decoded))  # the last pass of an overlapped rollout only collects
    finally:  # an error while a request is in flight: read its replies, so the workers' pipes stay in step
        for end, request in [*((envs.reset_end, r) for r in resets.values()),  # resets were sent first;
                             *((envs.step_end, p[0]) for p in pending.values())]:  # steps in the order begun
            with contextlib.suppress(Exception):
                end(request)
        bar.close()
    for traj, s in zip(trajs, states):
        traj.won = s.won
        traj.score = getattr(s, "score", None)  # WebShop's final reward; ALFWorld states have none
    if stats is not None:
        for k, v in timing.items():
            stats[k] = stats.get(k, 0) + v
    return trajs


def rollout_waves(n_tasks: int, group_size: int, waves: int) -> list[list[int]]:
    """The slots of `rollout` cut into up to `waves` consecutive parts of about equal size, at
    task-group boundaries where there are at least as many tasks as waves (a group's G copies
    then share one prefill), else inside the groups."""
    n = n_tasks * group_size
    unit = group_size if n_tasks >= waves else 1
    k = min(waves, n // unit) or 1
    cuts = [round(j * (n // unit) / k) * unit for j in range(k + 1)]
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:]) if b > a]


def wave_seed(seed: int, wave: int) -> int:
    """Seed of wave `wave`'s random stream: the rollout's seed for wave 0 (one wave samples exactly
    as before waves existed), others spread by the 64-bit golden ratio."""
    return seed if wave == 0 else (seed + wave * 0x9E3779B97F4A7C15) % 2**63

