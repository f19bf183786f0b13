"""Does a model read a skill? ``python reads.py MODEL [--types T ...] [--games 8] [--episodes 4] [key=value ...]``

MODEL is a run's cold-started model (``runs/<run>/coldstart_model``) or anything `model.load_policy`
takes. Each of the first --games unseen eval games of each type is played --episodes times three
ways, paired (same seeds): plain prompt; with a skill that names where the task's object is
(`mining.answer_skill`, the positive control); with one that names a place of the room where it
is not (the wrong-skill control). Printed per arm: wins, invalid-action rate, how often the
first "go to" goes to the receptacle type that holds the object, and where the lost episodes
went wrong (`outcome`: never took anything / took only other objects than the task's / took the
task's object and still lost); then the actions of the first episode of the first game. A model
that reads skills goes there first, and wins more, with the right skill than with the wrong one;
one that only notices that a block is there plays both skills alike. key=value arguments
override the config (the environment must be the one the model was trained on; default: the cpu
preset's, which keeps actions admissible, `rollout.constrain_actions`; add
rollout.constrain_actions=false to watch the model unconstrained).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import agent
import mining
from config import load_config
from envs import make_envs
from model import ModelLoadError, load_policy

ARMS = ("plain", "right", "wrong")


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


def probe(policy, envs, task_ids: list[str], episodes: int, sampling, seed: int = 7) -> dict[str, dict]:
    """{arm: {wins, episodes, invalid, steps, first_at_object, example, and per lost episode's
    `outcome` its count}} over ``task_ids`` (see the module doc)."""
    out = {arm: {"wins": 0, "episodes": 0, "invalid": 0, "steps": 0, "first_at_object": 0, "example": "",
                 **dict.fromkeys(OUTCOMES, 0)} for arm in ARMS}
    for tid in task_ids:
        tt = envs.task_type(tid)
        obj, home = mining.object_home(envs, tid)
        skills = {"plain": None, "right": mining.answer_skill(envs, [tid], tt),
                  "wrong": mining.answer_skill(envs, [tid], tt, wrong=True)}
        for arm, skill in skills.items():
            trajs = agent.rollout(policy, envs, [tid], episodes, sampling,
                                  skill=None if skill is None else {tt: skill.text()}, seed=seed, desc=arm)
            row = out[arm]
            for t in trajs:
                row["wins"] += t.won
                row["episodes"] += 1
                row["steps"] += len(t.steps)
                row["invalid"] += sum(not s.valid for s in t.steps)
                row["first_at_object"] += first_goto(t) == home
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
        res = probe(policy, envs, ids, args.episodes, sampling)
    finally:
        envs.close()
    print(f"\n{len(ids)} unseen eval games x {args.episodes} episodes, temperature {sampling.temperature}")
    print("| arm | wins | invalid actions | first go-to at the object's receptacle type | lost: "
          + " | ".join(OUTCOMES) + " |\n|---|---|---|---|" + "---|" * len(OUTCOMES))
    for arm, r in res.items():
        print(f"| {arm} | {r['wins']} / {r['episodes']} | {r['invalid'] / max(r['steps'], 1):.2f} | "
              f"{r['first_at_object']} / {r['episodes']} | " + " | ".join(str(r[k]) for k in OUTCOMES) + " |")
    for arm, r in res.items():
        print(f"{arm}: {r['example']}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
