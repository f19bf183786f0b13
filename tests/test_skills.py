"""Tests that would catch an inert SIRI: skills that carry knowledge help a model that reads them,
random skills are not kept, validation pairs its arms, and distillation moves the plain policy.

One tiny model is cold-started here (module fixture) the way `python siri.py` does it: search
demonstrations with plain prompts, and the same tasks with a skill block that names one place of
the room, right or wrong, searched there first (siri.coldstart_texts). The controls are
measured on tasks of its cold start (the tiny model plays unseen games too poorly to measure a
difference in a test): it knows how to play them, but each demonstration searched in a random
order, so only a skill can tell it where to look first; 10 steps make a long search fail.
Sampling at temperature 0.4 (the evaluation temperature) keeps the measurements steady.
The fixture's cold start is the preset's but smaller (24 games x 15 epochs): half of the rows in
renamed rooms, whole-number tokens, actions kept admissible. Measured with this version's prompt
(skill block before the task, envs.PROMPT), right / wrong / plain 25 / 13 / 11 wins of 32, and
the random skill Δg 0.000 [-0.094, +0.094] on 32 pairs. Until this version the fixture kept
the settings its controls had first been measured with (no renamed rows, Qwen2's digit split,
free actions), because with the block after the task the preset's settings left a model that
won 2 of 32 plain; with this version's prompt those old settings give a model that knows its
games by heart (plain 28 of 32), so the right skill can only send it elsewhere (23 / 15 / 28),
and with only the constraint on 31 / 22 / 22 but a random skill at Δg +0.094, which the
paper's rule would keep (README, "What the toy can and cannot show").
"""
import dataclasses

import pytest
import torch

import agent
import config
import core
import gigpo
import mining
import model
import siri
from envs import make_envs

SETTING = {
    "env.alfworld.receptacles": 6, "env.alfworld.distractors": 1, "env.max_steps": 10, "env.alfworld.num_train_tasks": 24,
    "env.alfworld.eval_per_type": 1, "env.num_workers": 0, "coldstart.tasks": 24, "coldstart.epochs": 15,
    "mining.trajectories_per_skill": 3, "gigpo.group_size": 8, "rollout.temperature": 0.4,
}


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """(policy, envs, cfg): a tiny model cold-started to read skill blocks."""
    cache = tmp_path_factory.mktemp("skills")
    torch.manual_seed(0)
    cfg = config.load_config(None, [f"{k}={v}" for k, v in SETTING.items()] +
                           [f"env.alfworld.cache_dir={cache / 'games'}", f"model.tiny_dir={cache / 'tiny'}"])
    envs = make_envs(cfg.env)
    pol = model.load_policy(cfg.model, device="cpu",
                                 corpus=lambda: siri.corpus_for_tokenizer(envs, think=cfg.coldstart.think))
    siri.coldstart(pol, envs, cfg, seed=0)
    yield pol, envs, cfg
    envs.close()


def type_tasks(envs, task_type="pick_and_place_simple"):
    return [t for t in envs.task_ids("train") if envs.task_type(t) == task_type]


def answer_delta_g(pol, envs, cfg) -> tuple[float, float, float]:
    """Successes (right skill, wrong skill, no skill) summed over the train tasks of two types,
    each task validated with its own hand-written skill: one that names where its object is (so
    "Look first in:" is right for that task) and one that names a place where it is not. Paired:
    the three arms of a task share the seed (the plain rollouts are played once)."""
    right = wrong = plain = 0.0
    for tid in type_tasks(envs, "pick_and_place_simple") + type_tasks(envs, "look_at_obj_in_light"):
        tt = envs.task_type(tid)
        r = mining.validate(pol, envs, mining.answer_skill(envs, [tid], tt), [tid], 4, cfg.rollout, seed=7)
        w = mining.validate(pol, envs, mining.answer_skill(envs, [tid], tt, wrong=True), [tid], 4, cfg.rollout,
                            seed=7, baseline=r.baseline)
        right, wrong, plain = right + sum(r.with_success), wrong + sum(w.with_success), plain + sum(r.without_success)
    return right, wrong, plain


