"""Does a model read a skill? ``python reads.py MODEL [--types T ...] [--games 8] [--episodes 4] [--sources 10] [key=value ...]``

MODEL is a run's cold-started model (``runs/<run>/coldstart_model``) or anything `model.load_policy`
takes. Each of the first --games unseen eval games of each type is played --episodes times in five
arms, paired (same seeds):
- plain: no skill;
- right: a skill that names where the task's object is (`mining.answer_skill`, the positive control);
- wrong: one that names a place of the room where it is not (the wrong-skill control);
- usual: one that names the place of the room where the object's type usually is (`usual_place`,
  envs.HOMES; right or wrong for this game): what a perfect type-level prior would say;
- mined: the template skill of the walkthroughs of the first --sources training-pool games of the
  type (`walkthrough_skill`; never the eval game's own): the most a mined skill could know from
  that many games (--sources 0: no such arm).
Printed per arm: wins, invalid-action rate, how often the skill's first place for the object is
where it is (and its first place that the room has), how often the first "go to" goes there,
and where the lost episodes went wrong (`outcome`: never took anything / took only other objects
than the task's / took the task's object and still lost); then the first episode of the first
game, and the mined skills. A model that reads skills goes first where the skill says, and wins
more with the right skill than with the wrong one; one that only notices that a block is there
plays both alike. key=value arguments override the config (the environment must be the one the
model was trained on; default: the cpu preset's, which keeps actions admissible,
`rollout.constrain_actions`; add rollout.constrain_actions=false to watch the model unconstrained).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import agent
import envs as envs_lib
import mining
import siri
from config import load_config
from envs import make_envs
from model import ModelLoadError, load_policy

ARMS = ("plain", "right", "wrong", "usual", "mined")


def usual_place(state, obj_type: str) -> str:
    """The receptacle type of the task's room (`mining.room_places`, which holds the object's own)
    where envs.HOMES puts an `obj_type` most often (ties, or a type HOMES does not list: the first
    alphabetically)."""
    homes = {mining.type_name(r): w for o, ws in envs_lib.HOMES.items() if mining.type_name(o) == obj_type
             for r, w in ws.items()}
    places = mining.room_places(state)
    return min(places, key=lambda p: (-homes.get(p, 0.0), p))


def walkthrough_skill(envs, task_ids: list[str], task_type: str) -> mining.Skill:
    """The template skill (`mining.template_summary`) of `task_ids`' walkthroughs played as won
    trajectories (`siri.demonstration` without a search: where each game's object is, its steps).
    Every object type seen is kept (a run's skill keeps mining.max_skill_steps of them, never more
    than the K trajectories it reads)."""
    if not task_ids:
        raise ValueError(f"no training-pool games of type {task_type} to summarise")
    trajs = [siri.demo_trajectory(t, task_type, siri.demonstration(envs, t, [], None)[0]) for t in task_ids]
    keep = max(len(task_ids), 12)
    fields, err = mining.parse_skill(mining.template_summary(trajs, task_type, keep), keep)
    assert err is None, err  # the template writes well-formed JSON
    return mining.Skill(**fields, task_type=task_type, summariser="template (walkthroughs)")


def first_goto(traj) -> str | None:
    """The receptacle type of the trajectory's first valid "go to"."""
    return next((mining.type_name(s.action[len("go to "):]) for s in traj.steps
                 if s.valid and s.action and s.action.startswith("go to ")), None)


def outcome(traj, obj_type: str) -> str:
    """"won", "never took", "took another object" (no valid take of `obj_type`) or "took it, lost"."""
    taken = [obj for obj, _ in mining.takes(traj)]
    if traj.won:
        return "won"
    if not taken:
        return "never took"
    return "took it, lost" if obj_type in taken else "took another object"


OUTCOMES = ("never took", "took another object", "took it, lost")


def probe(policy, envs, task_ids: list[str], episodes: int, sampling, seed: int = 7,
          mined: dict[str, mining.Skill] | None = None) -> dict[str, dict]:
    """{arm: {wins, episodes, invalid, steps, first_at_object, at_home, at_home_room, example, and
    per lost episode's `outcome` its count}} over ``task_ids`` (see the module doc). `at_home`:
    episodes whose skill's first place for the task's object (`Skill.search_order`) is where it
    is (all for "right", none for "wrong"); `at_home_room`: the same for the first place of that
    order that the room has (`mining.room_places`), what a reader who skips absent places would
    try first. The "mined" arm is played where `mined` holds a skill of the task's type."""
    arms = [a for a in ARMS if a != "mined" or mined]
    out = {arm: {"wins": 0, "episodes": 0, "invalid": 0, "steps": 0, "first_at_object": 0, "at_home": 0,
                 "at_home_room": 0, "example": "", **dict.fromkeys(OUTCOMES, 0)} for arm in arms}
    for tid in task_ids:
        tt = envs.task_type(tid)
        obj, home = mining.object_home(envs, tid)
        (state,) = envs.reset([tid])
        state_places = mining.room_places(state)
        skills = {"plain": None, "right": mining.answer_skill(envs, [tid], tt),
                  "wrong": mining.answer_skill(envs, [tid], tt, wrong=True),
                  "usual": mining.answer_skill(envs, [tid], tt, place=usual_place(state, obj))}
        if mined and tt in mined:
            skills["mined"] = mined[tt]
        for arm, skill in skills.items():
            trajs = agent.rollout(policy, envs, [tid], episodes, sampling,
                                  skill=None if skill is None else {tt: skill.text()}, seed=seed, desc=arm)
            row = out[arm]
            order = skill.search_order(obj) if skill is not None else []
            named = order[:1] == [home]
            named_room = next((p for p in order if p in state_places), None) == home
            for t in trajs:
                row["wins"] += t.won
                row["episodes"] += 1
                row["steps"] += len(t.steps)
                row["invalid"] += sum(not s.valid for s in t.steps)
                row["first_at_object"] += first_goto(t) == home
                row["at_home"] += named
                row["at_home_room"] += named_room
                if not t.won:
                    row[outcome(t, obj)] += 1
            if not row["example"]:
                row["example"] = f"{tid} (object in {home}): " + " ; ".join(s.action or "(invalid)" for s in trajs[0].steps)
    return out


def main(argv: list[str]) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run's coldstart_model folder, or any model load_policy takes")
    parser.add_argument("--types", nargs="+", default=["pick_and_place_simple", "look_at_obj_in_light",
                                                       "pick_heat_then_place_in_recep"])
    parser.add_argument("--games", type=int, default=8, help="unseen eval games per type")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per game and arm")
    parser.add_argument("--sources", type=int, default=10, help="training-pool games per type whose "
                        "walkthroughs the mined arm's skill summarises (0: no mined arm)")
    parser.add_argument("overrides", nargs="*", help="config key=value, e.g. env.max_steps=14")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow the options
    args.overrides += [t for t in args.types if "=" in t]  # --types' list swallows overrides after it
    args.types = [t for t in args.types if "=" not in t]
    cfg = load_config(None, ["env.num_workers=0", *args.overrides, f"model.name={args.model}"])
    envs = make_envs(cfg.env)
    try:
        known = sorted({envs.task_type(t) for t in envs.task_ids("eval")})
        if set(args.types) - set(known):
            raise SystemExit(f"error: --types {' '.join(sorted(set(args.types) - set(known)))}: choose from {', '.join(known)}")
        try:
            policy = load_policy(cfg.model, device="cpu")
        except ModelLoadError as e:
            raise SystemExit(f"error: {e}")
        ids = [t for tt in args.types for t in [t for t in envs.task_ids("eval") if envs.task_type(t) == tt][:args.games]]
        sampling = dataclasses.replace(cfg.rollout, temperature=cfg.eval.temperature)
        pool = siri.training_pool(envs, cfg)
        mined = {tt: walkthrough_skill(envs, [t for t in pool if envs.task_type(t) == tt][:args.sources], tt)
                 for tt in args.types} if args.sources > 0 else None
        res = probe(policy, envs, ids, args.episodes, sampling, mined=mined)
    finally:
        envs.close()
    print(f"\n{len(ids)} unseen eval games x {args.episodes} episodes, temperature {sampling.temperature}")
    print("| arm | wins | invalid actions | skill's first place is the object's | its first place in the room is | "
          "first go-to at the object's receptacle type | lost: " + " | ".join(OUTCOMES)
          + " |\n|---|---|---|---|---|---|" + "---|" * len(OUTCOMES))
    for arm, r in res.items():
        print(f"| {arm} | {r['wins']} / {r['episodes']} | {r['invalid'] / max(r['steps'], 1):.2f} | "
              f"{r['at_home']} / {r['episodes']} | {r['at_home_room']} / {r['episodes']} | "
              f"{r['first_at_object']} / {r['episodes']} | "
              + " | ".join(str(r[k]) for k in OUTCOMES) + " |")
    for tt, skill in (mined or {}).items():
        print(f"\nmined skill of {tt} (walkthroughs of {args.sources} training-pool games):\n{skill.text()}")
    for arm, r in res.items():
        print(f"{arm}: {r['example']}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
