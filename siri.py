"""SIRI: Self-Internalizing Reinforcement Learning with Intrinsic Skills (arXiv 2606.02355).

    python siri.py                                   # CPU default: tiny model, embedded ALFWorld
    python siri.py preset=qwen1.5b                   # one GPU: Qwen2.5-1.5B-Instruct + LoRA
    python siri.py warmup.iterations=5 env=webshop   # dotted overrides, env shorthand
    python siri.py --resume run.out_dir=runs/x       # continue an interrupted run
    python siri.py show run.out_dir=runs/x unit=5    # draw one GiGPO group of unit 5 (show.py)

The run, top to bottom:  evaluate the base model → (cold start) → Phase 0 GiGPO warmup →
rounds of {Phase 1 self-skill mining, Phase 2 selective distillation} → final evaluation.
Every evaluation uses the plain prompt only: no skill bank, no retrieval at inference.

The run is a fixed list of *units* (one warmup iteration, one mining round, one distillation
iteration, ...). A checkpoint records how many units are done, so ``--resume`` continues at
the next one; a run killed at any moment loses at most the units since the last checkpoint.

This file, top to bottom: the phases; the run (`build_units`, `run_unit`, `run_units`); checkpoints
and resume; logs and the report; the command line. The configuration is config.py.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

import distill
import distributed
import gigpo
import mining
import show
import webshop
from agent import rollout
from config import ARMS, ColdStartConfig, Config, ConfigError, config_reference, flat, load_config
from core import EnvState, Sample, Step, Trajectory, atomic_dir, atomic_write, save_figure, seed_of
from envs import HOMES, EnvWorkerDied, make_envs, rename, rename_map
from model import ModelLoadError, load_policy
from webshop import WebShopNotInstalled


# ---------------------------------------------------------------------------------------
# Phases: evaluation, cold start, Phase 0 (GiGPO warmup), Phase 2 (distillation); Phase 1 is mining.mine_round
# ---------------------------------------------------------------------------------------


def success_stats(trajs, prefix: str) -> dict:
    """Success, return, steps and invalid-action rate of a list of trajectories."""
    steps = [s for t in trajs for s in t.steps]
    out = {f"{prefix}/success": sum(t.won for t in trajs) / max(len(trajs), 1),
           f"{prefix}/return": sum(t.reward_sum for t in trajs) / max(len(trajs), 1),
           f"{prefix}/steps": len(steps) / max(len(trajs), 1),
           f"{prefix}/invalid_rate": sum(not s.valid for s in steps) / max(len(steps), 1)}
    scores = [t.score for t in trajs if t.score is not None]
    if scores:  # WebShop: mean purchase reward × 100, as the paper's table reports it
        out[f"{prefix}/score"] = webshop.summarize(scores)["score"]
    return out


def pooled(trajs: list) -> list:
    """Under torchrun: every rank's trajectories, in rank order (= task order, see
    distributed.shard), without their token ids (statistics and mining read only actions,
    observations and outcomes; this keeps the exchange small). One process: ``trajs`` itself."""
    if distributed.world_size() == 1:
        return trajs
    slim = [dataclasses.replace(t, steps=[dataclasses.replace(s, prompt_ids=[], response_ids=[], logprobs=[],
                                                              plain_prompt_ids=None, allowed=None) for s in t.steps])
            for t in trajs]
    return distributed.gather_objects(slim)


def evaluate(policy, envs, cfg: Config, seed: int) -> tuple[dict, list[tuple[str, int, bool, str]]]:
    """Plain-prompt evaluation on the fixed eval set: success per task type and overall, and the
    outcome of every episode as (task id, index, won, task type), sorted, for paired comparisons.
    Under torchrun each rank plays its shard of the eval tasks; the statistics are pooled."""
    ids = envs.task_ids("eval")
    if cfg.eval.max_tasks:
        ids = ids[:cfg.eval.max_tasks]
    sampling = dataclasses.replace(cfg.rollout, temperature=cfg.eval.temperature)
    trajs = rollout(policy, envs, distributed.shard(ids), cfg.eval.episodes_per_task, sampling, skill=None,
                    seed=distributed.rank_seed(seed), desc="eval")
    trajs = pooled(trajs)
    out = success_stats(trajs, "eval")
    by_type: dict[str, list[bool]] = defaultdict(list)
    for t in trajs:
        by_type[t.task_type].append(t.won)
    for tt, wins in sorted(by_type.items()):
        out[f"eval/success/{tt}"] = sum(wins) / len(wins)
    return out, sorted((t.task_id, t.index, bool(t.won), t.task_type) for t in trajs)


def expert(state: EnvState, plan: list[str], rank_types: list[str], rng: random.Random | None):
    """The demonstrator of one task, as a generator: it yields an action and is sent the state that
    action led to, until it stops (plan done or episode over). `state` is the task's initial state;
    its random draws (the search order) happen at the first next(). Play it with `demonstrations`.

    It *searches* for the object: the expert walkthrough (`plan`) goes straight to where the
    object is, which no agent can know from the prompt, so the demonstration first visits
    receptacles (opening closed ones) until it reaches that one, then follows the walkthrough.
    Search order: receptacles whose type comes earlier in `rank_types` first (a skill's
    `search_order`), the rest in a random order drawn from `rng`; receptacles whose type the task
    names (the goal) are not searched.

    Our choice, because the cold start stands in for an instruct model's pre-training: such a
    model knows how to search, not where this generator puts things (envs.HOMES). A plain
    cold start that imitated the walkthrough would put that knowledge into the weights and leave
    a skill nothing to say. Only the first object is searched for (pick_two's second object is
    fetched as the walkthrough does). rng=None: no search, the walkthrough replayed as it is."""
    take = next((i for i, a in enumerate(plan) if a.startswith("take ")), None)
    if take is not None and rng is not None:
        source = plan[take].split(" from ", 1)[1]
        start = max((i for i in range(take) if plan[i].startswith("go to ")), default=take)
        searched = set(mining.room_places(state))
        receps = [a[len("go to "):] for a in state.admissible if a.startswith("go to ")]
        receps = [r for r in receps if mining.type_name(r) in searched]
        rng.shuffle(receps)
        rank = {t: i for i, t in enumerate(rank_types)}
        receps.sort(key=lambda r: rank.get(mining.type_name(r), len(rank)))  # stable: ranked, then random
        for r in receps:
            if r == source or state.done:
                break
            state = yield f"go to {r}"
            if f"open {r}" in state.admissible and not state.done:
                state = yield f"open {r}"
        plan = plan[start:]
    for action in plan:
        if state.done:
            break
        if action not in state.admissible and action.startswith("open "):
            continue  # opened during the search
        state = yield action


def start_expert(state: EnvState, plan: list[str], rank_types: list[str], rng: random.Random | None):
    """(`expert` generator, its first action or None): the generator's random draws happen here,
    so callers that draw from the same rng keep their order of draws."""
    gen = expert(state, plan, rank_types, rng)
    return gen, next(gen, None)


DEMO_SLOTS = 64
"""Env slots that `demonstrations` and `initial_states` use at once. Our choice: 64, below the 120
slots an evaluation of the cpu preset uses, so demonstrations never hold more game engines (tens of
MB each) than a run does anyway, whatever coldstart.tasks is."""


def initial_states(envs, task_ids: list[str]) -> list[EnvState]:
    """The initial state of each task (resets of at most DEMO_SLOTS slots at a time)."""
    return [state for k in range(0, len(task_ids), DEMO_SLOTS) for state in envs.reset(task_ids[k:k + DEMO_SLOTS])]


def demonstrations(envs, task_ids: list[str], experts: list[tuple]) -> list[tuple[list[tuple], bool]]:
    """Play experts[i] (from `start_expert`) on task_ids[i], side by side in env slots (the env
    workers step them together), DEMO_SLOTS at a time. Per task: (demonstration as (state, history,
    action) per step, won); a demonstration may end unwon when the search uses up env.max_steps."""
    if len(task_ids) > DEMO_SLOTS:
        return [played for k in range(0, len(task_ids), DEMO_SLOTS)
                for played in demonstrations(envs, task_ids[k:k + DEMO_SLOTS], experts[k:k + DEMO_SLOTS])]
    if not task_ids:
        return []
    states = envs.reset(task_ids)
    demos: list[list[tuple]] = [[] for _ in task_ids]
    histories: list[list[tuple[str, str]]] = [[] for _ in task_ids]
    actions = {i: first for i, (_, first) in enumerate(experts) if first is not None}
    while actions:
        for i, action in actions.items():
            demos[i].append((states[i], list(histories[i]), action))
            histories[i].append((states[i].obs, action))
        envs.step_end(envs.step_begin(actions))
        states, following = envs.states, {}
        for i in actions:
            try:
                following[i] = experts[i][0].send(states[i])
            except StopIteration:
                pass
        actions = following
    return [(demo, state.won) for demo, state in zip(demos, states)]


def demonstration(envs, task_id: str, rank_types: list[str], rng: random.Random | None) -> tuple[list[tuple], bool]:
    """One task's expert demonstration (`expert`, `demonstrations`): (steps, won)."""
    (state,) = envs.reset([task_id])
    return demonstrations(envs, [task_id], [start_expert(state, envs.walkthrough(task_id), rank_types, rng)])[0]


