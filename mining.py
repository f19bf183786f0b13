"""Phase 1 of SIRI: self-skill mining (paper Fig. 2b).

    successful plain trajectories ──summarise──► candidate Skill (JSON)
        ──paired rollouts (with / without the skill)──► Δg = success(with) − success(without)
        ──keep if Δg clears the margin──► SkillBank (validated), re-measured every round

Reading order: the summarisation prompt and its parser, the four summarisers, the Skill /
SkillBank dataclasses, the three pure formulas (`delta_g`, `paired_bootstrap_ci`,
`keep_skill`), the rollout-driven `validate`, and the round driver `mine_round`.
Everything except `validate` (and the `policy` / `model:` summarisers) runs without a model.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Callable

import numpy as np
import torch

import agent
import distributed
import model
from core import atomic_write_json, collapse, seed_of, skill_id


@dataclass
class MiningConfig:
    summariser: str = "template"
    """who writes candidate skills: "policy" (the paper's self-mining: the current policy writes the
    JSON; use it with instruct models), "model:<hf id or path>" (an external summariser, the paper's
    closed-model comparison), "template" (deterministic abstraction of the actions; for CPU demos with
    the tiny model, which cannot write prose), "random" (random action spans: the falsification control)"""
    trajectories_per_skill: int = 4
    """K: successful plain trajectories of one task type the summariser reads per candidate"""
    candidates_per_type: int = 1
    """candidate skills summarised per task type and round"""
    validation_tasks: int = 4
    """M: tasks of the skill's type used for paired validation (train split)"""
    validation_group: int = 4
    """G: rollouts per validation task, once with and once without the skill"""
    margin: float = 0.0
    """a skill is kept only if its utility Δg clears this margin (paper: Δg > margin)"""
    selection: str = "mean"
    """"mean": the paper's rule Δg > margin; "confident": the lower end of the paired-bootstrap
    interval must clear the margin (ours, beyond the paper; at the cpu preset's 30 pairs it keeps
    only Δg of about 0.21 or more, README)"""
    ci_level: float = 0.9
    """confidence level of the paired-bootstrap interval for Δg"""
    bootstrap_resamples: int = 1000
    """resamples of the M×G pair differences in the bootstrap"""
    max_summary_tokens: int = 256
    """generation budget of the summariser (policy / model:)"""
    summary_temperature: float = 0.4
    """sampling temperature of the summariser; our choice: low enough for well-formed JSON, above 0
    so that several candidates of one type can differ"""
    max_trajectory_chars: int = 1200
    """character budget of one trajectory inside the summarisation prompt"""
    max_skill_steps: int = 12
    """longer step / pitfall lists are cut: the skill block must stay compact in the prompt"""
    initial_bank: str = ""
    """path of a skills_round_NN.json (e.g. an earlier run's, or skills written by hand or by another model)
    whose skills start the bank of every mining arm; its validated skills are re-measured in round 0.
    "" = start empty. The GiGPO-only control never has skills."""

    def __post_init__(self):
        if self.summariser not in ("policy", "template", "random") and not self.summariser.startswith("model:"):
            raise ValueError(f"mining.summariser: 'policy' | 'model:<id>' | 'template' | 'random', not {self.summariser!r}")
        if self.selection not in ("mean", "confident"):
            raise ValueError(f"mining.selection: 'mean' | 'confident', not {self.selection!r}")
        for key in ("trajectories_per_skill", "candidates_per_type", "validation_tasks", "validation_group",
                    "bootstrap_resamples", "max_summary_tokens", "max_trajectory_chars", "max_skill_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"mining.{key}={getattr(self, key)}: must be at least 1")
        if not 0 < self.ci_level < 1 or self.summary_temperature < 0:
            raise ValueError(f"mining.ci_level in (0, 1) and mining.summary_temperature >= 0 "
                             f"(got {self.ci_level}, {self.summary_temperature})")
        if self.initial_bank and not os.path.isfile(self.initial_bank):
            raise ValueError(f"mining.initial_bank: no file {self.initial_bank!r}; give a skills_round_NN.json or \"\"")
        if self.initial_bank:
            try:
                SkillBank.load(self.initial_bank)
            except (ValueError, KeyError, TypeError) as e:  # half-written or not a bank
                raise ValueError(f"mining.initial_bank: {self.initial_bank!r} is not a readable skill bank "
                                 f"({type(e).__name__}: {e}); give a complete skills_round_NN.json") from None


# ---------------------------------------------------------------------------------------------
# Summarisation prompt and parsing
# ---------------------------------------------------------------------------------------------

SUMMARY_PROMPT = """You are an agent acting in a text-based environment. Below are {k} episodes of the \
task type "{task_type}" that you solved.

{trajectories}

Turn what worked into ONE reusable skill for new tasks of this type. Generalise: write <obj> \
instead of particular objects, keep receptacle types (fridge, drawer, ...) without their numbers, and \
say where each kind of object was found. Answer with one JSON object and nothing else:
{{"name": "<short title>", "task_type": "{task_type}", "when_to_use": "<one sentence>", \
"where": {{"<object type>": ["<receptacle type where it was found>", ...]}}, \
"steps": ["<first step>", "<next step>", ...], "pitfalls": ["<mistake to avoid>", ...]}}"""
"""The only summarisation prompt (our own words); filled by `summary_prompt`."""

OBS_CHARS = 80  # one observation is cut to this many characters inside the prompt


def _task_text(traj, tasks: dict[str, str] | None = None) -> str:
    """Task instruction of a trajectory: from `tasks` (task id -> text, see `task_texts`), else
    `traj.task` if the Trajectory carries it, else a "Your task is to: …" line of the first
    observation, else the task id."""
    text = (tasks or {}).get(traj.task_id) or getattr(traj, "task", None)
    if text:
        return text
    first = traj.steps[0].obs if traj.steps else ""
    m = re.search(r"Your task is to:\s*(.+)", first)
    return m.group(1).strip() if m else traj.task_id


def _result_obs(traj, t: int) -> str:
    """Observation produced by action t. `Step.obs` is the observation the step acted on (the
    anchor's text), so the result of step t is the next step's obs; the last step ended the episode."""
    if t + 1 < len(traj.steps):
        return traj.steps[t + 1].obs
    return "(episode won)" if traj.won else "(episode over)"


def task_texts(envs, trajs: list) -> dict[str, str]:
    """Task id -> instruction text. core.Trajectory does not record the instruction (and the
    embedded env strips it from the observation), so we ask the env: one batched reset of the
    ids whose trajectories lack a `task` attribute."""
    ids = sorted({t.task_id for t in trajs if not getattr(t, "task", "")})
    return {s.task_id: s.task for s in envs.reset(ids)} if ids else {}


def format_trajectory(traj, max_chars: int, tasks: dict[str, str] | None = None) -> str:
    """Compact view of one trajectory: task text, numbered actions, each with the start of the
    observation it produced. Over budget, the middle steps are dropped (our choice: the opening
    search and the finishing moves carry most of a routine)."""
    head = f"Task: {_task_text(traj, tasks)}"
    lines = []
    for t, s in enumerate(traj.steps):
        act = s.action if s.valid and s.action else "(invalid output)"
        obs = collapse(_result_obs(traj, t))[:OBS_CHARS]
        lines.append(f"{t + 1}. {act} -> {obs}")
    out = "\n".join([head] + lines)
    keep = len(lines)
    while len(out) > max_chars and keep > 2:
        keep -= 1
        a, b = (keep + 1) // 2, keep // 2
        gap = f"... ({len(lines) - keep} steps omitted) ..."
        out = "\n".join([head] + lines[:a] + [gap] + lines[len(lines) - b:])
    return out[:max_chars]


def summary_prompt(trajs: list, task_type: str, max_chars: int, tasks: dict[str, str] | None = None) -> str:
    """Fill SUMMARY_PROMPT with K trajectories of one task type."""
    blocks = [f"Episode {i + 1}\n{format_trajectory(t, max_chars, tasks)}" for i, t in enumerate(trajs)]
    return SUMMARY_PROMPT.format(k=len(trajs), task_type=task_type, trajectories="\n\n".join(blocks))


def _json_objects(text: str):
    """Every JSON object that starts somewhere in `text` (prose, code fences around it are fine)."""
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def parse_skill(text: str, max_items: int = 12) -> tuple[dict | None, str | None]:
    """Parse a summariser's output into skill fields, never raising.

    Returns (fields, None) or (None, reason) with reason in {"no_json", "missing_field",
    "wrong_type"}. The first JSON object with all fields well-typed wins. `task_type` is optional
    in the output (our choice: the buffer tells us the type; the model may spell it differently).
    """
    objs = list(_json_objects(text))
    if not objs:
        return None, "no_json"
    reason = "missing_field"
    for obj in objs:
        keys = ("name", "when_to_use", "steps", "pitfalls")
        if any(k not in obj for k in keys):
            continue
        name, when, steps, pitfalls = (obj[k] for k in keys)
        ok = (isinstance(name, str) and name.strip() and isinstance(when, str)
              and isinstance(steps, list) and steps and isinstance(pitfalls, list)
              and all(isinstance(x, str) and x.strip() for x in steps + pitfalls))
        if not ok:
            reason = "wrong_type"
            continue
        return {"name": name.strip(), "when_to_use": when.strip(),
                "steps": [s.strip() for s in steps][:max_items],
                "pitfalls": [p.strip() for p in pitfalls][:max_items],
                "where": _parse_where(obj.get("where"), max_items)}, None
    return None, reason


def _parse_where(raw, max_items: int) -> dict[str, dict[str, int]]:
    """The optional "where" field: {object type: {receptacle type: times found}}. A summariser may
    also write {object: [receptacle, ...]} (most likely first; each counts once). Anything else,
    or ill-typed entries, are dropped: the field is optional, so it never makes a skill malformed."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, dict[str, int]] = {}
    for obj, places in list(raw.items())[:max_items]:
        if isinstance(places, list):
            places = {p: 1 for p in places if isinstance(p, str)}
        if not isinstance(obj, str) or not isinstance(places, dict):
            continue
        counts = {type_name(p): int(n) for p, n in places.items()
                  if isinstance(p, str) and p.strip() and isinstance(n, int) and not isinstance(n, bool) and n > 0}
        if counts:
            out[type_name(obj)] = counts
    return out


# ---------------------------------------------------------------------------------------------
# Summarisers: each maps (task type, K trajectories) to text, which then goes through parse_skill
# ---------------------------------------------------------------------------------------------

def type_name(name: str) -> str:
    """"fridge 1" -> "fridge", "Sink Basin 2" -> "sinkbasin": an instance name's type, as the
    observations spell it (lower case, no number, no spaces)."""
    return re.sub(r"\s*\d+$", "", collapse(name).lower()).replace(" ", "")


_ACTION_PATTERNS = [  # ALFWorld command grammar (alfworld/data/alfred.twl2): (pattern, template)
    (r"go to (?P<r>.+)", "go to {r}"),
    (r"(?P<v>open|close) (?P<r>.+)", "{v} {r}"),
    (r"take (?P<o>.+) from (?P<r>.+)", "take <obj> from {r}"),
    (r"move (?P<o>.+) to (?P<r>.+)", "move <obj> to {r}"),
    (r"put (?P<o>.+) (?P<p>in|on|in/on) (?P<r>.+)", "put <obj> {p} {r}"),
    (r"(?P<v>heat|cool|clean) (?P<o>.+) with (?P<r>.+)", "{v} <obj> with {r}"),
    (r"slice (?P<o>.+) with (?P<r>.+)", "slice <obj> with {r}"),
    (r"(?P<v>use|toggle) (?P<r>.+)", "{v} {r}"),
    (r"examine (?P<r>.+)", "examine {r}"),
    (r"search\[.*\]", "search[<query>]"),  # WebShop
    (r"click\[b0[0-9a-z]{8}\]", "click[<item>]"),
]


def generalise_action(action: str) -> str:
    """"go to fridge 1" -> "go to fridge", "take apple 2 from countertop 1" -> "take <obj> from
    countertop": instance numbers dropped, receptacle (and tool) *types* kept, the task's object
    replaced by <obj>. Our choice: types are what transfers between homes (a mug is usually in
    the coffee machine of *any* kitchen), numbers are not. Unknown commands keep their words."""
    a = collapse(action).lower()
    for pat, template in _ACTION_PATTERNS:
        m = re.fullmatch(pat, a)
        if m:
            parts = {k: (type_name(v) if k == "r" else v) for k, v in m.groupdict().items()}
            return template.format(**parts)
    return re.sub(r"\b([a-z]+) \d+\b", r"\1", a)


_TAKE = re.compile(r"take (.+?) from (.+)")


def takes(traj):
    """(object type, receptacle type) of each valid "take <obj> from <recep>" action, in order."""
    for s in traj.steps:
        m = _TAKE.fullmatch(collapse(s.action or "").lower()) if s.valid else None
        if m:
            yield type_name(m.group(1)), type_name(m.group(2))


def found_where(traj) -> tuple[str, str] | None:
    """(object type, receptacle type) of the first object the trajectory picked up, from its first
    valid "take <obj> from <recep>" action; None if it never took anything."""
    return next(takes(traj), None)


def _routine(traj) -> list[str]:
    """The trajectory's valid actions from its first "take" on, generalised, with the receptacles
    it went to, opened or put things in written <recep> (they differ from home to home) and the
    tools kept ("heat <obj> with microwave"); the search before the first take is what `where`
    records. Runs of one action are collapsed into one step."""
    acts = [s.action for s in traj.steps if s.valid and s.action]
    first = next((i for i, a in enumerate(acts) if a.lower().startswith("take ")), 0)
    out: list[str] = ["go to <recep>"] if first else []
    for a in acts[first:]:
        g = routine_step(a)
        if not out or out[-1] != g:
            out.append(g)
    return out


def routine_step(action: str) -> str:
    """One action as a routine step: generalised, the receptacles it goes to, opens, takes from or
    puts into written <recep>, tools kept ("heat <obj> with microwave")."""
    g = generalise_action(action)
    g = re.sub(r"^(go to|open|close) \S+$", r"\1 <recep>", g)
    return re.sub(r"^(take <obj> from|move <obj> to|put <obj> (?:in|on|in/on)) \S+$", r"\1 <recep>", g)


def where_counts(trajs: list) -> dict[str, dict[str, int]]:
    """{object type: {receptacle type: how many distinct tasks of `trajs` found it there}}, sorted
    by name. Our choice: a task won eight times is one home seen, not eight, so a skill's "Look
    first in" order weighs homes, not how often one task happened to be won."""
    seen = {(t.task_id, *hit) for t in trajs if (hit := found_where(t))}
    where: dict[str, Counter] = defaultdict(Counter)
    for _, obj, place in seen:
        where[obj][place] += 1
    return {o: dict(sorted(c.items())) for o, c in sorted(where.items())}


TASK_DESCRIPTIONS = {  # "when to use" of a template skill: the task type in words, no task's own text
    "pick_and_place_simple": "the task asks you to put an object in or on a receptacle",
    "look_at_obj_in_light": "the task asks you to examine an object under the desklamp",
    "pick_clean_then_place_in_recep": "the task asks you to clean an object and put it somewhere",
    "pick_heat_then_place_in_recep": "the task asks you to heat an object and put it somewhere",
    "pick_cool_then_place_in_recep": "the task asks you to cool an object and put it somewhere",
    "pick_two_obj_and_place": "the task asks you to put two objects of one kind somewhere",
}


def template_summary(trajs: list, task_type: str, max_items: int = 12,
                     tasks: dict[str, str] | None = None) -> str:
    """Deterministic skill without a language model (for CPU demos with the tiny model, which
    cannot write prose; not the paper's method).

    where: where the K trajectories found their objects (`where_counts`), the regularity of the
    homes (envs.HOMES) that a plain policy does not know and must search for. steps: the most
    frequent generalised routine after the object is found (ties: shorter, then alphabetical).
    pitfalls: generalised actions after which the environment answered "Nothing happens.", and
    invalid outputs if any. when_to_use: the task type in words (never another task's text, which
    a copying model could follow by mistake). The result does not depend on the order of `trajs`,
    so the same evidence gives the same skill id. `tasks` is unused (kept for the summariser
    signature shared with `random_summary`)."""
    plans = Counter(tuple(_routine(t)) for t in trajs)
    steps = min(plans, key=lambda p: (-plans[p], len(p), p))
    pitfalls = []
    for t in trajs:
        for i, s in enumerate(t.steps):
            if not (s.valid and s.action):
                p = "answer with <think>...</think><action>...</action> and an admissible action"
            elif _result_obs(t, i).strip().startswith("Nothing happens"):
                p = f"'{generalise_action(s.action)}' did nothing here"
            else:
                continue
            if p not in pitfalls:
                pitfalls.append(p)
    where = dict(list(where_counts(trajs).items())[:max_items])
    return json.dumps({"name": f"{task_type} routine", "task_type": task_type,
                       "when_to_use": TASK_DESCRIPTIONS.get(task_type, f"tasks of type {task_type}"),
                       "where": where, "steps": list(steps)[:max_items] or ["look"],
                       "pitfalls": sorted(pitfalls)[:max_items]})


def random_summary(trajs: list, task_type: str, seed: int, max_items: int = 12,
                   tasks: dict[str, str] | None = None) -> str:
    """Falsification control (the paper's review): a skill in the template's format and of its
    size whose content is drawn at random from the same trajectories. where: the template's
    object types and counts, each place replaced by a receptacle type drawn uniformly from those
    the trajectories went to; steps: random spans of their generalised actions. A mining method
    is only credible if its validated skills beat this control."""
    rng = random.Random(seed)
    template = json.loads(template_summary(trajs, task_type, max_items, tasks))
    places = sorted({type_name(s.action[6:]) for t in trajs for s in t.steps
                     if s.valid and s.action and s.action.lower().startswith("go to ")}) or ["countertop"]
    where: dict[str, dict[str, int]] = {}
    for obj, counts in template["where"].items():
        where[obj] = {}
        for n in counts.values():
            r = rng.choice(places)
            where[obj][r] = where[obj].get(r, 0) + n
    pool = [[generalise_action(s.action) for s in t.steps if s.valid and s.action] for t in trajs]
    pool = [p for p in pool if p] or [["look"]]
    steps: list[str] = []
    while len(steps) < len(template["steps"]):
        acts = rng.choice(pool)
        start = rng.randrange(len(acts))
        steps += acts[start:start + rng.randint(1, 3)]
    return json.dumps({**template, "where": where, "steps": steps[:len(template["steps"])],
                       "pitfalls": []})


def object_home(envs, task_id: str) -> tuple[str, str]:
    """(object type, receptacle type) of the first object the task's walkthrough takes."""
    take = next(a for a in envs.walkthrough(task_id) if a.startswith("take "))
    obj, place = take[len("take "):].split(" from ")
    return type_name(obj), type_name(place)


def room_types(state) -> set[str]:
    """The receptacle types of the room: those with a "go to" in the admissible actions."""
    return {type_name(a[len("go to "):]) for a in state.admissible if a.startswith("go to ")}


def room_places(state) -> list[str]:
    """The receptacle types of a task's room worth searching, sorted: `room_types` at the start,
    less the types the task names (its goal, e.g. the sinkbasin of "put a clean mug in
    sinkbasin"), which no demonstration searches."""
    return sorted(room_types(state) - set(re.findall(r"[a-z]+", state.task.lower())))


def answer_skill(envs, task_ids: list[str], task_type: str, wrong: bool = False, seed: int = 0,
                 place: str | None = None) -> Skill:
    """A hand-written skill that knows where each task's object is (from the walkthroughs), in the
    template's format: the positive control of skill reading. wrong=True: each object is placed in
    a receptacle type of its room where it is not (`room_places`; the wrong-skill control);
    place: this receptacle type instead, for every task. Steps: the first task's walkthrough as a
    routine (receptacles written <recep>, so they give nothing away)."""
    where: dict[str, dict[str, int]] = {}
    rng = random.Random(seed)
    for tid in task_ids:
        obj, home = object_home(envs, tid)
        if place is None and wrong:
            (state,) = envs.reset([tid])
            home = rng.choice([p for p in room_places(state) if p != home])
        where.setdefault(obj, {})[place or home] = 1
    steps = []
    for a in envs.walkthrough(task_ids[0]):
        if not steps or steps[-1] != routine_step(a):
            steps.append(routine_step(a))
    return Skill(name=f"{task_type} routine", task_type=task_type, when_to_use=TASK_DESCRIPTIONS[task_type],
                 where=where, steps=steps, pitfalls=[], summariser="hand-written")


def listed_skill(base: Skill, obj: str, room: list[str], absent: list[str], objects: list[str],
                 rng: random.Random) -> Skill:
    """`base` (an `answer_skill`) in a mined skill's shape, with places drawn at random: 3 times in 4
    the task's object `obj` is listed with a ranked list, 0-2 receptacle types the room does not
    have (`absent`) before a place of the `room` (`room_places`) drawn at random (right or wrong);
    0-2 other object types of `objects` with one place of `room` or `absent` each. A reader that
    takes the first listed place the room has (`Skill.search_order`) goes to the drawn one; when
    `obj` is not listed, to the first place of "Look first in" that the room has
    (coldstart.skill_places=lists)."""
    where: dict[str, dict[str, int]] = {}
    others = [o for o in objects if o != obj]
    for o in rng.sample(others, min(len(others), rng.randint(0, 2))):
        where[o] = {rng.choice(room + absent): 1}
    if rng.random() < 0.75:
        ranked = rng.sample(absent, min(len(absent), rng.randint(0, 2))) + [rng.choice(room)]
        where[obj] = {p: len(ranked) - i for i, p in enumerate(ranked)}
    return Skill(name=base.name, task_type=base.task_type, when_to_use=base.when_to_use, where=where,
                 steps=base.steps, pitfalls=[], summariser="hand-written")


def load_summariser(spec: str, policy, model_cfg=None):
    """`model:<hf id or path>` -> a Policy loaded with model.load_policy on a copy of the
    ModelConfig (`model_cfg`, else the defaults) with that name, on the agent's device.
    Load it once per run and pass it to mine_round as `summariser_policy` (else: once per round)."""
    base = model_cfg or model.ModelConfig()
    return model.load_policy(dataclasses.replace(base, name=spec.split(":", 1)[1]), device=str(policy.device))


def corpus_examples() -> list[str]:
    """Mining text for the tiny model's tokenizer corpus (siri.corpus_for_tokenizer): the prompt
    and a well-formed answer, so that `policy` summarisation is at least tokenised sensibly."""
    example = {"name": "put away routine", "task_type": "pick_and_place_simple",
               "when_to_use": "the task asks to put an object in or on a receptacle",
               "where": {"mug": {"coffeemachine": 2, "cabinet": 1}, "apple": {"fridge": 1}},
               "steps": ["go to <recep>", "take <obj> from <recep>", "move <obj> to <recep>"],
               "pitfalls": ["'open <recep>' did nothing here"]}
    return [SUMMARY_PROMPT, json.dumps(example), Skill(**example).text()]


def summarise(source: str, jobs: list[tuple[str, list]], cfg: MiningConfig, seed: int,
              summariser=None, sampling_cfg=None, tasks: dict[str, str] | None = None) -> list[str]:
    """Raw summariser outputs, one per job (task type, K trajectories), in job order.
    `policy` and `model:` generate all jobs in one batch with `summariser` (a Policy)."""
    if source == "template":
        return [template_summary(t, tt, cfg.max_skill_steps, tasks) for tt, t in jobs]
    if source == "random":
        return [random_summary(t, tt, seed_of(seed, i), cfg.max_skill_steps, tasks)
                for i, (tt, t) in enumerate(jobs)]
    if source != "policy" and not source.startswith("model:"):
        raise ValueError(f"unknown summariser {source!r}")
    gen_cfg = dataclasses.replace(sampling_cfg, temperature=cfg.summary_temperature,
                                  max_new_tokens=cfg.max_summary_tokens, stop=())
    prompts = [summariser.chat_ids(summary_prompt(t, tt, cfg.max_trajectory_chars, tasks)) for tt, t in jobs]
    gen = torch.Generator(device=summariser.device).manual_seed(seed_of(seed, "summarise"))
    return [g.text for g in summariser.generate(prompts, gen_cfg, generator=gen)]


# ---------------------------------------------------------------------------------------------
# Skill and SkillBank
# ---------------------------------------------------------------------------------------------

@dataclass
class Skill:
    """One mined skill: what the summariser wrote, where it came from, and its measured utility."""
    name: str
    task_type: str
    when_to_use: str
    steps: list[str]
    pitfalls: list[str]
    where: dict[str, dict[str, int]] = field(default_factory=dict)
    """where the summarised trajectories found their objects: {object type: {receptacle type: times
    found}} (`parse_skill`); the template summariser counts distinct tasks (`where_counts`)"""
    sources: list[str] = field(default_factory=list)
    """ids of the trajectories it was summarised from ("<group>/<index>")"""
    round: int = 0
    summariser: str = "template"
    status: str = "candidate"
    """candidate -> validated | retired; validated -> retired (dynamic evaluation)"""
    utility: list[dict] = field(default_factory=list)
    """one record per measurement: round, delta_g, ci_low, ci_high, n_pairs, detectable, and per_task
    {task id: [wins with, wins without, pairs]}"""
    distilled: list[dict] = field(default_factory=list)
    """one record per Phase 2 iteration that used it: round, tokens offered / past the utility filter
    ("useful") / kept"""
    id: str = ""
    """deterministic: hash of the task type and the rendered text"""

    def __post_init__(self):
        if not self.id:
            self.id = skill_id(self.task_type, self.text())

    def look_first(self) -> list[str]:
        """Receptacle types by how often the summarised trajectories found their objects there
        (ties: alphabetical): where to search first for an object the skill does not name."""
        total: Counter = Counter()
        for counts in self.where.values():
            total.update(counts)
        return sorted(total, key=lambda r: (-total[r], r))

    def search_order(self, obj_type: str) -> list[str]:
        """Receptacle types to search for `obj_type`: where the skill found that type (most often
        first), then `look_first` for the rest."""
        own = self.where.get(type_name(obj_type), {})
        first = sorted(own, key=lambda r: (-own[r], r))
        return first + [r for r in self.look_first() if r not in first]

    def text(self) -> str:
        """The compact block inserted into the agent's prompt."""
        lines = [f"Skill: {self.name}", f"When to use: {self.when_to_use}"]
        if self.where:
            lines.append("Look first in: " + ", ".join(self.look_first()))
            lines.append("Found before: " + "; ".join(
                f"{o} in " + ", ".join(sorted(c, key=lambda r: (-c[r], r))) for o, c in self.where.items()))
        lines.append("Steps:")
        lines += [f"{i + 1}. {s}" for i, s in enumerate(self.steps)]
        if self.pitfalls:
            lines += ["Pitfalls:"] + [f"- {p}" for p in self.pitfalls]
        return "\n".join(lines)

    @property
    def delta_g(self) -> float | None:
        """Latest measured Δg (None before the first validation)."""
        return self.utility[-1]["delta_g"] if self.utility else None


@dataclass
class SkillBank:
    """All skills ever proposed (retired ones too), saved as `skills_round_{r:02d}.json` in `dir`,
    one file per round, so `diff` shows what a round learned or retired."""
    dir: str
    skills: list[Skill] = field(default_factory=list)

    def add(self, skill: Skill) -> bool:
        """Add a skill; False (and nothing added) if a skill with its id is already in the bank."""
        if any(s.id == skill.id for s in self.skills):
            return False
        self.skills.append(skill)
        return True

    def validated(self) -> list[Skill]:
        return [s for s in self.skills if s.status == "validated"]

    def task_types(self) -> list[str]:
        return sorted({s.task_type for s in self.skills})

    def best(self, task_type: str) -> Skill | None:
        """The validated skill of this type with the highest latest Δg (None if there is none)."""
        cands = [s for s in self.validated() if s.task_type == task_type]
        return max(cands, key=lambda s: -np.inf if s.delta_g is None else s.delta_g, default=None)

    def markdown(self) -> str:
        """One table row per skill (for results.md); Δg and interval of the latest measurement."""
        rows = ["| id | task type | name | status | round | Δg | interval | summariser | pairs | detectable Δg |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in self.skills:
            u = s.utility[-1] if s.utility else None
            dg, ci = (f"{u['delta_g']:+.3f}", f"[{u['ci_low']:+.3f}, {u['ci_high']:+.3f}]") if u else ("", "")
            n, det = (u.get("n_pairs", ""), f"{u['detectable']:.3f}" if "detectable" in u else "") if u else ("", "")
            rows.append(f"| {s.id} | {s.task_type} | {s.name} | {s.status} | {s.round} | {dg} | {ci} | "
                        f"{s.summariser} | {n} | {det} |")
        return "\n".join(rows)

    def story(self, round_idx: int) -> str:
        """skills/round_NN.md: each skill's story up to this round: the trajectories it was
        summarised from (ids into trajectories.jsonl), its text, Δg with its interval per
        measurement, the paired validation outcomes per task of its latest measurement, and the
        tokens of its skill-guided rollouts that passed each Phase 2 filter."""
        out = [f"# Skill bank after round {round_idx}", "",
               "Trajectory ids (`<group>/<index>`) are the `id` field of the run's trajectories.jsonl "
               "(rows of phase `mining`).", ""]
        for s in self.skills:
            if s.round > round_idx:
                continue
            out += [f"## `{s.id}` {s.name} ({s.task_type}): {s.status}", "",
                    f"Proposed in round {s.round} by the {s.summariser} summariser from "
                    f"{len(s.sources)} trajectories: " + (", ".join(f"`{x}`" for x in s.sources) or "none") + ".", "",
                    "```", s.text(), "```", "",
                    "| round | Δg | interval | pairs | detectable Δg |", "| --- | --- | --- | --- | --- |"]
            out += [f"| {u['round']} | {u['delta_g']:+.3f} | [{u['ci_low']:+.3f}, {u['ci_high']:+.3f}] | "
                    f"{u['n_pairs']} | {u.get('detectable', float('nan')):.3f} |"
                    for u in s.utility if u["round"] <= round_idx]
            last = [u for u in s.utility if u["round"] <= round_idx and u.get("per_task")]
            if last:
                out += ["", f"Paired validation, round {last[-1]['round']} (wins with the skill / without, same seeds):", "",
                        "| task | with | without | episodes |", "| --- | --- | --- | --- |"]
                out += [f"| {tid} | {w} | {wo} | {n} |" for tid, (w, wo, n) in sorted(last[-1]["per_task"].items())]
            used = [d for d in s.distilled if d["round"] <= round_idx]
            if used:
                tot = {k: sum(d[k] for d in used) for k in ("offered", "useful", "kept")}
                out += ["", f"Phase 2 ({len(used)} iterations): {tot['offered']} tokens of skill-guided actions, "
                        f"{tot['useful']} in trajectories that beat their plain group (utility filter), "
                        f"{tot['kept']} also with a positive advantage: distilled."]
            out.append("")
        return "\n".join(out)

    def save(self, round_idx: int) -> str:
        path = os.path.join(self.dir, f"skills_round_{round_idx:02d}.json")
        atomic_write_json(path, {"round": round_idx, "skills": [{"id": s.id, **asdict(s)} for s in self.skills]},
                          indent=2)
        return path

    @classmethod
    def load(cls, path: str) -> "SkillBank":
        with open(path) as f:
            data = json.load(f)
        return cls(os.path.dirname(path), [Skill(**s) for s in data["skills"]])

    @classmethod
    def load_latest(cls, dir: str) -> "SkillBank":
        """The bank of the highest saved round in `dir`; an empty bank if none was saved."""
        files = glob.glob(os.path.join(dir, "skills_round_*.json"))
        rounds = {int(m.group(1)): p for p in files
                  if (m := re.search(r"skills_round_(\d+)\.json$", p))}
        return cls.load(rounds[max(rounds)]) if rounds else cls(str(dir))


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: hindsight macro utility Δg and the selection rule (pure functions)
# ---------------------------------------------------------------------------------------------

def delta_g(with_success, without_success) -> float:
    """Hindsight macro utility (paper: Phase 1, Fig. 2b), on P paired episodes:

        Δg = (1/P) Σ_p s_p^with − (1/P) Σ_p s_p^without,   s ∈ {0, 1} the success bit.
    """
    w, wo = np.asarray(with_success, float), np.asarray(without_success, float)
    if w.shape != wo.shape or w.size == 0:
        raise ValueError("need the same, non-zero number of paired outcomes")
    return float(w.mean() - wo.mean())


def paired_bootstrap_ci(with_success, without_success, level: float = 0.9,
                        n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval for Δg (ours, beyond the paper). With d_p = s_p^with − s_p^without:

        Δg*_b = mean of P draws with replacement from {d_p},  b = 1..B
        (lo, hi) = quantiles (1−level)/2 and (1+level)/2 of {Δg*_b}

    Pairs are resampled as units, so the noise common to both arms cancels. Our choice: resample
    the M×G pairs; rollouts of one task are correlated, so a per-task (cluster) bootstrap would be
    wider -- `confident` selection is a guard against noise, not an exact test. All d_p equal ->
    the interval is the point (d, d)."""
    d = np.asarray(with_success, float) - np.asarray(without_success, float)
    if d.size == 0:
        raise ValueError("no pairs")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_resamples, d.size))
    means = d[idx].mean(axis=1)  # (B,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def detectable_delta_g(sd: float, n_pairs: int, level: float = 0.9, power: float = 0.9) -> float:
    """Smallest true Δg that the "confident" rule keeps with probability `power` (ours, beyond the
    paper; normal approximation of the paired mean):

        Δg_min = (z_{(1+level)/2} + z_{power}) · sd / sqrt(P)

    where sd is the standard deviation of the P pair differences d_p. The rule keeps a skill when
    the lower end of the two-sided `level` interval, ≈ Δg − z_{(1+level)/2}·sd/√P, is above 0.
    Example: sd = 0.4, P = 48, level = power = 0.9 -> (1.645 + 1.282) · 0.4 / 6.93 = 0.169."""
    z = NormalDist().inv_cdf
    return (z((1 + level) / 2) + z(power)) * sd / math.sqrt(max(n_pairs, 1))


def keep_skill(dg: float, lo: float, margin: float, selection: str) -> bool:
    """Selection rule. "mean" (paper): keep iff Δg > margin. "confident" (ours): keep iff the
    interval's lower end lo > margin, i.e. the skill clears the margin with the configured confidence."""
    if selection == "mean":
        return dg > margin
    if selection == "confident":
        return lo > margin
    raise ValueError(f"unknown selection {selection!r}")


@dataclass
class PairedResult:
    """Outcomes of paired validation: entry p of both lists is episode (task_id, index) = keys[p]."""
    skill_id: str
    keys: list[tuple[str, int]]
    with_success: list[float]
    without_success: list[float]
    baseline: list | None = field(default=None, repr=False)
    """the skill-free trajectories, reusable as the baseline of another skill of the same type"""


def pair_outcomes(skill_id: str, with_trajs: list, without_trajs: list) -> PairedResult:
    """Pair rollout index i of task m with skill <-> index i of task m without (same seed)."""
    w = {(t.task_id, t.index): float(t.won) for t in with_trajs}
    wo = {(t.task_id, t.index): float(t.won) for t in without_trajs}
    if w.keys() != wo.keys() or len(w) != len(with_trajs):
        raise ValueError("with/without rollouts do not pair up by (task_id, index)")
    keys = sorted(w)
    return PairedResult(skill_id, keys, [w[k] for k in keys], [wo[k] for k in keys], without_trajs)


def pool_pairs(result: PairedResult) -> PairedResult:
    """Data-parallel validation (torchrun): every rank's pairs, pooled and sorted by key as one
    process would hold them, so Δg and its interval are computed on all M×G pairs. `baseline`
    stays this rank's own plain trajectories (they are reused only by this rank's next call).
    One process: `result` itself."""
    if distributed.world_size() == 1:
        return result
    rows = sorted(distributed.gather_objects(list(zip(result.keys, result.with_success, result.without_success))))
    return PairedResult(result.skill_id, [tuple(r[0]) for r in rows], [r[1] for r in rows],
                        [r[2] for r in rows], result.baseline)


def validate(policy, envs, skill: Skill, task_ids: list[str], group_size: int, sampling_cfg,
             seed: int, baseline: list | None = None) -> PairedResult:
    """Paired rollouts: the same tasks and the same seed, once with the skill in the prompt and
    once plain. `baseline`: plain trajectories of an earlier call with the same tasks and seed
    (they are the same episodes, so we skip re-playing them). Under torchrun each rank plays its
    shard of `task_ids` (with its own seed, shared by both arms) and the pairs are pooled."""
    task_ids, seed = distributed.shard(task_ids), distributed.rank_seed(seed)
    with_trajs = agent.rollout(policy, envs, task_ids, group_size, sampling_cfg,
                                    skill={skill.task_type: skill.text()}, seed=seed,
                                    desc=f"mining {skill.id} +skill")
    if baseline is None:
        baseline = agent.rollout(policy, envs, task_ids, group_size, sampling_cfg,
                                      skill=None, seed=seed, desc=f"mining {skill.id} plain")
    return pool_pairs(pair_outcomes(skill.id, with_trajs, baseline))


def record_utility(skill: Skill, result: PairedResult, round_idx: int, cfg: MiningConfig,
                   seed: int) -> dict:
    """Append {round, delta_g, ci_low, ci_high, n_pairs, detectable} to the skill's utility history
    (`detectable`: the Δg this measurement's spread would detect with 90 % power)."""
    lo, hi = paired_bootstrap_ci(result.with_success, result.without_success, cfg.ci_level,
                                 cfg.bootstrap_resamples, seed)
    d = np.asarray(result.with_success, float) - np.asarray(result.without_success, float)
    rec = {"round": round_idx, "delta_g": delta_g(result.with_success, result.without_success),
           "ci_low": lo, "ci_high": hi, "n_pairs": len(result.keys),
           "detectable": detectable_delta_g(float(d.std(ddof=1)) if d.size > 1 else 0.0, d.size, cfg.ci_level)}
    per_task: dict[str, list[int]] = {}
    for (task_id, _), w, wo in zip(result.keys, result.with_success, result.without_success):
        counts = per_task.setdefault(task_id, [0, 0, 0])
        counts[0], counts[1], counts[2] = counts[0] + int(w), counts[1] + int(wo), counts[2] + 1
    rec["per_task"] = per_task
    skill.utility.append(rec)
    return rec


def update_status(skill: Skill, rec: dict, margin: float, selection: str) -> str:
    """Candidate: validated iff keep_skill(Δg, lo, margin, selection), else retired.
    Validated (dynamic evaluation): retired once Δg ≤ margin. Our choice: admission may demand
    confidence, retention only the paper's point rule -- with M×G = 16 pairs the interval is wide,
    and a confident retention rule would churn useful skills out on noise."""
    rule = selection if skill.status == "candidate" else "mean"
    skill.status = "validated" if keep_skill(rec["delta_g"], rec["ci_low"], margin, rule) else "retired"
    return skill.status


# ---------------------------------------------------------------------------------------------
# TRY NOT TO MODIFY: one mining round (plumbing around the functions above)
# ---------------------------------------------------------------------------------------------


def split_pool(pool: list[str], task_type_of: Callable[[str], str], m: int, seed: int
               ) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """The training pool split per task type into validation tasks and summary sources.

    Per type: M tasks drawn by seed validate its skills (paired rollouts), the others are the
    only tasks whose trajectories may be summarised into its skills. Our choices: validation runs
    on tasks the policy trains on (Δg is measured where the skill will be used in Phase 2; the
    eval split stays unseen until the final report); a skill never sees the answers of the tasks
    it is validated on (no leak: its Δg is a transfer measurement); at least one task per type is
    kept for the sources when the type has two or more (a type with a single task validates on it
    and has no sources); the split is fixed for the run, so every round and every re-measurement
    uses the same tasks and one plain baseline per type."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for tid in pool:
        by_type[task_type_of(tid)].append(tid)
    val, src = {}, {}
    for tt, ids in sorted(by_type.items()):
        chosen = sorted(random.Random(seed_of(seed, tt)).sample(ids, min(m, max(len(ids) - 1, 1))))
        val[tt] = chosen
        src[tt] = set(ids) - set(chosen)
    return val, src


def pick_trajectories(trajs: list, k: int, seed: int) -> list:
    """K trajectories drawn by seed, distinct tasks first (our choice: variety to generalise from)."""
    order = list(trajs)
    random.Random(seed).shuffle(order)
    seen: set[str] = set()
    first, rest = [], []
    for t in order:
        (rest if t.task_id in seen else first).append(t)
        seen.add(t.task_id)
    return (first + rest)[:k]


def mine_round(policy, envs, buffer: list, bank: SkillBank, round_idx: int, cfg: MiningConfig,
               sampling_cfg, seed: int, bank_dir: str | None = None, summariser_policy=None,
               validate_fn: Callable[..., PairedResult] = validate, pool: list[str] | None = None,
               split_seed: int = 0) -> dict:
    """One Phase 1 round: re-measure validated skills (dynamic evaluation), summarise new
    candidates from the buffer's successful plain trajectories, validate them, save the bank
    (in `bank_dir` if given, else `bank.dir`). `pool`: the training tasks the policy trains on
    (default: the whole train split), split once per run (`split_seed`) into validation tasks
    and summary sources by `split_pool`. `validate_fn` is injectable so that the logic is
    testable without a model."""
    if bank_dir is not None:
        bank.dir = str(bank_dir)
    m: Counter = Counter()
    val_seed = seed_of(seed, round_idx, "validate")  # one seed per round: with/without share it
    pool = list(pool) if pool is not None else envs.task_ids("train")
    tasks, sources = split_pool(pool, envs.task_type, cfg.validation_tasks, split_seed)
    baselines: dict[str, list] = {}
    measured: dict[str, list[Skill]] = defaultdict(list)

    def measure(skill: Skill) -> str | None:
        tt = skill.task_type
        if not tasks.get(tt):
            m["no_tasks"] += 1
            return None
        res = validate_fn(policy, envs, skill, tasks[tt], cfg.validation_group, sampling_cfg,
                          val_seed, baseline=baselines.get(tt))
        baselines[tt] = res.baseline
        rec = record_utility(skill, res, round_idx, cfg, seed_of(seed, round_idx, skill.id))  # Δg + interval
        measured[tt].append(skill)
        was = skill.status
        now = update_status(skill, rec, cfg.margin, cfg.selection)  # Δg > margin (or lo > margin)
        print(f"[mining] round {round_idx} {skill.id} {tt}: Δg={rec['delta_g']:+.3f} "
              f"CI=[{rec['ci_low']:+.3f}, {rec['ci_high']:+.3f}] {was} -> {now}")
        return now

    # 1. dynamic evaluation: re-measure every validated skill under the current policy
    for skill in bank.validated():
        if measure(skill) == "retired":
            m["retired"] += 1

    # 2. summarise: candidates_per_type jobs per task type with successful plain trajectories
    by_type: dict[str, list] = defaultdict(list)
    for t in buffer:  # successful plain trajectories of the type's source tasks only (no leak)
        if t.won and t.skill_id is None and t.task_id in sources.get(t.task_type, ()):
            by_type[t.task_type].append(t)
    jobs = [(tt, pick_trajectories(by_type[tt], cfg.trajectories_per_skill, seed_of(seed, round_idx, tt, c)))
            for tt in sorted(by_type) for c in range(cfg.candidates_per_type)]
    texts = []
    if jobs and distributed.is_main():  # torchrun: rank 0 summarises, every rank gets its texts
        if cfg.summariser.startswith("model:") and summariser_policy is None:
            summariser_policy = load_summariser(cfg.summariser, policy)
        tasks_text = task_texts(envs, [t for _, trajs in jobs for t in trajs])
        texts = summarise(cfg.summariser, jobs, cfg, seed_of(seed, round_idx, "summarise"),
                          summariser_policy or policy, sampling_cfg, tasks_text)
    texts = distributed.broadcast_object(texts)
    new: list[Skill] = []
    for (tt, trajs), text in zip(jobs, texts):
        fields, err = parse_skill(text, cfg.max_skill_steps)
        if err:
            m["malformed"] += 1
            m[f"malformed_{err}"] += 1
            continue
        skill = Skill(**fields, task_type=tt, sources=[f"{t.group}/{t.index}" for t in trajs],
                      round=round_idx, summariser=cfg.summariser)
        # our choice: an id already in the bank (even retired) is not re-tested -- retrying a
        # rejected skill until one noisy measurement clears the bar is selection by repetition
        if bank.add(skill):
            new.append(skill)
        else:
            m["duplicates"] += 1

    # 3. paired validation of the new candidates (Δg, interval, selection rule)
    for skill in new:
        if measure(skill) == "validated":
            m["accepted"] += 1

    path = bank.save(round_idx) if distributed.is_main() else "(saved by rank 0)"
    out = {f"mining/{k}": float(m[k]) for k in ("malformed", "duplicates", "accepted", "retired")}
    out.update({f"mining/{k}": float(v) for k, v in m.items() if k.startswith("malformed_") or k == "no_tasks"})
    out["mining/candidates"] = float(len(new))
    out["mining/validated"] = float(len(bank.validated()))
    for tt, skills in sorted(measured.items()):  # the type's best skill after this round, else its best try
        best = bank.best(tt) or max(skills, key=lambda s: s.delta_g)
        out[f"mining/delta_g/{tt}"] = best.delta_g
        out[f"mining/ci_low/{tt}"] = best.utility[-1]["ci_low"]
        out[f"mining/detectable/{tt}"] = best.utility[-1].get("detectable", float("nan"))
    print(f"[mining] round {round_idx}: {len(new)} candidates, {m['accepted']} accepted, "
          f"{m['retired']} retired, {m['malformed']} malformed -> {path}")
    return out