def test_a_skill_that_carries_the_answer_raises_success(reader):
    """Positive control: Δg > 0 for skills that name where each task's object is, and the right
    skill beats a wrong one. Measured on this fixture: right / wrong / plain 25 / 13 / 11 wins of
    32 (before this version's prompt and settings: 26 / 20 / 18, and 25 / 23 / 25 with seed 1;
    module docstring)."""
    pol, envs, cfg = reader
    right, wrong, plain = answer_delta_g(pol, envs, cfg)
    assert right > plain and right > wrong, (right, wrong, plain)


def test_random_skills_are_not_kept(reader):
    """Negative control: skills from the random summariser (the falsification control), their
    validation pairs pooled, are retired by the `confident` rule (no confident gain: the lower end
    of the paired 90 % interval is not above the margin). Four random skills (summariser seeds
    3-6), because one draw is a noisy control: its places are random places of the tasks' rooms,
    so a draw can name a validation task's answer by chance. Measured: with one draw (seed 3) the
    test read Δg 0.000 [-0.094, +0.094] on 32 pairs with an earlier scoring layout, then +0.156
    [+0.031, +0.281] with this one (float rounding changed the cold start), because that skill
    names task s6's object in its drawer: the draw, not the rule, decided. The four pooled: Δg
    +0.039 [-0.039, +0.125] on 128 pairs. Under the paper's rule
    (Δg > margin) a random skill is kept whenever noise puts its Δg above 0, which is what the
    seed table's random-skill arm measures at scale (README, "Seeds")."""
    pol, envs, cfg = reader
    tasks = type_tasks(envs)
    demos = [siri.demo_trajectory(t, "pick_and_place_simple", siri.demonstration(envs, t, [], None)[0])
             for t in tasks]
    with_s, without_s, keys, baseline = [], [], [], None
    for seed in (3, 4, 5, 6):
        fields, err = mining.parse_skill(mining.random_summary(demos, "pick_and_place_simple", seed=seed))
        skill = mining.Skill(**fields, task_type="pick_and_place_simple", summariser="random")
        res = mining.validate(pol, envs, skill, tasks, cfg.gigpo.group_size, cfg.rollout, seed=7, baseline=baseline)
        baseline = res.baseline
        with_s += res.with_success
        without_s += res.without_success
        keys += [(f"{k[0]}@{seed}", k[1]) for k in res.keys]
    pooled = mining.PairedResult("random", keys, with_s, without_s)
    probe = mining.Skill(name="random skills", task_type="pick_and_place_simple", when_to_use="", steps=[],
                         pitfalls=[], summariser="random")
    rec = mining.record_utility(probe, pooled, 0, cfg.mining, seed=0)
    assert rec["n_pairs"] == 4 * len(tasks) * cfg.gigpo.group_size
    assert mining.update_status(probe, rec, cfg.mining.margin, "confident") == "retired", rec


def test_validate_pairs_arms_on_the_same_seeds_and_only_skill_prompts_hold_the_skill(reader, monkeypatch):
    pol, envs, cfg = reader
    tasks = type_tasks(envs)[:2]
    skill = mining.answer_skill(envs, tasks, "pick_and_place_simple")
    calls = []
    real = agent.rollout

    def spy(policy, envs_, task_ids, group_size, sampling, skill=None, seed=0, desc=""):
        trajs = real(policy, envs_, task_ids, group_size, sampling, skill=skill, seed=seed, desc=desc)
        calls.append((skill, list(task_ids), seed, trajs))
        return trajs

    monkeypatch.setattr(agent, "rollout", spy)
    res = mining.validate(pol, envs, skill, tasks, 2, cfg.rollout, seed=11)
    (with_skill, ids_w, seed_w, trajs_w), (without, ids_p, seed_p, trajs_p) = calls
    assert with_skill == {skill.task_type: skill.text()} and without is None
    assert ids_w == ids_p == tasks and seed_w == seed_p == 11
    assert res.keys == sorted((t.task_id, t.index) for t in trajs_w) == sorted((t.task_id, t.index) for t in trajs_p)
    marker = "Found before:"
    decode = pol.tokenizer.decode
    assert all(marker in decode(s.prompt_ids) and marker not in decode(s.plain_prompt_ids)
               for t in trajs_w for s in t.steps)
    assert all(marker not in decode(s.prompt_ids) and s.plain_prompt_ids is None for t in trajs_p for s in t.steps)