def demo_trajectory(task_id: str, task_type: str, demo: list[tuple]) -> Trajectory:
    """A demonstration as a won Trajectory (no token ids), the form the summarisers read."""
    steps = [Step(prompt_ids=[], response_ids=[], logprobs=[], text="", action=a, valid=True, reward=0.0,
                  done=False, won=False, anchor=st.anchor, obs=st.obs) for st, _, a in demo]
    return Trajectory(task_id=task_id, task_type=task_type, group=f"{task_id}@demo", index=0,
                      skill_id=None, steps=steps, won=True, task=demo[0][0].task if demo else "")


def coldstart_texts(envs, task_ids, cfg: ColdStartConfig, mining_cfg: mining.MiningConfig,
                    seed: int) -> tuple[list[tuple[str, str]], dict]:
    """SFT texts (user message, target response), one per demonstration step.

    Every task gives a plain demonstration (search in a random order, `expert`) and
    cfg.skill_demos skill-augmented ones, whose prompt holds a skill block and whose search starts
    where the skill says. Our choice: this is how the tiny model learns to read a skill block, as
    an instruct model learned to follow instructions in pre-training. Evaluation stays plain-prompt
    only. What the block says (cfg.skill_places):
    - "random" (default): `mining.answer_skill` with one place of the task's room drawn at random
      (`mining.room_places`), right or wrong, and the demonstration looks there first. Only the
      block predicts where it goes first, so the model learns to take the place from the block;
      one task is shown with several places, so it cannot learn the answer instead.
    - "lists": the same drawn place, in the shape of a mined skill (`mining.listed_skill`): the
      task's object listed (3 times in 4) with places the room lacks before the drawn one, and
      other objects' entries; the demonstration goes first to the first listed place the room
      has, as a careful reader of a mined skill's lists would.
    - "mined": a template skill summarised from the plain demonstrations of 1..K *other* cold-start
      tasks of the type (a random subset each time, K = mining.trajectories_per_skill), searched
      in that skill's order. It never holds the task's own answer, but it mostly agrees with the
      type's usual homes (envs.HOMES), which a model can guess from the task alone: measured, a
      model taught this way played a right and a wrong skill alike (README, "What the toy can and
      cannot show").
    """
    rng = random.Random(seed)
    task_ids = list(task_ids)
    plans = {tid: envs.walkthrough(tid) for tid in task_ids}
    start = dict(zip(task_ids, initial_states(envs, task_ids)))  # the experts' random draws need them
    played = demonstrations(envs, task_ids, [start_expert(start[t], plans[t], [], rng) for t in task_ids])
    plain = {tid: demo for tid, (demo, _) in zip(task_ids, played)}
    lost = [tid for tid, (_, won) in zip(task_ids, played) if not won]  # the search ran out of steps:
    replayed = demonstrations(envs, lost, [start_expert(start[t], plans[t], [], None) for t in lost])
    plain.update({tid: demo for tid, (demo, _) in zip(lost, replayed)})  # imitate the walkthrough instead
    as_traj = {tid: demo_trajectory(tid, envs.task_type(tid), demo) for tid, demo in plain.items()}
    by_type: dict[str, list[str]] = defaultdict(list)
    for tid in task_ids:
        by_type[envs.task_type(tid)].append(tid)
    jobs: list[tuple[str, mining.Skill]] = []
    experts = []
    object_types = sorted({hit[0] for t in as_traj.values() if (hit := mining.found_where(t))})
    receptacle_types = {mining.type_name(r) for homes in HOMES.values() for r in homes}
    for tid in task_ids:
        tt = envs.task_type(tid)
        others = [t for t in by_type[tt] if t != tid]
        obj = mining.found_where(as_traj[tid])
        if cfg.skill_places in ("random", "lists") and obj:
            places = mining.room_places(start[tid])
        if cfg.skill_places == "lists" and obj and others:
            base = mining.answer_skill(envs, [tid], tt, place=places[0])  # its name and steps only
            absent = sorted(receptacle_types - mining.room_types(start[tid]))
        for _ in range(cfg.skill_demos if others else 0):
            if cfg.skill_places == "random" and obj:  # a place of the room, right or wrong
                skill = mining.answer_skill(envs, [tid], tt, place=rng.choice(places))
            elif cfg.skill_places == "lists" and obj:  # the same, in a ranked list, among other entries
                skill = mining.listed_skill(base, obj[0], places, absent, object_types, rng)
            else:
                src = rng.sample(others, rng.randint(1, min(mining_cfg.trajectories_per_skill, len(others))))
                fields, _ = mining.parse_skill(mining.template_summary(
                    [as_traj[t] for t in src], tt, mining_cfg.max_skill_steps))
                skill = mining.Skill(**fields, task_type=tt)
            rank = skill.search_order(obj[0]) if obj else skill.look_first()
            jobs.append((tid, skill))
            experts.append(start_expert(start[tid], plans[tid], rank, rng))
    guided: dict[str, list[tuple[mining.Skill, list[tuple]]]] = defaultdict(list)
    for (tid, skill), (demo, won) in zip(jobs, demonstrations(envs, [t for t, _ in jobs], experts)):
        if won:
            guided[tid].append((skill, demo))
    texts = []
    for tid in task_ids:
        runs = [(None, plain[tid])] + [(skill.text(), demo) for skill, demo in guided[tid]]
        for skill_text, demo in runs:
            texts += [(envs.build_prompt(state, history, skill_text), f"<think>{cfg.think}</think><action>{action}</action>")
                      for state, history, action in demo]
    stats = {"coldstart/demos_plain": len(plain), "coldstart/demos_skill": sum(map(len, guided.values())),
             "coldstart/search_fallback": len(lost),
             "coldstart/demo_steps": sum(len(d) for d in plain.values()) / max(len(plain), 1)}
    return texts, stats


def sft_sample(policy, prompt: str, target: str) -> Sample:
    """One SFT row: the user message in the chat template, the target response ended by EOS."""
    response = policy.tokenizer(target, add_special_tokens=False)["input_ids"] + [policy.tokenizer.eos_token_id]
    return Sample(policy.chat_ids(prompt), response, [0.0] * len(response), 1.0, "sft")


def epoch_samples(policy, texts: list[tuple[str, str]], samples: list[Sample], order: list[int], p_rename: float,
                  rng: random.Random) -> list[Sample]:
    """One cold-start epoch's rows: `order` is shuffled in place (so the epochs' orders compound, as
    shuffling the rows themselves would), then each pair's `samples` row is taken in that order, or
    with probability `p_rename` the pair in a renamed room (`envs.rename`, a fresh `envs.rename_map`
    per pair), tokenized anew."""
    rng.shuffle(order)
    out = []
    for i in order:
        sample = samples[i]
        if p_rename and rng.random() < p_rename:
            mapping = rename_map(rng)
            sample = sft_sample(policy, *(rename(text, mapping) for text in texts[i]))
        out.append(sample)
    return out