def test_one_distillation_update_raises_the_plain_prompt_logprob_of_guided_actions(reader):
    """The plain-prompt log-probability of the distilled skill-guided actions rises after one
    update (a sign flip or an update that never reaches the plain context would lower or keep it)."""
    pol, envs, cfg = reader
    tasks = type_tasks(envs)
    skill = mining.answer_skill(envs, tasks, "pick_and_place_simple")
    guided = agent.rollout(pol, envs, tasks, 2, cfg.rollout, skill={skill.task_type: skill.text()}, seed=3)
    # every action of the skill-guided rollouts, advantage +1 (the selection is tested in
    # test_distill.py); scored and trained on the plain prompt, sampled under the skill prompt
    samples = [core.Sample(s.plain_prompt_ids, s.response_ids, s.logprobs, 1.0, "distill")
               for t in guided for s in t.steps if s.response_ids]
    n_tokens = sum(len(s.response_ids) for s in samples)

    def plain_logp() -> float:
        with torch.no_grad():
            return sum(x.sum().item() for x in pol.score([s.prompt_ids for s in samples],
                                                         [s.response_ids for s in samples], cfg.gigpo.token_budget))

    before = {n: p.detach().clone() for n, p in pol.model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in pol.model.parameters() if p.requires_grad], lr=1e-3)
    lp0 = plain_logp()
    gcfg = dataclasses.replace(cfg.gigpo, minibatches=1, ppo_epochs=1)
    stats = gigpo.update(pol, opt, samples, gcfg, cfg.distill, seed=0)
    lp1 = plain_logp()
    with torch.no_grad():  # leave the shared model as it was for the other tests
        for n, p in pol.model.named_parameters():
            if n in before:
                p.copy_(before[n])
    assert stats["optimizer_steps"] == 1 and stats["distill_tokens"] == n_tokens and stats["pg_tokens"] == 0
    assert lp1 > lp0, (lp0, lp1)


def test_a_phase2_iteration_with_a_validated_skill_distils_tokens(reader, monkeypatch):
    """End to end through siri.distill_iteration: a validated skill in the bank -> skill-guided
    rollouts -> selection -> tokens distilled in the update; every task type keeps its RL.
    With the utility filter off (the no_utility_filter ablation): this model plays its cold-start
    games as well without a skill as with one, so no skill-guided trajectory beats its plain
    group's mean; the advantage filter alone still selects the winners of mixed groups."""
    pol, envs, cfg = reader
    tasks = type_tasks(envs)
    pool = tasks + [t for t in envs.task_ids("train") if t not in tasks][:4]  # the skill's type and 4 others
    monkeypatch.setattr(siri, "training_pool", lambda envs_, cfg_: pool)
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, tasks_per_iter=len(pool),
                                                               utility_filter=False))
    skill = mining.answer_skill(envs, tasks, "pick_and_place_simple")
    skill.status = "validated"
    skill.utility.append({"round": 0, "delta_g": 0.5, "ci_low": 0.1, "ci_high": 0.9, "n_pairs": 32})
    bank = mining.SkillBank("unused", [skill])
    before = {n: p.detach().clone() for n, p in pol.model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in pol.model.parameters() if p.requires_grad], lr=1e-4)
    state = siri.RunState(config={})
    out, rows = siri.distill_iteration(pol, opt, envs, bank, cfg, state, seed=5, timing=state.timing)
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if n in before:
                p.copy_(before[n])
    assert out["distill/skill_groups"] >= 1 and out["distill/tokens_kept"] > 0
    assert out["distill/distill_tokens"] == out["distill/tokens_kept"] and out["distill/pg_tokens"] > 0
    # 2·B·G rollouts: B plain groups, and per task a skill-guided group or a second plain one
    G, B = cfg.gigpo.group_size, cfg.distill.tasks_per_iter
    assert out["distill/steps"] > 0 and len(state.buffer) == round(out["distill/success"] * (2 * B - out["distill/skill_groups"]) * G)