def lr_factor(step: int, total: int, schedule: str) -> float:
    """Multiplier of the cold start's learning rate at optimiser step `step` (0-based) of `total`:
    1 for "constant"; for "cosine", a linear warm-up over the first 5 % of the steps, then a cosine
    decay that reaches 0 after the last step."""
    if schedule == "constant":
        return 1.0
    warm = max(1, round(0.05 * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm + 1) / (total - warm + 1)))


def coldstart(policy, envs, cfg: Config, seed: int) -> dict:
    """Cold start: SFT of the *base* weights on expert walkthroughs (adapter off).

    Our choice: train the base model (LoRA disabled), so that the cold-started model is also
    the KL reference of the RL phases (the usual SFT → RL setup) and the adapter starts at
    zero. Loss: mean negative log-likelihood of the target tokens; AdamW at coldstart.lr times
    `lr_factor` (coldstart.schedule). Our choice: cosine by default, measured against a constant
    rate on the preset's cold start (one seed each, 120 eval games): invalid actions 0.64
    instead of 0.75 at equal success (README). Each epoch shows a coldstart.rename share of the
    rows in renamed rooms (`epoch_samples`).

    Under torchrun only rank 0 runs this and ``main`` broadcasts the trained base weights.
    Our choice: every rank could run the same seeded SFT, but on GPUs non-deterministic kernels
    would let the copies drift apart, and the ranks must hold identical weights; the SFT set is
    small, so the other ranks' wait costs no more than running it themselves would.
    """
    pool = coldstart_games(envs, cfg)
    texts, demo_stats = coldstart_texts(envs, pool, cfg.coldstart, cfg.mining, seed)
    samples = [sft_sample(policy, prompt, target) for prompt, target in texts]
    order = list(range(len(samples)))
    base = [p for n, p in policy.model.named_parameters() if "lora_" not in n]
    lora = [p for n, p in policy.model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(False)
    for p in base:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(base, lr=cfg.coldstart.lr)
    rng = random.Random(seed)
    total = cfg.coldstart.epochs * -(-len(samples) // cfg.coldstart.batch_size)  # optimiser steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, cfg.coldstart.schedule))
    losses = []
    with policy.model.disable_adapter():
        bar = tqdm(total=total, desc="coldstart sft", leave=False)
        for _ in range(cfg.coldstart.epochs):
            rows = epoch_samples(policy, texts, samples, order, cfg.coldstart.rename, rng)
            for i in range(0, len(rows), cfg.coldstart.batch_size):
                batch = rows[i:i + cfg.coldstart.batch_size]
                logps = policy.score([s.prompt_ids for s in batch], [s.response_ids for s in batch],
                                     cfg.gigpo.token_budget)
                loss = -torch.cat(logps).mean()
                if not torch.isfinite(loss):
                    raise RunError(f"cold start: non-finite loss at step {len(losses) + 1} (coldstart.lr="
                                   f"{cfg.coldstart.lr} too large?); nothing was saved, lower it and start again")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(base, 1.0)
                lr_last = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(nll=f"{loss.item():.3f}")
        bar.close()
    if not all(torch.isfinite(p).all() for p in base):
        raise RunError(f"cold start: non-finite weights after the last step (coldstart.lr={cfg.coldstart.lr} too "
                       "large?); nothing was saved, lower it and start again")
    for p in base:
        p.requires_grad_(False)
    for p in lora:
        p.requires_grad_(True)
    out = {"coldstart/nll_first": losses[0], "coldstart/nll_last": losses[-1], "coldstart/lr_last": lr_last,
           "coldstart/samples": len(samples), "coldstart/tasks": len(pool), **demo_stats}
    return out


def coldstart_games(envs, cfg: Config) -> list[str]:
    """The cold start's games (coldstart.games): the first coldstart.tasks training games, or the
    coldstart.tasks after the RL pool (`training_pool`; config.load_config checks that they exist)."""
    start = cfg.warmup.task_pool if cfg.coldstart.games == "after_pool" else 0
    return envs.task_ids("train")[start:start + cfg.coldstart.tasks]


def training_pool(envs, cfg: Config) -> list[str]:
    """The training tasks the policy trains on: the first warmup.task_pool ones (all if 0)."""
    return envs.task_ids("train")[:cfg.warmup.task_pool or None]


def train_task_ids(envs, cfg: Config, rng: random.Random, n: int) -> list[str]:
    """n tasks drawn from the training pool (`training_pool`: the first warmup.task_pool ones)."""
    pool = training_pool(envs, cfg)
    return rng.sample(pool, min(n, len(pool)))


def add_timing(timing: dict, rollout_s: float, update_s: float, update_stats: dict) -> None:
    """Accumulate a phase's wall time: rollout, update, and inside the update the scoring
    forwards (policy and reference, ``update_scoring``) and backward passes (``update_backward``)."""
    timing["rollout"] += rollout_s
    timing["update"] += update_s
    timing["update_scoring"] += update_stats["score_s"] + update_stats["ref_score_s"]
    timing["update_backward"] += update_stats["backward_s"]


def refill_buffer(state: RunState, trajs: list, cfg: Config) -> list:
    """Self-mining's buffer: the won plain trajectories appended, only the newest buffer_size kept."""
    buffer = state.buffer
    buffer.extend(t for t in trajs if t.won)
    del buffer[:-cfg.warmup.buffer_size]
    return buffer


def trajectory_row(t: Trajectory, adv: list[float] | None = None, episode: list[float] | None = None,
                   step: list[float] | None = None, gigpo_return: float | None = None) -> dict:
    """One row of trajectories.jsonl: the trajectory step by step (observation, the model's whole
    response, the parsed action, valid, reward, anchor key) with its advantages A^E, A^S and A when
    given, and in Phase 2 whether the step was distilled. ``return``: the environment's rewards
    summed; ``R``: GiGPO's R(τ), what A^E compares (the invalid-action penalty included in the
    default "reward" penalty mode; in "row" mode the penalty is on the invalid rows, not in R).
    ``id`` = "<group>/<index>" (a skill's `sources` use it), "+skill" for a skill-guided trajectory."""
    steps = []
    for k, s in enumerate(t.steps):
        row = {"obs": s.obs, "response": s.text, "action": s.action, "valid": s.valid, "reward": s.reward,
               "anchor": s.anchor}
        if adv is not None:
            row.update(A_E=episode[k], A_S=step[k], A=adv[k])
        if t.skill_id is not None:
            row["distilled"] = s.distilled
        steps.append(row)
    return {"id": f"{t.group}/{t.index}" + ("+skill" if t.skill_id else ""), "task_id": t.task_id,
            "task_type": t.task_type, "task": t.task, "group": t.group, "index": t.index, "skill_id": t.skill_id,
            "won": t.won, "return": t.reward_sum, **({"R": gigpo_return} if gigpo_return is not None else {}),
            "steps": steps}


def group_rows(trajs: list, cfg: gigpo.GiGPOConfig, n_groups: int, reference: list = ()) -> list[dict]:
    """trajectories.jsonl rows of the first ``n_groups`` task groups of ``trajs``, with the GiGPO
    advantages of each step as the update computed them (`gigpo.group_advantages` over the group,
    plus the ``reference`` trajectories of the same group key: Phase 2's paired plain rollouts when
    distill.advantage_reference=union)."""
    by_group: dict[str, list] = {}
    for t in trajs:
        by_group.setdefault(t.group, []).append(t)
    ref: dict[str, list] = defaultdict(list)
    for t in reference:
        ref[t.group].append(t)
    rows = []
    for group, members in list(by_group.items())[:n_groups]:
        every = members + ref[group]
        adv, parts = gigpo.group_advantages([[s.reward for s in t.steps] for t in every],
                                            [[s.valid for s in t.steps] for t in every],
                                            [[s.anchor for s in t.steps] for t in every], cfg)
        rows += [trajectory_row(t, adv[i], parts["episode"][i], parts["step"][i], parts["returns"][i])
                 for i, t in enumerate(members)]
    return rows


def warmup_iteration(policy, optimizer, envs, cfg: Config, state: RunState, seed: int, timing: dict) -> tuple[dict, list]:
    """Phase 0, one GiGPO iteration: B tasks × G rollouts → advantages → PPO update.

    Under torchrun every rank draws the same B task ids and plays its shard of them (whole
    groups, so Eq. 3-9 see every rollout of a group); the update sums gradients over ranks and
    the successful trajectories of all ranks go into every rank's buffer.
    Returns (metrics, trajectories.jsonl rows of run.log_groups groups).
    """
    rng = random.Random(seed)
    ids = train_task_ids(envs, cfg, rng, cfg.warmup.tasks_per_iter)
    t0 = time.perf_counter()
    trajs = rollout(policy, envs, distributed.shard(ids), cfg.gigpo.group_size, cfg.rollout, skill=None,
                    seed=distributed.rank_seed(seed), desc="warmup rollout")
    t1 = time.perf_counter()
    adv = gigpo.compute_advantages(trajs, cfg.gigpo)  # Eq. 3, 6-9
    samples = gigpo.samples_from(trajs, adv)
    stats = gigpo.update(policy, optimizer, samples, cfg.gigpo, seed=seed)
    t2 = time.perf_counter()
    add_timing(timing, t1 - t0, t2 - t1, stats)
    trajs = pooled(trajs)
    buffer = refill_buffer(state, trajs, cfg)
    out = success_stats(trajs, "warmup")
    out.update({f"warmup/{k}": v for k, v in stats.items()})
    out.update({"warmup/rollout_s": t1 - t0, "warmup/update_s": t2 - t1, "warmup/buffer": len(buffer)})
    return out, group_rows(trajs, cfg.gigpo, cfg.run.log_groups)


def distill_iteration(policy, optimizer, envs, bank, cfg: Config, state: RunState, seed: int, timing: dict) -> tuple[dict, list]:
    """Phase 2, one iteration: B tasks of every type, 2·B·G rollouts, GiGPO + λ·L_distill.

    Each task is played G times plain (seed s: GiGPO's group, and the utility baseline), and G
    more times: with its type's best validated skill (seed s, so the two groups are paired) when
    the bank has one, else plain again (seed s'). The plain groups train with the GiGPO loss, the
    skill-guided ones feed the distillation loss (selection filters, re-scored on the plain prompt).
    Our choice: with an empty bank this *is* the GiGPO-only control's iteration (2·B·G plain
    rollouts, same tasks and seeds), so the two arms spend the same budget and differ only where
    a skill was used; every task type keeps its RL. Plain successes refill the mining buffer
    (self-mining of the current policy). Under torchrun each rank plays its shard of the tasks.
    Each skill used records its tokens offered / past the utility filter / kept (`Skill.distilled`).
    Returns (metrics, trajectories.jsonl rows: run.log_groups plain groups and as many skill-guided ones).
    """
    rng = random.Random(seed)
    task_ids = train_task_ids(envs, cfg, rng, cfg.distill.tasks_per_iter)
    skills = {s.task_type: s for s in (bank.best(tt) for tt in bank.task_types()) if s is not None}
    mine = distributed.shard(task_ids)
    guided_ids = [t for t in mine if envs.task_type(t) in skills]
    extra_ids = [t for t in mine if envs.task_type(t) not in skills]
    seed_a, seed_b = distributed.rank_seed(seed), distributed.rank_seed(seed_of(seed, "second"))
    G = cfg.gigpo.group_size
    t0 = time.perf_counter()
    plain = rollout(policy, envs, mine, G, cfg.rollout, skill=None, seed=seed_a, desc="phase2 plain")
    extra = rollout(policy, envs, extra_ids, G, cfg.rollout, skill=None, seed=seed_b,
                    desc="phase2 plain (2nd)") if extra_ids else []
    guided = rollout(policy, envs, guided_ids, G, cfg.rollout, skill={tt: s.text() for tt, s in skills.items()},
                     seed=seed_a, desc="phase2 skill") if guided_ids else []
    t1 = time.perf_counter()
    trained = plain + extra
    samples = gigpo.samples_from(trained, gigpo.compute_advantages(trained, cfg.gigpo))  # Eq. 3, 6-9
    paired = [t for t in plain if t.task_id in guided_ids]
    dsamples, dmetrics = distill.distill_samples(guided, paired, cfg.gigpo, cfg.distill) if guided else ([], {})
    per_type = dmetrics.pop("per_type", {})
    stats = gigpo.update(policy, optimizer, samples + dsamples, cfg.gigpo, cfg.distill, seed=seed)
    t2 = time.perf_counter()
    add_timing(timing, t1 - t0, t2 - t1, stats)
    trained, guided = pooled(trained), pooled(guided)
    buffer = refill_buffer(state, trained, cfg)
    out = success_stats(trained, "distill")
    totals: dict = defaultdict(float, {"distill/tokens_kept": 0.0, "distill/tokens_offered": 0.0})
    for d in distributed.gather_objects([dmetrics]) if distributed.world_size() > 1 else [dmetrics]:
        for k, v in d.items():
            totals[k] += v
    out.update(totals)
    out["distill/skill_groups"] = len(guided) // G
    if guided:
        out["distill/skill_success"] = success_stats(guided, "x")["x/success"]
    out.update({f"distill/{k}": v for k, v in stats.items()})
    out.update({"distill/rollout_s": t1 - t0, "distill/update_s": t2 - t1, "distill/buffer": len(buffer)})
    for per in distributed.gather_objects([per_type]) if distributed.world_size() > 1 else [per_type]:
        for tt, counts in per.items():
            skills[tt].distilled.append({"round": state.round, **counts})
    rows = group_rows(trained, cfg.gigpo, cfg.run.log_groups)
    rows += group_rows(guided, cfg.gigpo, cfg.run.log_groups,
                       reference=pooled(paired) if cfg.distill.advantage_reference == "union" else [])
    return out, rows

# ---------------------------------------------------------------------------------------
# The run: a fixed list of units, run in order, checkpointed after each
# ---------------------------------------------------------------------------------------


class Unit(typing.NamedTuple):
    """One step of the run: a phase, its index inside the phase, and the branch it belongs to
    ("" before the branches split at the end of the warmup)."""
    phase: typing.Literal["eval", "coldstart", "warmup", "mining", "distill"]
    index: int
    arm: str = ""
    stage: str = ""  # eval units: the row of results.md ("base", "coldstart", "warmup", or the arm)


def build_units(cfg: Config) -> list[Unit]:
    """The run as a flat list of units, in order: the shared trunk (evaluation, cold start,
    warmup), then each arm of run.arms from the warmup checkpoint, each ending in its evaluation."""
    units = [Unit("eval", 0, stage="base")]
    if cfg.coldstart.enabled == "on" or (cfg.coldstart.enabled == "auto" and cfg.model.name == "tiny"):
        units += [Unit("coldstart", 0), Unit("eval", 0, stage="coldstart")]
    units += [Unit("warmup", i) for i in range(cfg.warmup.iterations)]
    units += [Unit("eval", 0, stage="warmup")]
    for arm in cfg.run.arms:
        mines = arm != "gigpo" and cfg.run.ablation != "no_mining"
        for r in range(cfg.run.rounds):
            # gigpo / no_mining: the same update iterations with an empty skill bank = plain GiGPO
            units += [Unit("mining", r, arm)] if mines else []
            units += [Unit("distill", r * cfg.distill.iterations + i, arm) for i in range(cfg.distill.iterations)]
        units += [Unit("eval", 0, arm, stage=arm)]
    return units


def unit_seed(cfg: Config, unit: Unit) -> int:
    """Seed of a unit: a hash of (run.seed, phase, index), the same in every arm, so that the arms
    draw the same tasks and rollout seeds (paired); evaluations all use one seed (the same episodes)."""
    return seed_of(cfg.run.seed, "eval" if unit.phase == "eval" else (unit.phase, unit.index))


@dataclass
class RunState:
    """What a checkpoint holds besides the weights, the optimiser and the random state: where the
    run is, and what later units need from earlier ones."""

    config: dict
    """the resolved config as a dict (a resume with other settings is refused, `check_resume`)"""
    done: int = 0
    """units finished (`build_units`); --resume continues at this one"""
    buffer: list = field(default_factory=list)
    """the won plain trajectories Phase 1 summarises (the newest warmup.buffer_size, `refill_buffer`)"""
    evals: dict = field(default_factory=dict)
    """stage -> its evaluation metrics (a row of results.md)"""
    outcomes: dict = field(default_factory=dict)
    """stage -> its evaluation episodes' outcomes (`evaluate`), for the paired differences"""
    timing: dict = field(default_factory=lambda: defaultdict(float))
    """phase -> wall seconds, summed"""
    arm: str = ""
    """the branch the last unit belonged to ("" before the branches split)"""
    branch: dict | None = None
    """the branch point every arm starts from (`enter_arm`): training state and buffer after the warmup"""
    banks: dict = field(default_factory=dict)
    """arm -> its mining.SkillBank"""
    skipped_streak: int = 0
    """consecutive optimiser steps skipped for non-finite numbers (`check_skipped`)"""
    round: int = 0
    """the SIRI round of the current Phase 2 iteration"""


def run_unit(unit: Unit, seed: int, policy, optimizer, envs, cfg: Config, state: RunState,
             run_dir: Path) -> tuple[dict, list[dict]]:
    """One unit of the run: its metrics (a metrics.jsonl row) and its trajectories.jsonl rows."""
    bank = state.banks.get(unit.arm)
    if unit.phase == "eval":
        t0 = time.perf_counter()
        values, state.outcomes[unit.stage] = evaluate(policy, envs, cfg, seed=seed)
        state.timing["eval"] += time.perf_counter() - t0
        state.evals[unit.stage] = values
        return values, []
    if unit.phase == "coldstart":  # torchrun: rank 0 trains, every rank receives its weights
        values = {}
        if distributed.is_main():
            values = coldstart(policy, envs, cfg, seed)
            policy.save_base_weights(run_dir / COLDSTART_DIR)
        distributed.broadcast_params([p for n, p in policy.model.named_parameters() if "lora_" not in n])
        return values, []
    if unit.phase == "warmup":
        values, rows = warmup_iteration(policy, optimizer, envs, cfg, state, seed, state.timing)
        if cfg.warmup.eval_every and (unit.index + 1) % cfg.warmup.eval_every == 0 \
                and unit.index + 1 < cfg.warmup.iterations:
            values.update(evaluate(policy, envs, cfg, seed=unit_seed(cfg, Unit("eval", 0)))[0])
        return values, rows
    if unit.phase == "mining":
        t0 = time.perf_counter()
        mcfg = dataclasses.replace(cfg.mining, summariser="random") if unit.arm == "siri_random" else cfg.mining
        values = mining.mine_round(policy, envs, state.buffer, bank, unit.index, mcfg, cfg.rollout,
                                   seed=seed, bank_dir=bank.dir, pool=training_pool(envs, cfg),
                                   split_seed=cfg.run.seed)
        state.timing["mining"] += time.perf_counter() - t0
        by_id = {f"{t.group}/{t.index}": t for t in state.buffer}  # the new skills' sources
        rows = [trajectory_row(by_id[i]) for s in bank.skills if s.round == unit.index
                for i in s.sources if i in by_id]
        write_skill_story(bank, unit.index, run_dir)
        return values, rows
    state.round = unit.index // cfg.distill.iterations  # "distill"
    values, rows = distill_iteration(policy, optimizer, envs, bank, cfg, state, seed, state.timing)
    if bank.skills and (unit.index + 1) % cfg.distill.iterations == 0:
        write_skill_story(bank, state.round, run_dir)
    return values, rows


def enter_arm(policy, optimizer, state: RunState, arm: str, run_dir: Path, cfg: Config) -> None:
    """Start a branch from the warmup checkpoint (the *branch point*): the first arm records it
    (trainable weights, optimiser, RNG, mining buffer), every later arm restores it, so all arms
    start from the same policy, optimiser moments, random state and buffer. Each arm has its own
    skill bank (skills/ for siri, skills_<arm>/ otherwise), started from mining.initial_bank (empty for
    the GiGPO-only control) and kept in the checkpoint: a resume never reads stray bank files."""
    if state.branch is None:
        state.branch = {**training_state(policy, optimizer), "buffer": list(state.buffer)}
    else:
        restore_training_state(policy, optimizer, state.branch)
        state.buffer = list(state.branch["buffer"])
    state.arm = arm
    folder = str(run_dir / ("skills" if arm == "siri" else f"skills_{arm}"))
    if arm not in state.banks:
        start = cfg.mining.initial_bank if arm != "gigpo" else ""
        state.banks[arm] = mining.SkillBank(folder, mining.SkillBank.load(start).skills if start else [])


def check_skipped(state: RunState, values: dict, unit: Unit, cfg: Config) -> None:
    """Count consecutive optimiser steps skipped for non-finite numbers, across units; stop the run
    at run.max_skipped_updates. A skipped step changes no weight, so the last checkpoint's are finite."""
    get = lambda key: values.get(f"{unit.phase}/{key}", 0)  # noqa: E731
    streak = state.skipped_streak + get("skipped_leading")  # the run of skips before the first step
    if get("optimizer_steps") and not (cfg.run.max_skipped_updates and streak >= cfg.run.max_skipped_updates):
        streak = get("skipped_trailing")  # a step was taken: only the skips after the last one count on
    state.skipped_streak = streak
    if cfg.run.max_skipped_updates and state.skipped_streak >= cfg.run.max_skipped_updates:
        raise RunError(f"{state.skipped_streak} consecutive updates skipped for a non-finite loss or gradient "
                       f"at unit {state.done} ({unit.phase}); lower gigpo.lr (now {cfg.gigpo.lr}) and start again, "
                       f"or --resume from the last checkpoint with run.max_skipped_updates=0 to carry on")


def write_skill_story(bank, round_idx: int, run_dir: Path) -> None:
    """skills/round_NN.md (`mining.SkillBank.story`), rewritten after the round's mining and again
    after its Phase 2 iterations. Rank 0 only."""
    if distributed.is_main():
        atomic_write(Path(bank.dir) / f"round_{round_idx:02d}.md", bank.story(round_idx))


def make_optimizer(policy, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in policy.model.parameters() if p.requires_grad]
    if not params:
        raise SystemExit("the policy has no trainable parameters; check model.lora_* settings")
    return torch.optim.AdamW(params, lr=cfg.gigpo.lr, weight_decay=cfg.gigpo.weight_decay)


def corpus_for_tokenizer(envs, n_tasks: int = 24, think: str = "plan") -> list[str]:
    """Environment text the tiny model's tokenizer is trained on: prompts and expert answers."""
    texts = []
    skill_example = mining.corpus_examples()[-1]
    ids = envs.task_ids("train")[:n_tasks] + envs.task_ids("eval")[:n_tasks]
    start = initial_states(envs, ids)
    played = demonstrations(envs, ids, [start_expert(st, envs.walkthrough(t), [], None) for t, st in zip(ids, start)])
    for state, (demo, _) in zip(start, played):
        if not demo:  # no expert walkthrough (real WebShop): the task's first prompt alone
            demo = [(state, [], state.admissible[0] if state.admissible else "")]
        for state, history, action in demo:
            texts.append(envs.build_prompt(state, history))
            texts.append(envs.build_prompt(state, history, skill=skill_example))
            texts.append(f"<think>{think}</think><action>{action}</action>")
    texts.extend(mining.corpus_examples())
    return texts


def run(cfg: Config, run_dir: Path, resume: bool, progress: dict) -> dict:
    """The run: start-up, then every unit in order (`build_units`), checkpointed; the report at the end.
    ``progress``: "done", units finished so far, and "checkpoint", units in the last checkpoint (the
    error message of a dead env worker says where --resume continues)."""
    # torchrun (WORLD_SIZE > 1): join the process group; rank 0 alone writes files. One process: no-op.
    started_group = distributed.init(cfg.run.device)
    is_main = distributed.is_main()
    threads = torch.get_num_threads()  # restored at the end: main() may be called in-process (tests)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)

    if not is_main:
        distributed.barrier()  # rank 0 first: it fills the game and tiny-model caches the others read
    envs = make_envs(cfg.env)
    try:
        for split in ("train", "eval"):
            envs.task_ids(split)  # embedded ALFWorld: generates and caches the games on first call
        policy = load_policy(cfg.model, device=distributed.device(cfg.run.device),
                             corpus=lambda: corpus_for_tokenizer(envs, think=cfg.coldstart.think))
        if is_main:
            distributed.barrier()
        # start-up succeeded: only now does the run folder get written (and locked)
        lock = None
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run_dir(run_dir)
            found = previous_artefacts(run_dir)
            if found and not resume:  # checked again under the lock: another run may have started
                raise RunError(f"{run_dir} holds a previous run ({', '.join(found)}); pass --resume or choose run.out_dir=...")
        return run_units(cfg, run_dir, resume, progress, envs, policy, started_group, lock)
    finally:
        envs.close()
        torch.set_num_threads(threads)


def start_state(cfg: Config, run_dir: Path, resume: bool, policy, optimizer, units: list[Unit], metrics: Metrics,
                trajectories: Metrics) -> RunState:
    """The state the run starts from: the checkpoint's with --resume (weights, optimiser and random
    state restored in place; the logs cut back to it), else a fresh one (fresh logs, config.yaml
    written, every rank's adapter made equal to rank 0's). Also puts back the cold-started base
    weights when the checkpoint is past the cold start."""
    is_main = distributed.is_main()
    coldstart_dir = run_dir / COLDSTART_DIR
    state = RunState(config=dataclasses.asdict(cfg))
    loaded = None
    if resume:
        try:
            loaded = load_checkpoint(run_dir, policy, optimizer)
        except ModuleNotFoundError as e:  # pickled Trajectories of a version that had policy.py
            raise RunError(f"--resume: the checkpoint in {run_dir} was written by an earlier version of this code "
                           f"(it needs the module {e.name!r}); finish it with that version or start a new run.out_dir"
                           ) from None
        except Exception as e:  # any damage (truncated, garbled): the message says what to do
            raise RunError(f"--resume: the checkpoint in {run_dir} cannot be read ({type(e).__name__}: {e}); "
                           "it is damaged: start a new run.out_dir") from None
        seen = distributed.all_reduce_sum([loaded is not None])[0]
        if 0 < seen < distributed.world_size():
            raise RunError(f"--resume: only {seen:.0f} of {distributed.world_size()} ranks can read "
                           f"{run_dir}/checkpoint; put run.out_dir on a filesystem every node shares")
        if is_main:
            check_resume(run_dir, loaded, cfg)
        if loaded is None:
            print(f"--resume: no checkpoint in {run_dir}, starting from the beginning")
        else:
            state = loaded
            metrics.truncate(state.done)
            trajectories.truncate(state.done)
            print(f"resumed at unit {state.done}/{len(units)} ({units[min(state.done, len(units) - 1)]})")
    # the cold-started base counts only if the checkpoint is past the cold start (a kill between
    # saving it and the next checkpoint re-runs the cold start from the base model it started from)
    cold = next((i for i, u in enumerate(units) if u.phase == "coldstart"), None)
    if cold is not None and state.done > cold and (coldstart_dir / "COMPLETE").exists():
        policy.load_base_weights(coldstart_dir)
    elif is_main and coldstart_dir.exists():
        shutil.rmtree(coldstart_dir)
    if loaded is None:  # a fresh start: fresh metrics, trajectories and settings file
        metrics.truncate(0)
        trajectories.truncate(0)
        if is_main:
            atomic_write(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        distributed.broadcast_params([p for p in policy.model.parameters() if p.requires_grad])  # one start
    return state


def run_units(cfg: Config, run_dir: Path, resume: bool, progress: dict, envs, policy, started_group: bool,
              lock) -> dict:
    """Every unit from where the run stands (`start_state`) to the end: `run_unit`, its logs, a
    checkpoint after every run.checkpoint_every units and at each phase's end; Ctrl-C finishes the
    unit, saves and exits with 130. Then curves.png and results.md. `lock` (the run folder's) is
    held until this returns."""
    is_main = distributed.is_main()
    metrics = Metrics(run_dir, cfg.run.tensorboard)
    trajectories = Metrics(run_dir, False, "trajectories.jsonl")
    units = build_units(cfg)
    optimizer = make_optimizer(policy, cfg)
    state = start_state(cfg, run_dir, resume, policy, optimizer, units, metrics, trajectories)
    progress["done"] = progress["checkpoint"] = state.done

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True
        print("\ninterrupt: finishing the current unit, then saving a checkpoint and exiting")

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    t_start = time.perf_counter()
    bar = tqdm(total=len(units), initial=state.done, desc="siri", position=0)
    stop = False
    try:
        while state.done < len(units):
            unit = units[state.done]
            seed = unit_seed(cfg, unit)
            if unit.arm and unit.arm != state.arm:  # a branch starts from the warmup checkpoint
                enter_arm(policy, optimizer, state, unit.arm, run_dir, cfg)
            values, rows = run_unit(unit, seed, policy, optimizer, envs, cfg, state, run_dir)
            if unit.phase in ("warmup", "distill"):
                check_skipped(state, values, unit, cfg)
            metrics.log(state.done, unit.phase, values, arm=unit.arm)
            trajectories.log_rows(state.done, unit.phase, rows, arm=unit.arm)
            state.done += 1
            progress["done"] = state.done
            bar.update(1)
            phase_end = state.done == len(units) or units[state.done][:1] != unit[:1]
            stop = distributed.all_reduce_sum([interrupted["flag"]])[0] > 0  # a Ctrl-C on any rank stops all
            if is_main and (state.done % cfg.run.checkpoint_every == 0 or phase_end or stop):
                save_checkpoint(run_dir, policy, optimizer, state)
                progress["checkpoint"] = state.done
            if stop:
                print(f"saved checkpoint at unit {state.done}; continue with --resume")
                break
    finally:
        bar.close()
        signal.signal(signal.SIGINT, old_handler)

    if stop:  # interrupted: no report for an unfinished run
        if started_group:
            distributed.destroy()
        raise SystemExit(130)
    state.timing["total_this_session"] = time.perf_counter() - t_start
    result = {"evals": state.evals, "done": state.done, "units": len(units), "timing": dict(state.timing),
              "outcomes": state.outcomes}
    if not is_main:  # rank 0 writes the report
        if started_group:
            distributed.destroy()
        return result
    rows = metrics.rows()
    plot_curves(rows, run_dir / "curves.png")
    report = write_report(cfg, state, rows)
    atomic_write(run_dir / "results.md", report)
    print(report)
    if started_group:
        distributed.destroy()
    return result

# ---------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------

COLDSTART_DIR = "coldstart_model"  # the cold-started base weights, in the transformers layout

RUN_ARTEFACTS = ("checkpoint", "checkpoint.old", "checkpoint.new", "metrics.jsonl", COLDSTART_DIR,
                 "results.md", "skills")

# what a resume may change: where and how the run executes, not what it computes
SAFE_ON_RESUME = {"run.threads", "run.tensorboard", "run.device", "run.checkpoint_every",
                  "run.max_skipped_updates", "run.log_groups", "run.out_dir", "env.num_workers", "env.start_method"}


class RunError(RuntimeError):
    """An expected failure a user can fix (the run folder, a checkpoint, diverged training); `main`
    prints its message as one line and exits with code 1."""


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(policy, optimizer) -> dict:
    """Trainable weights (copies), optimiser state and RNG: what a checkpoint and a branch point hold."""
    return {"trainable": {n: p.detach().cpu().clone() for n, p in policy.model.named_parameters() if p.requires_grad},
            "optimizer": copy.deepcopy(optimizer.state_dict()), "rng": rng_state()}


def restore_training_state(policy, optimizer, blob: dict) -> None:
    """Put back what `training_state` captured."""
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for n, t in blob["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(copy.deepcopy(blob["optimizer"]))
    set_rng_state(blob["rng"])


def save_checkpoint(run_dir: Path, policy, optimizer, state: RunState) -> None:
    """Checkpoint = adapter + trainable weights + optimiser + RNG + loop state, swapped in atomically.

    Written into ``checkpoint.new/`` and renamed over ``checkpoint/``: a kill at any moment
    leaves either the previous or the new checkpoint complete.
    """
    final, new, old = run_dir / "checkpoint", run_dir / "checkpoint.new", run_dir / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    policy.save(new / "adapter")  # save_pretrained: loadable by PeftModel.from_pretrained
    torch.save(training_state(policy, optimizer), new / "training.pt")
    (new / "state.pkl").write_bytes(pickle.dumps(vars(state)))  # a plain dict: loads wherever siri is imported
    (new / "COMPLETE").write_text("ok")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, policy, optimizer) -> RunState | None:
    """Restore the newest complete checkpoint; returns the loop state, or None if there is none.
    The loop state is read first: a checkpoint that cannot be read fails before any weight changes."""
    for name in ("checkpoint", "checkpoint.old"):
        ckpt = run_dir / name
        if (ckpt / "COMPLETE").exists():
            state = RunState(**pickle.loads((ckpt / "state.pkl").read_bytes()))
            restore_training_state(policy, optimizer, torch.load(ckpt / "training.pt", weights_only=False))
            return state
    return None


def config_changes(saved: dict, current: dict) -> list[str]:
    """"key: old -> new" for every setting a resume would change that is not in SAFE_ON_RESUME.
    A key the saved config lacks (a run of an earlier version) counts as its default in `Config()`,
    the value that keeps what that version did (e.g. rollout.constrain_actions=false)."""
    a, b = {**flat(dataclasses.asdict(Config())), **flat(saved)}, flat(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in SAFE_ON_RESUME]


def previous_artefacts(run_dir: Path) -> list[str]:
    """Names in run_dir that a run writes (checkpoints, metrics, skill banks, the report)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name in RUN_ARTEFACTS or p.name.startswith("skills"))


def lock_run_dir(run_dir: Path):
    """An exclusive lock on run_dir/.lock for the life of the process (released when it ends, even
    on kill -9); a second run on the same folder stops here."""
    handle = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunError(f"another run is using {run_dir} (it holds {run_dir}/.lock); wait for it or choose "
                       "run.out_dir=...") from None
    return handle


def check_resume(run_dir: Path, state: RunState | None, cfg: Config) -> None:
    """Refuse a resume that would mix runs: metrics without a checkpoint, metrics that end before the
    checkpoint, or a changed setting (the list of changes is in the message)."""
    rows = Metrics(run_dir, False).rows() if (run_dir / "metrics.jsonl").exists() else []
    if state is None:
        if any(r["unit"] > 0 for r in rows):  # unit 0 (the base evaluation) ends with the first checkpoint
            raise RunError(f"--resume: {run_dir} has metrics for {len(rows)} units but no complete checkpoint; "
                           "it cannot be continued: start afresh with another run.out_dir")
        return
    done_rows = {r["unit"] for r in rows}
    if not all(u in done_rows for u in range(state.done)):
        raise RunError(f"--resume: {run_dir}/metrics.jsonl and its checkpoint disagree (checkpoint at unit "
                       f"{state.done}, metrics for {len(done_rows)} units); it is not this run's folder")
    if state.config:
        changes = config_changes(state.config, dataclasses.asdict(cfg))
        if changes:
            raise RunError("--resume with a changed config would mix two runs; resume with the original "
                           f"settings ({run_dir}/config.yaml) or start a new run.out_dir. Changed: " + "; ".join(changes))

# ---------------------------------------------------------------------------------------
# Logs and report: metrics.jsonl, trajectories.jsonl, results.md, curves.png
# ---------------------------------------------------------------------------------------


class Metrics:
    """A JSONL file of the run with one or more rows per unit: metrics.jsonl (keys namespaced by
    phase; TensorBoard opt-in) or trajectories.jsonl (`log_rows`). A unit's rows are appended after
    the unit; on resume, rows of units past the checkpoint are dropped, so none is ever doubled.
    Under torchrun only rank 0 writes; on the other ranks log/truncate do nothing."""

    def __init__(self, run_dir: Path, tensorboard: bool, name: str = "metrics.jsonl"):
        self.path = run_dir / name
        self.tb = None
        self.writer = distributed.is_main()
        if tensorboard and self.writer:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, unit: int, phase: str, values: dict, arm: str = "") -> None:
        if not self.writer:
            return
        row = {"unit": unit, "phase": phase, **({"arm": arm} if arm else {}), "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, unit)

    def log_rows(self, unit: int, phase: str, rows: list[dict], arm: str = "") -> None:
        """Append rows (trajectories.jsonl), each tagged with the unit, phase and arm."""
        if not self.writer or not rows:
            return
        with open(self.path, "a") as f:
            f.write("".join(json.dumps({"unit": unit, "phase": phase, "arm": arm, **r}) + "\n" for r in rows))

    def truncate(self, units_done: int) -> None:
        """On resume: drop rows of units that were logged but not checkpointed (they run again)."""
        if not self.writer:
            return
        kept = [r for r in self.rows() if r["unit"] < units_done]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

STAGE_LABELS = {"base": "base model", "coldstart": "after cold start", "warmup": "after GiGPO warmup", **ARMS}


def results_table(evals: dict[str, dict], model_name: str = "tiny") -> str:
    """Markdown table: success per task type and overall, one row per evaluated stage. The base
    row names the model when it is not the tiny one built here (a hub id, or a saved cold-started
    model that `seeds.py` shares between seeds)."""
    types = sorted({k.split("/", 2)[2] for e in evals.values() for k in e if k.startswith("eval/success/")})
    head = "| stage | " + " | ".join(types) + " | overall | steps | invalid |\n"
    head += "|---" * (len(types) + 4) + "|\n"
    rows = []
    for name, e in evals.items():
        cells = [f"{e.get(f'eval/success/{t}', float('nan')):.3f}" for t in types]
        label = STAGE_LABELS.get(name, name)
        if name == "base" and model_name != "tiny":
            label += f" ({model_name})"
        rows.append(f"| {label} | " + " | ".join(cells) +
                    f" | {e['eval/success']:.3f} | {e['eval/steps']:.1f} | {e['eval/invalid_rate']:.3f} |")
    return head + "\n".join(rows) + "\n"


def paired_difference(a: list[tuple], b: list[tuple], level: float = 0.9, seed: int = 0) -> dict:
    """Success of stage a − stage b on the same eval episodes (outcomes from `evaluate`), with a
    paired-bootstrap interval (`mining.paired_bootstrap_ci`), overall and per task type."""
    if [k[:2] for k in a] != [k[:2] for k in b]:
        raise ValueError("the two stages were not evaluated on the same episodes")
    wa, wb = [float(k[2]) for k in a], [float(k[2]) for k in b]
    out = {"all": (mining.delta_g(wa, wb), *mining.paired_bootstrap_ci(wa, wb, level, 2000, seed), len(wa))}
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(a):
        by_type[k[3]].append(i)
    for tt, idx in sorted(by_type.items()):
        if len(by_type) > 1:
            xa, xb = [wa[i] for i in idx], [wb[i] for i in idx]
            out[tt] = (mining.delta_g(xa, xb), *mining.paired_bootstrap_ci(xa, xb, level, 2000, seed), len(idx))
    return out


def write_report(cfg: Config, state: RunState, rows: list[dict]) -> str:
    """results.md: the success table, the arms against the GiGPO-only control (paired interval over
    eval episodes), the skills of every mining round, Phase 2's distilled tokens, and timings."""
    report = f"# Results ({cfg.preset} preset, env {cfg.env.name}/{cfg.env.source}, seed {cfg.run.seed})\n\n"
    report += results_table(state.evals, cfg.model.name) + "\n"
    outcomes = state.outcomes
    if "gigpo" in outcomes:
        report += ("## Against the GiGPO-only control\n\nSame warmup checkpoint, same update iterations, "
                   "rollouts and seeds; difference in eval success on the same episodes, with a paired "
                   "bootstrap 90 % interval.\n\n| arm − GiGPO | Δ success | 90 % interval | episodes |\n|---|---|---|---|\n")
        for arm in [a for a in cfg.run.arms if a != "gigpo" and a in outcomes]:
            for key, (d, lo, hi, n) in paired_difference(outcomes[arm], outcomes["gigpo"]).items():
                report += f"| {arm} ({key}) | {d:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {n} |\n"
        report += "\n"
    for arm, bank in state.banks.items():
        if bank.skills:
            folder = Path(bank.dir).name
            stories = ", ".join(f"[round {r}]({folder}/round_{r:02d}.md)" for r in range(cfg.run.rounds)
                                if (Path(bank.dir) / f"round_{r:02d}.md").exists())
            report += f"## Skills ({arm})\n\n" + bank.markdown() + "\n\n"
            report += f"Each skill's story (sources, text, paired outcomes, distilled tokens): {stories}\n\n" if stories else ""
    per_iter = [r for r in rows if r.get("phase") == "distill" and r.get("arm", "") != "gigpo"]
    if per_iter:
        report += ("## Phase 2, per iteration\n\n| arm | iteration | skill groups | tokens offered | tokens kept "
                   "| trajectories kept | plain success | skill success |\n|---|---|---|---|---|---|---|---|\n")
        for r in per_iter:
            report += (f"| {r.get('arm', '')} | {r['unit']} | {r.get('distill/skill_groups', 0)} | "
                       f"{r.get('distill/tokens_offered', 0):.0f} | {r.get('distill/tokens_kept', 0):.0f} | "
                       f"{r.get('distill/trajectories_kept', 0):.0f} | {r['distill/success']:.3f} | "
                       f"{r.get('distill/skill_success', float('nan')):.3f} |\n")
        report += "\n"
    report += "Timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in state.timing.items()) + "\n"
    return report


def plot_curves(rows: list[dict], path: Path) -> None:
    """One PNG: training success/return over all units, eval success, phases marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series = {("warmup", ""): "tab:blue", ("distill", "gigpo"): "tab:purple", ("distill", "siri"): "tab:green",
              ("distill", "siri_random"): "tab:red", ("distill", ""): "tab:green"}
    for (phase, arm), color in series.items():
        mine = [r for r in rows if r.get("phase") == phase and r.get("arm", "") == arm]
        name = f"{phase} {arm}".strip()
        pts = [(r["unit"], r[f"{phase}/success"]) for r in mine if f"{phase}/success" in r]
        if pts:
            ax1.plot(*zip(*pts), "o-", color=color, label=f"{name} success (train rollouts)")
        pts = [(r["unit"], r[f"{phase}/return"]) for r in mine if f"{phase}/return" in r]
        if pts:
            ax2.plot(*zip(*pts), "o-", color=color, label=f"{name} mean return")
    ev = [(r["unit"], r["eval/success"]) for r in rows if "eval/success" in r]
    if ev:
        ax1.plot(*zip(*ev), "s--", color="black", label="eval success (plain prompt)")
    for r in rows:
        if r.get("phase") == "mining":
            for ax in (ax1, ax2):
                ax.axvline(r["unit"], color="tab:orange", alpha=0.4, linestyle=":")
    ax1.set(xlabel="unit (iteration / mining round)", ylabel="success rate", ylim=(-0.02, 1.02),
            title="success (orange lines: mining rounds)")
    ax2.set(xlabel="unit", ylabel="return", title="mean episode return")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)

# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Command line: parse, load the config, run; an expected error is one line and exit code 1,
    an interrupt (Ctrl-C) saves a checkpoint and exits with 130."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["show"]:  # python siri.py show run.out_dir=DIR [unit=N] [group=K]
        show.main(argv[1:])
        return {}
    if argv[:1] == ["export"]:  # python siri.py export run.out_dir=DIR [--merged] [out=PATH]
        try:
            return {"export": str(export(argv[1:]))}
        except (ConfigError, RunError, ModelLoadError, OSError) as e:
            raise SystemExit(f"error: {e}")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML overrides (default: config.yaml next to siri.py)")
    parser.add_argument("--resume", action="store_true", help="continue from run.out_dir/checkpoint")
    parser.add_argument("--write-config", action="store_true", help="regenerate config.yaml from the defaults and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. warmup.iterations=5")
    args = parser.parse_args(argv)
    if args.write_config:
        atomic_write(Path(__file__).with_name("config.yaml"), config_reference())
        raise SystemExit(0)
    config_path = args.config or str(Path(__file__).with_name("config.yaml"))
    if args.config is None and not Path(config_path).exists():
        config_path = None
    try:
        cfg = load_config(config_path, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    run_dir = Path(cfg.run.out_dir)
    found = previous_artefacts(run_dir)
    if found and not args.resume:
        raise SystemExit(f"error: {run_dir} holds a previous run ({', '.join(found)}); pass --resume to continue it "
                         "or choose run.out_dir=...")
    progress = {"done": 0}
    try:
        return run(cfg, run_dir, args.resume, progress)
    except (RunError, ModelLoadError, WebShopNotInstalled, OSError) as e:
        raise SystemExit(f"error: {e}")
    except EnvWorkerDied as e:
        raise SystemExit(f"error: {e}; `--resume` continues from unit {progress.get('checkpoint', 0)}")


def export(argv: list[str]) -> Path:
    """``python siri.py export run.out_dir=DIR [--merged] [out=PATH]``: the run's final policy as a
    folder that transformers loads with no project code (default out: DIR/export).

    Without --merged: the base model (cold-started if the run had a cold start) in the transformers
    layout, and adapter/ beside it, whose adapter_config.json names that folder by absolute path:
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out + "/adapter")`.
    With --merged: the adapter folded into the weights, `AutoModelForCausalLM.from_pretrained(out)`.
    The base is the one the checkpoint's adapter names (the cold-started base, or the run's model);
    a QLoRA run's base is loaded unquantised (the adapter applies unchanged). `out` must be a new
    folder or an earlier export (it holds EXPORTED), never the run or a folder above it.
    """
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "run.out_dir" not in args:
        raise SystemExit("usage: python siri.py export run.out_dir=DIR [--merged] [out=PATH]")
    run_dir = Path(args["run.out_dir"])
    if not (run_dir / "checkpoint" / "COMPLETE").exists():
        raise RunError(f"{run_dir} has no complete checkpoint to export")
    out = Path(args.get("out", run_dir / "export"))
    if out.resolve() in (run_dir.resolve(), *run_dir.resolve().parents) or \
            (out.exists() and not (out / "EXPORTED").exists()):
        raise RunError(f"out={out} exists and is not an earlier export (or it holds the run); choose a new folder")
    cfg = load_config(str(run_dir / "config.yaml"), ["mining.initial_bank="])  # the bank file may have moved
    adapter_cfg = json.loads((run_dir / "checkpoint" / "adapter" / "adapter_config.json").read_text())
    base = adapter_cfg["base_model_name_or_path"]  # absolute: the cold-started base or the run's model
    policy = load_policy(dataclasses.replace(cfg.model, name=base, qlora=False), device="cpu")
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for name, tensor in torch.load(run_dir / "checkpoint" / "training.pt", weights_only=False)["trainable"].items():
            params[name].copy_(tensor)
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        if "--merged" in argv:
            merged = policy.model.merge_and_unload()
            merged.save_pretrained(tmp)
        else:
            policy.model.get_base_model().save_pretrained(tmp, state_dict=policy.base_state_dict())
            policy.set_base_path(str(out))
            policy.model.save_pretrained(tmp / "adapter")
        policy.tokenizer.save_pretrained(tmp)
        atomic_write(tmp / "EXPORTED", f"{run_dir.resolve()}\n")
    print(f"exported {'merged model' if '--merged' in argv else 'base model + adapter/'} to {out}")
    return out


if __name__ == "__main__":
    main()
