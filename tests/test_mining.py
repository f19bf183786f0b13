"""Phase 1 (mining.py): Δg and its interval, selection rules, SkillBank on disk, summary parsing,
template / random summarisers, dynamic evaluation. Offline, CPU, no model except the last test."""
import dataclasses
import json
import os
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

import config
import core
import decoder
import envs as envs_lib
import mining
import model
import reads
import siri
from mining import (MiningConfig, PairedResult, Skill, SkillBank, delta_g, generalise_action,
                    keep_skill, mine_round, pair_outcomes, paired_bootstrap_ci, parse_skill,
                    random_summary, template_summary)


# ----- small stand-ins for core.Step / core.Trajectory (only the fields mining reads) -----

@dataclass
class FakeStep:
    action: str | None
    obs: str
    valid: bool = True


@dataclass
class FakeTraj:
    task_id: str
    task_type: str
    steps: list
    won: bool = True
    index: int = 0
    skill_id: str | None = None

    @property
    def group(self):
        return f"{self.task_id}-s0"


def make_traj(task_id, actions, task_type="pick_and_place_simple", index=0, won=True):
    obs = ["-= Welcome =- You are in a room. Your task is to: put a apple in fridge."]
    obs += ["Nothing happens." if a.startswith("open drawer") else f"You did {a}." for a in actions[:-1]]
    return FakeTraj(task_id, task_type, [FakeStep(a, o) for a, o in zip(actions, obs)], won, index)


TRAJ_A = ["go to countertop 1", "go to countertop 2", "take apple 2 from countertop 2",
          "go to fridge 1", "open fridge 1", "move apple 2 to fridge 1"]
TRAJ_B = ["go to diningtable 1", "take apple 1 from diningtable 1", "go to fridge 1",
          "open drawer 3", "open fridge 1", "move apple 1 to fridge 1"]
TRAJ_C = ["go to countertop 3", "go to sinkbasin 1", "take apple 3 from sinkbasin 1",
          "go to fridge 1", "open fridge 1", "move apple 3 to fridge 1"]


def trajs():
    return [make_traj("t0", TRAJ_A), make_traj("t1", TRAJ_B), make_traj("t2", TRAJ_C)]


def skill(task_type="pick_and_place_simple", name="fridge routine", **kw):
    return Skill(name=name, task_type=task_type, when_to_use="put something in a receptacle",
                 steps=["go to <recep>", "take <obj> from <recep>"], pitfalls=["do not loop"], **kw)


# ----- Δg, interval, selection -----

def test_delta_g_hand_computed():
    assert delta_g([1, 1, 0, 1], [0, 1, 0, 0]) == pytest.approx(0.5)  # 3/4 - 1/4
    assert delta_g([0, 0], [1, 0]) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        delta_g([1, 0], [1])


def test_ci_is_a_point_when_all_pair_differences_are_equal():
    assert paired_bootstrap_ci([1, 0, 1, 1], [1, 0, 1, 1]) == (0.0, 0.0)
    assert paired_bootstrap_ci([1, 1, 1], [0, 0, 0]) == (1.0, 1.0)


def test_ci_brackets_delta_g_and_is_deterministic():
    w, wo = [1, 1, 0, 1] * 4, [0, 1, 0, 0] * 4  # d = [1,0,0,1]*4: Δg = 0.5, s.e. = 0.5/4 = 0.125
    lo, hi = paired_bootstrap_ci(w, wo, level=0.9, n_resamples=1000, seed=3)
    assert 0.25 < lo < 0.5 < hi < 0.75  # ≈ 0.5 ± 1.645 · 0.125
    assert (lo, hi) == paired_bootstrap_ci(w, wo, level=0.9, n_resamples=1000, seed=3)
    lo99, hi99 = paired_bootstrap_ci(w, wo, level=0.99, n_resamples=1000, seed=3)
    assert lo99 <= lo and hi <= hi99


def test_selection_rules_mean_vs_confident():
    assert keep_skill(0.25, -0.05, 0.0, "mean") and not keep_skill(0.25, -0.05, 0.0, "confident")
    assert keep_skill(0.25, 0.05, 0.0, "confident")
    assert not keep_skill(0.0, 0.0, 0.0, "mean")  # strict: Δg must exceed the margin
    assert not keep_skill(0.25, 0.2, 0.3, "mean")
    with pytest.raises(ValueError):
        keep_skill(0.5, 0.5, 0.0, "median")


def test_detectable_delta_g_hand_computed():
    # (z_0.95 + z_0.90) * sd / sqrt(P) = (1.6449 + 1.2816) * 0.4 / sqrt(48) = 0.16899
    assert mining.detectable_delta_g(0.4, 48) == pytest.approx(0.16899, abs=1e-4)
    assert mining.detectable_delta_g(0.4, 4 * 48) == pytest.approx(0.16899 / 2, abs=1e-4)  # 4x pairs: half
    assert mining.detectable_delta_g(0.0, 10) == 0.0


def test_pairing_by_task_and_index():
    w = [FakeTraj("b", "x", [], True, 1), FakeTraj("a", "x", [], True, 0), FakeTraj("b", "x", [], False, 0)]
    wo = [FakeTraj("a", "x", [], False, 0), FakeTraj("b", "x", [], False, 0), FakeTraj("b", "x", [], True, 1)]
    r = pair_outcomes("s", w, wo)
    assert r.keys == [("a", 0), ("b", 0), ("b", 1)]
    assert r.with_success == [1.0, 0.0, 1.0] and r.without_success == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        pair_outcomes("s", w, wo[:2])


# ----- Skill and SkillBank -----

def test_skill_id_and_text():
    a, b = skill(), skill()
    assert a.id == b.id == mining.skill_id(a.task_type, a.text()) and len(a.id) == 12
    assert skill(task_type="look_at_obj_in_light").id != a.id
    text = a.text()
    assert "Skill: fridge routine" in text and "1. go to <recep>" in text and "- do not loop" in text


def test_bank_round_trip_latest_best(tmp_path):
    bank = SkillBank(str(tmp_path))
    s1, s2, s3 = skill(), skill(name="other"), skill(task_type="heat_then_place")
    for s, dg, status in ((s1, 0.25, "validated"), (s2, 0.5, "validated"), (s3, -0.25, "retired")):
        s.status = status
        s.utility.append({"round": 0, "delta_g": dg, "ci_low": dg - 0.1, "ci_high": dg + 0.1, "n_pairs": 16})
        assert bank.add(s)
    assert not bank.add(skill())  # same id: not added twice
    bank.save(0)
    s1.status = "retired"
    bank.save(1)
    assert sorted(os.listdir(tmp_path)) == ["skills_round_00.json", "skills_round_01.json"]
    latest = SkillBank.load_latest(str(tmp_path))
    assert latest.skills == bank.skills
    assert [s.id for s in latest.validated()] == [s2.id]
    assert latest.best("pick_and_place_simple").id == s2.id and latest.best("heat_then_place") is None
    old = SkillBank.load(str(tmp_path / "skills_round_00.json"))
    assert old.best("pick_and_place_simple").id == s2.id and len(old.validated()) == 2
    assert json.loads((tmp_path / "skills_round_01.json").read_text())["skills"][0]["id"] == s1.id
    assert SkillBank.load_latest(tmp_path / "empty").skills == []
    assert latest.task_types() == ["heat_then_place", "pick_and_place_simple"]
    table = latest.markdown().splitlines()
    assert len(table) == 2 + 3 and f"| {s2.id} | pick_and_place_simple | other | validated | 0 | +0.500 |" in table[3]


def test_corpus_examples_parse():
    prompt, answer, block = mining.corpus_examples()
    assert "{trajectories}" in prompt and parse_skill(answer)[1] is None and block.startswith("Skill: ")


def test_atomic_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    bank = SkillBank(str(tmp_path), [skill()])
    path = bank.save(0)
    before = open(path).read()
    bad = skill(name="broken")
    bad.utility.append({"round": 0, "delta_g": object()})  # json.dump fails half way through
    bank.add(bad)
    with pytest.raises(TypeError):
        bank.save(0)
    assert open(path).read() == before and os.listdir(tmp_path) == ["skills_round_00.json"]
    bank.skills.pop()

    def crash(*a):
        raise OSError("disk gone")
    monkeypatch.setattr(mining.os, "replace", crash)  # fails after the temp file is complete
    with pytest.raises(OSError):
        bank.save(0)
    assert open(path).read() == before and os.listdir(tmp_path) == ["skills_round_00.json"]


# ----- parsing -----

GOOD = {"name": "fridge routine", "task_type": "pick_and_place_simple", "when_to_use": "put x in fridge",
        "steps": ["go to <recep>", "take <obj> from <recep>"], "pitfalls": ["do not loop"]}


@pytest.mark.parametrize("text", [
    json.dumps(GOOD),
    "Sure! Here is the skill:\n" + json.dumps(GOOD) + "\nHope it helps.",
    "```json\n" + json.dumps(GOOD, indent=2) + "\n```",
    "{not json} then " + json.dumps({k: v for k, v in GOOD.items() if k != "task_type"}),
])
def test_parse_accepts_json_in_prose_and_fences(text):
    fields, err = parse_skill(text)
    assert err is None and fields["steps"] == GOOD["steps"] and fields["name"] == "fridge routine"


@pytest.mark.parametrize("text,reason", [
    ("I would go to the fridge and open it.", "no_json"),
    (json.dumps(GOOD)[:60], "no_json"),  # truncated by the token budget
    (json.dumps({k: v for k, v in GOOD.items() if k != "steps"}), "missing_field"),
    (json.dumps({**GOOD, "steps": "go to the fridge"}), "wrong_type"),
    (json.dumps({**GOOD, "steps": ["go", 3]}), "wrong_type"),
    (json.dumps({**GOOD, "steps": []}), "wrong_type"),
    ("[1, 2, 3]", "no_json"),
])
def test_parse_rejects_malformed(text, reason):
    assert parse_skill(text) == (None, reason)


# ----- template and random summarisers -----

def test_generalise_action_keeps_types_and_drops_numbers():
    assert generalise_action("go to fridge 1") == "go to fridge"
    assert generalise_action("take apple 2 from countertop 1") == "take <obj> from countertop"
    assert generalise_action("move apple 2 to fridge 1") == "move <obj> to fridge"
    assert generalise_action("put apple 2 in/on fridge 1") == "put <obj> in/on fridge"
    assert generalise_action("heat  Potato 1 with microwave 1") == "heat <obj> with microwave"
    assert generalise_action("open drawer 3") == "open drawer"
    assert generalise_action("use desklamp 1") == "use desklamp"
    assert generalise_action("inventory") == "inventory"
    assert generalise_action("search[red shoes size 9]") == "search[<query>]"
    assert mining.type_name("Sink Basin 2") == "sinkbasin" and mining.type_name("fridge 1") == "fridge"


def test_found_where_and_search_order():
    a, b, c = trajs()
    assert mining.found_where(a) == ("apple", "countertop") and mining.found_where(b) == ("apple", "diningtable")
    assert mining.found_where(make_traj("x", ["go to fridge 1"])) is None
    assert mining.where_counts([a, b, c]) == {"apple": {"countertop": 1, "diningtable": 1, "sinkbasin": 1}}
    # a task won again counts once: three wins of A's task and B's task -> one home each
    again = [make_traj(a.task_id, TRAJ_A, won=True) for _ in range(3)]
    assert mining.where_counts(again + [b]) == {"apple": {"countertop": 1, "diningtable": 1}}
    s = skill(where={"apple": {"fridge": 2, "countertop": 1}, "mug": {"coffeemachine": 1, "countertop": 1}})
    assert s.look_first() == ["countertop", "fridge", "coffeemachine"]  # 2, 2, 1 finds; ties alphabetical
    assert s.search_order("apple") == ["fridge", "countertop", "coffeemachine"]  # its own places first
    assert s.search_order("Mug") == ["coffeemachine", "countertop", "fridge"]
    assert s.search_order("pen") == s.look_first()
    assert "Look first in: countertop, fridge, coffeemachine" in s.text()
    assert "Found before: apple in fridge, countertop; mug in coffeemachine, countertop" in s.text()


def test_template_summary_is_deterministic_and_general():
    text = template_summary(trajs(), "pick_and_place_simple")
    assert text == template_summary(trajs(), "pick_and_place_simple")
    assert text == template_summary(trajs()[::-1], "pick_and_place_simple")  # order of the evidence is irrelevant
    fields, err = parse_skill(text)
    assert err is None
    # the routine from the first take on: A and C share it (the mode); B opens a drawer on the way
    assert fields["steps"] == ["go to <recep>", "take <obj> from <recep>", "go to <recep>",
                               "open <recep>", "move <obj> to <recep>"]
    assert fields["where"] == {"apple": {"countertop": 1, "diningtable": 1, "sinkbasin": 1}}
    assert fields["pitfalls"] == ["'open drawer' did nothing here"]
    assert not any(ch.isdigit() for s in fields["steps"] for ch in s)
    # "when to use" names the task type, never another task's instruction
    assert fields["when_to_use"] == mining.TASK_DESCRIPTIONS["pick_and_place_simple"]


def test_random_summary_is_deterministic_by_seed_and_shaped_like_the_template():
    a = json.loads(random_summary(trajs(), "pick_and_place_simple", seed=1))
    t = json.loads(template_summary(trajs(), "pick_and_place_simple"))
    assert a == json.loads(random_summary(trajs(), "pick_and_place_simple", seed=1))
    others = [json.loads(random_summary(trajs(), "pick_and_place_simple", seed=s)) for s in range(2, 8)]
    assert any(o["steps"] != a["steps"] for o in others) and any(o["where"] != a["where"] for o in others)
    assert len(a["steps"]) == len(t["steps"]) and a["when_to_use"] == t["when_to_use"]
    assert set(a["steps"]) <= {generalise_action(x) for x in TRAJ_A + TRAJ_B + TRAJ_C}
    # same objects and counts as the template, places drawn from where the trajectories went
    assert a["where"].keys() == t["where"].keys()
    assert sum(sum(c.values()) for c in a["where"].values()) == 3
    assert {r for c in a["where"].values() for r in c} <= {"countertop", "diningtable", "fridge", "sinkbasin"}


def test_format_trajectory_respects_budget():
    long = make_traj("t9", [f"go to cabinet {i}" for i in range(1, 40)])
    text = mining.format_trajectory(long, max_chars=600)
    assert len(text) <= 600 and text.startswith("Task: put a apple in fridge.")
    assert "1. go to cabinet 1 ->" in text and "39. go to cabinet 39 ->" in text and "omitted" in text
    prompt = mining.summary_prompt(trajs(), "pick_and_place_simple", 1200)
    assert "Episode 3" in prompt and '"task_type": "pick_and_place_simple"' in prompt


# ----- mine_round: dynamic evaluation, malformed counting (fake rollouts, no model) -----

class FakeEnvs:
    types = {"t0": "pick_and_place_simple", "t1": "pick_and_place_simple", "t2": "pick_and_place_simple",
             "t3": "pick_and_place_simple", "t4": "pick_and_place_simple", "h0": "heat_then_place"}

    def task_ids(self, split):
        return sorted(self.types) if split == "train" else []

    def task_type(self, task_id):
        return self.types[task_id]

    def reset(self, task_ids):  # mining asks the env for the instruction texts
        return [SimpleNamespace(task_id=t, task=f"instruction of {t}") for t in task_ids]


def fake_validate(outcomes, calls):
    """validate_fn stand-in: outcomes[skill name] = (with, without) success lists."""
    def fn(policy, envs, skill, task_ids, group_size, sampling_cfg, seed, baseline=None):
        calls.append((skill.name, tuple(task_ids), group_size, seed, baseline))
        w, wo = outcomes[skill.name]
        keys = [(t, i) for t in task_ids for i in range(group_size)][:len(w)]
        return PairedResult(skill.id, keys, w, wo, baseline=f"plain-{skill.task_type}")
    return fn


def test_dynamic_evaluation_retires_and_accepts(tmp_path):
    bank = SkillBank(str(tmp_path))
    old = skill(name="old habit", status="validated", round=0)
    old.utility.append({"round": 0, "delta_g": 0.5, "ci_low": 0.2, "ci_high": 0.8, "n_pairs": 16})
    bank.add(old)
    bank.save(0)
    cfg = MiningConfig(summariser="template", validation_tasks=2, validation_group=2, selection="confident")
    new_name = "pick_and_place_simple routine"
    calls = []
    outcomes = {"old habit": ([0, 1, 0, 0], [1, 1, 0, 0]),  # Δg = -0.25 < margin -> retired
                new_name: ([1, 1, 1, 1], [0, 0, 1, 0])}     # Δg = 0.75, every pair ≥ 0 -> validated
    buffer = trajs() + [make_traj("t3", TRAJ_A), make_traj("t4", TRAJ_C), make_traj("t1", TRAJ_B, won=False),
                        make_traj("h0", ["heat apple 1 with microwave 1"], task_type="heat_then_place")]
    buffer[-1].skill_id = "some-skill"  # skill-guided: not a source for mining
    bank.dir = "/nonexistent"  # bank_dir wins
    metrics = mine_round(None, FakeEnvs(), buffer, bank, 1, cfg, None, seed=0, bank_dir=tmp_path,
                         validate_fn=fake_validate(outcomes, calls))
    assert old.status == "retired" and old.utility[-1]["delta_g"] == pytest.approx(-0.25)
    new = [s for s in bank.skills if s.name == new_name][0]
    assert new.status == "validated" and new.round == 1
    # no leak: validated on 2 of the type's 5 pool tasks, summarised only from the other 3
    validation = set(calls[0][1])
    assert len(validation) == 2 and len(new.sources) == 3
    assert not validation & {src.split("-s0")[0] for src in new.sources}
    assert bank.best("pick_and_place_simple") is new
    assert metrics["mining/retired"] == 1 and metrics["mining/accepted"] == 1
    assert metrics["mining/candidates"] == 1 and metrics["mining/validated"] == 1
    assert metrics["mining/malformed"] == 0 and metrics["mining/delta_g/pick_and_place_simple"] == pytest.approx(0.75)
    # same tasks and seed for both skills of the type; the second reuses the first's plain rollouts
    assert calls[0][1:4] == calls[1][1:4] and calls[0][4] is None and calls[1][4] == "plain-pick_and_place_simple"
    assert len(calls[0][1]) == 2 and calls[0][2] == 2
    on_disk = SkillBank.load_latest(str(tmp_path))
    assert {s.name: s.status for s in on_disk.skills} == {"old habit": "retired", new_name: "validated"}
    assert os.path.exists(tmp_path / "skills_round_00.json")  # the earlier round is kept for diffing

    # round 2: the same template skill again is a duplicate, not re-tested; the validated one is re-measured
    outcomes[new_name] = ([1, 0, 0, 0], [0, 0, 1, 0])  # Δg = 0 -> retired (Δg must exceed the margin)
    metrics = mine_round(None, FakeEnvs(), buffer, bank, 2, cfg, None, seed=0,
                         validate_fn=fake_validate(outcomes, calls))
    assert metrics["mining/duplicates"] == 1 and metrics["mining/retired"] == 1 and new.status == "retired"
    assert bank.validated() == [] and len(new.utility) == 2


def test_selection_mean_keeps_what_confident_rejects(tmp_path):
    outcomes = {"pick_and_place_simple routine": ([1, 1, 0, 1], [0, 1, 1, 0])}  # Δg = 0.25, CI spans 0
    status = {}
    for sel in ("mean", "confident"):
        bank = SkillBank(str(tmp_path / sel))
        mine_round(None, FakeEnvs(), trajs(), bank, 0, MiningConfig(selection=sel), None, seed=0,
                   validate_fn=fake_validate(outcomes, []))
        status[sel] = bank.skills[0].status
    assert status == {"mean": "validated", "confident": "retired"}


@dataclass
class FakeGen:
    text: str


@dataclass
class FakeSampling:
    temperature: float = 1.0
    max_new_tokens: int = 512
    stop: str | None = "</action>"


@dataclass
class FakePolicy:
    """chat_ids/generate stand-in for the `policy` summariser: returns canned texts in order."""
    texts: list
    device: str = "cpu"
    seen: list = field(default_factory=list)

    def chat_ids(self, user_text):
        self.seen.append(user_text)
        return [len(self.seen)]

    def generate(self, prompts, cfg, generator=None):
        assert cfg.temperature == MiningConfig().summary_temperature and cfg.stop == ()
        return [FakeGen(self.texts[i]) for i in range(len(prompts))]


class PoolEnvs(FakeEnvs):
    """Four task types a-d with three pool tasks each (a0..d2), except type c: none."""
    types = {f"{t}{i}": t for t in "abd" for i in range(3)}


def test_policy_summariser_malformed_outputs_are_counted(tmp_path):
    types = ["a", "b", "c", "d"]
    buffer = [make_traj(f"{t}{i}", TRAJ_A, task_type=t) for t in types for i in range(3)]
    texts = ["no json at all", json.dumps(GOOD)[:50], "```json\n" + json.dumps(GOOD) + "\n```",
             json.dumps({**GOOD, "pitfalls": "none"})]
    pol = FakePolicy(texts)
    cfg = MiningConfig(summariser="policy", trajectories_per_skill=2)
    outcomes = {"fridge routine": ([1, 1], [0, 0])}
    cfg = dataclasses.replace(cfg, validation_tasks=1)
    m = mine_round(pol, PoolEnvs(), buffer, SkillBank(str(tmp_path)), 0, cfg, FakeSampling(), seed=0,
                   validate_fn=fake_validate(outcomes, []))
    # type c is not in the pool: its trajectories are never summarised; a, b, d give the first 3 texts
    assert len(pol.seen) == 3 and m["mining/malformed"] == 2 and m["mining/candidates"] == 1
    assert m["mining/malformed_no_json"] == 2
    assert "Episode 2" in pol.seen[0] and 'task type "a"' in pol.seen[0] and "Task: instruction of a" in pol.seen[0]


# ----- with the tiny model on the embedded environment -----

def expert_trajectory(envs, task_id):
    """A won plain Trajectory from the env's walkthrough (what Phase 0 would put in the buffer)."""
    (state,) = envs.reset([task_id])
    steps = []
    for action in envs.walkthrough(task_id):
        (new,) = envs.step([action])
        steps.append(core.Step([], [], [], "", action, True, new.reward, new.done, new.won,
                                     state.anchor, state.obs))
        state = new
    return core.Trajectory(task_id, state.task_type, f"{task_id}@expert", 0, None, steps, state.won)


def test_model_summariser_is_loaded_on_the_agents_device():
    """mining.summariser=model:<name>: a second Policy, with the agent's model settings and device."""
    pol = model.load_policy(model.ModelConfig(name="tiny"), device="cpu")
    summariser = mining.load_summariser("model:tiny", pol, model.ModelConfig(name="tiny"))
    assert isinstance(summariser, decoder.Policy) and summariser is not pol and summariser.device == pol.device


def test_validate_and_mine_round_with_tiny_model(tmp_path):
    pol = model.load_policy(model.ModelConfig(name="tiny"))
    # 7 train tasks: two of type pick_and_place_simple (ids are a prefix of the default list, so
    # the game cache is shared with the other tests); one env step per validation episode
    env_cfg = envs_lib.EnvConfig(max_steps=1, alfworld=envs_lib.AlfworldConfig(num_train_tasks=7, eval_per_type=1))
    envs = envs_lib.EnvManager(env_cfg)
    expert_envs = envs_lib.EnvManager(dataclasses.replace(env_cfg, max_steps=50))
    sampling = decoder.SamplingConfig(max_new_tokens=4)
    try:
        ids = envs.task_ids("train")
        tt = envs.task_type(ids[0])
        same_type = [t for t in ids if envs.task_type(t) == tt]
        s = Skill(name="demo", task_type=tt, when_to_use="always", steps=["go to <recep>"], pitfalls=[])
        r = mining.validate(pol, envs, s, same_type[:1], 2, sampling, seed=0)
        assert r.keys == [(same_type[0], 0), (same_type[0], 1)]
        assert len(r.with_success) == len(r.without_success) == 2
        assert all(t.skill_id is None for t in r.baseline)

        buffer = [expert_trajectory(expert_envs, t) for t in same_type[:2]]
        assert len(buffer) == 2 and all(t.won for t in buffer)
        texts = mining.task_texts(expert_envs, buffer)
        fields, err = parse_skill(template_summary(buffer, tt, tasks=texts))
        assert err is None and not any(ch.isdigit() for step in fields["steps"] for ch in step)
        obj, place = mining.found_where(buffer[0])
        assert obj in texts[same_type[0]] and place in fields["where"][obj]
        # the tiny model cannot write JSON: its summary is counted as malformed, nothing crashes
        cfg = MiningConfig(summariser="policy", max_summary_tokens=8, max_trajectory_chars=300,
                           validation_tasks=1, validation_group=2)
        m = mine_round(pol, envs, buffer, SkillBank(str(tmp_path / "bank")), 0, cfg, sampling, seed=0)
        assert m["mining/malformed"] == 1 and m["mining/candidates"] == 0
        # template skill, validated with real paired rollouts (M=1, G=2, 2 steps)
        cfg = dataclasses.replace(cfg, summariser="template")
        bank = SkillBank(str(tmp_path / "bank"))
        m = mine_round(pol, envs, buffer, bank, 1, cfg, sampling, seed=0)
        assert m["mining/candidates"] == 1 and bank.skills[0].utility[0]["n_pairs"] == 2
        assert os.path.exists(tmp_path / "bank" / "skills_round_01.json")
    finally:
        envs.close()
        expert_envs.close()


def test_answer_skill_names_the_objects_place_and_reads_counts_where_the_model_goes():
    """mining.answer_skill (the positive control): "Look first in:" is the receptacle type the
    walkthrough takes the object from; wrong=True names another type of the same room; the steps
    name no receptacle. reads.probe plays the three arms paired and counts each one's episodes."""
    env_cfg = envs_lib.EnvConfig(max_steps=2, alfworld=envs_lib.AlfworldConfig(num_train_tasks=7, eval_per_type=1))
    envs = envs_lib.EnvManager(env_cfg)
    try:
        tid = envs.task_ids("train")[0]
        tt = envs.task_type(tid)
        take = next(a for a in envs.walkthrough(tid) if a.startswith("take "))
        home = mining.type_name(take.split(" from ")[1])
        right = mining.answer_skill(envs, [tid], tt)
        wrong = mining.answer_skill(envs, [tid], tt, wrong=True)
        (state,) = envs.reset([tid])
        room = {mining.type_name(a[len("go to "):]) for a in state.admissible if a.startswith("go to ")}
        assert right.look_first() == [home]
        assert wrong.look_first()[0] != home and wrong.look_first()[0] in room
        assert all(home not in step for step in right.steps) and right.steps == wrong.steps
        pol = model.load_policy(model.ModelConfig(name="tiny"))
        others = [t for t in envs.task_ids("train") if t != tid and envs.task_type(t) == tt] or [tid]
        long_envs = envs_lib.EnvManager(dataclasses.replace(env_cfg, max_steps=30))  # walkthroughs end
        try:
            mined = reads.walkthrough_skill(long_envs, others, tt)
        finally:
            long_envs.close()
        assert mined.where and mined.where == mining.where_counts(
            [make_traj(t, [next(a for a in envs.walkthrough(t) if a.startswith("take "))]) for t in others])
        res = reads.probe(pol, envs, [tid], 2, decoder.SamplingConfig(max_new_tokens=8), seed=0, mined={tt: mined})
        assert list(res) == ["plain", "right", "wrong", "usual", "mined"]
        assert all(r["episodes"] == 2 and r["steps"] >= 2 and r["example"].startswith(tid) for r in res.values())
        assert (res["plain"]["at_home"], res["right"]["at_home"], res["wrong"]["at_home"]) == (0, 2, 0)
        assert (res["plain"]["at_home_room"], res["right"]["at_home_room"], res["wrong"]["at_home_room"]) == (0, 2, 0)
        assert list(reads.probe(pol, envs, [tid], 1, decoder.SamplingConfig(max_new_tokens=4), seed=0)) == \
            ["plain", "right", "wrong", "usual"]
        assert all(r["wins"] + sum(r[k] for k in reads.OUTCOMES) == r["episodes"] for r in res.values())
        obj = mining.object_home(envs, tid)[0]
        assert reads.outcome(make_traj(tid, [f"go to {home} 1"], won=False), obj) == "never took"
        assert reads.outcome(make_traj(tid, [f"take zzz 1 from {home} 1"], won=False), obj) == "took another object"
        assert reads.outcome(make_traj(tid, [f"take zzz 1 from {home} 1", f"take {obj} 1 from {home} 1"],
                                       won=False), obj) == "took it, lost"
        assert reads.outcome(make_traj(tid, [f"take {obj} 1 from {home} 1"]), obj) == "won"
        won = core.Trajectory(tid, tt, "g", 0, None, [
            core.Step([], [], [], "", None, False, 0.0, False, False, "a", "o"),
            core.Step([], [], [], "", f"go to {home} 1", True, 0.0, False, False, "a", "o")], False)
        assert reads.first_goto(won) == home
    finally:
        envs.close()


def test_usual_place_is_the_rooms_likeliest_home_of_the_object_type():
    """reads.usual_place, by hand from envs.HOMES: Apple is Fridge .5, CounterTop .3, DiningTable .2;
    the task's own goal type is not a place to search (mining.room_places); a type HOMES does not
    list for the object counts 0, ties alphabetical."""
    def state(task, places):
        return SimpleNamespace(task=task, admissible=[f"go to {p} 1" for p in places] + ["inventory"])
    assert reads.usual_place(state("put a clean apple in diningtable.", ["cabinet", "countertop", "fridge"]),
                             "apple") == "fridge"
    assert reads.usual_place(state("put a clean apple in fridge.", ["cabinet", "countertop", "fridge"]),
                             "apple") == "countertop"
    assert reads.usual_place(state("put some apple in fridge.", ["sofa", "cabinet"]), "apple") == "cabinet"


@pytest.mark.parametrize("slots", [64, 3])
def test_demonstrations_played_in_one_batch_equal_those_played_one_at_a_time(slots, monkeypatch):
    """siri.demonstrations plays every expert side by side in env slots (at most siri.DEMO_SLOTS at
    a time; 3: chunks of 3, 3, 1); each demonstration (states, histories, actions, win) must be the
    one `demonstration` plays alone, with the same random draws."""
    import random
    env_cfg = envs_lib.EnvConfig(max_steps=30, alfworld=envs_lib.AlfworldConfig(num_train_tasks=7, eval_per_type=1))
    envs = envs_lib.EnvManager(env_cfg)
    try:
        ids = envs.task_ids("train")
        rng = random.Random(3)
        alone = [siri.demonstration(envs, t, [], rng) for t in ids]
        rng = random.Random(3)
        monkeypatch.setattr(siri, "DEMO_SLOTS", slots)
        start = siri.initial_states(envs, ids)
        batch = siri.demonstrations(envs, ids, [siri.start_expert(s, envs.walkthrough(t), [], rng)
                                                for t, s in zip(ids, start)])
        def key(played):
            return [(state.obs, state.admissible, history, action) for state, history, action in played[0]], played[1]
        assert [key(d) for d in batch] == [key(d) for d in alone]
        assert all(won for _, won in batch) and len({len(d) for d, _ in batch}) > 1
        assert siri.demonstrations(envs, [], []) == []
    finally:
        envs.close()


def test_coldstart_skill_demonstrations_with_random_places_look_first_where_the_skill_says(monkeypatch):
    """coldstart.skill_places=random: every skill-augmented demonstration's first step goes to the
    place its skill names first, and the places are not always the object's (right or wrong).
    lists (mining.listed_skill): to the first place of the object's list that the room has."""
    env_cfg = envs_lib.EnvConfig(max_steps=30, alfworld=envs_lib.AlfworldConfig(num_train_tasks=7, eval_per_type=1))
    envs = envs_lib.EnvManager(env_cfg)
    try:
        ids = envs.task_ids("train")
        cfg = config.ColdStartConfig(skill_demos=3, skill_places="random")
        texts, stats = siri.coldstart_texts(envs, ids, cfg, MiningConfig(), seed=0)
        firsts = []
        for prompt, target in texts:
            if "Look first in: " in prompt and core.HISTORY_BLOCK.split("{")[0] not in prompt:
                said = prompt.split("Look first in: ")[1].split("\n")[0].split(", ")[0]
                firsts.append((said, core.extract_action(target)))
        assert stats["coldstart/demos_skill"] == len(firsts) > 0
        assert all(a.startswith("go to ") and mining.type_name(a[len("go to "):]) == said for said, a in firsts)
        homes = {mining.type_name(next(a for a in envs.walkthrough(t) if a.startswith("take ")).split(" from ")[1])
                 for t in ids}
        assert any(said not in homes for said, _ in firsts)
        lists = config.ColdStartConfig(skill_demos=3, skill_places="lists")
        made = []  # (skill, object, room places) of every listed skill the cold start drew
        listed = mining.listed_skill
        monkeypatch.setattr(mining, "listed_skill", lambda base, obj, room, *a: made.append(
            (listed(base, obj, room, *a), obj, room)) or made[-1][0])
        texts, stats = siri.coldstart_texts(envs, ids, lists, MiningConfig(), seed=0)
        first = [(p, core.extract_action(t)) for p, t in texts
                 if "Skill: " in p and core.HISTORY_BLOCK.split("{")[0] not in p]
        assert stats["coldstart/demos_skill"] == len(first) > 0 and len(made) >= len(first)
        searched = 0
        for prompt, action in first:  # the search starts at the first place of the object's list the room has
            sk, obj, room = next(m for m in made if m[0].text() in prompt)
            expected = next((p for p in sk.search_order(obj) if p in room), None)
            if expected is not None:
                searched += 1
                assert action.startswith("go to ") and mining.type_name(action[len("go to "):]) == expected
        assert searched > 0
    finally:
        envs.close()


def test_listed_skill_puts_the_drawn_place_first_among_the_places_the_room_has():
    """mining.listed_skill (coldstart.skill_places=lists): when the object is listed (3 times in 4),
    its list is 0-2 places the room lacks, then the drawn room place, so the first place of its
    search order that the room has is the drawn one; the drawn place varies; other objects'
    entries never name the task's object."""
    base = skill()
    room, absent = ["cabinet", "countertop", "fridge"], ["bed", "safe", "sofa"]
    drawn = []
    for seed in range(40):
        s = mining.listed_skill(base, "apple", room, absent, ["apple", "cd", "mug"], random.Random(seed))
        assert s.steps == base.steps and set(s.where) <= {"apple", "cd", "mug"}
        assert all(len(c) == 1 for o, c in s.where.items() if o != "apple")
        if "apple" in s.where:
            ranked = sorted(s.where["apple"], key=lambda r: -s.where["apple"][r])
            assert ranked[-1] in room and set(ranked[:-1]) <= set(absent)
            assert next(p for p in s.search_order("apple") if p in room) == ranked[-1]
            drawn.append(ranked[-1])
    assert 20 < len(drawn) < 40 and len(set(drawn)) > 1  # listed 3 times in 4, right or wrong


def test_split_pool_keeps_validation_tasks_out_of_the_summary_sources():
    pool = [f"{t}{i}" for t in "ab" for i in range(5)] + ["c0"]
    val, src = mining.split_pool(pool, lambda tid: tid[0], 3, seed=1)
    assert {tt: len(v) for tt, v in val.items()} == {"a": 3, "b": 3, "c": 1}
    for tt in "ab":
        assert not set(val[tt]) & src[tt] and set(val[tt]) | src[tt] == {f"{tt}{i}" for i in range(5)}
    assert src["c"] == set()  # one task: it validates, nothing may be summarised for it (no leak)
    assert mining.split_pool(pool, lambda tid: tid[0], 3, seed=1) == (val, src)  # fixed for the run
    assert mining.split_pool(pool, lambda tid: tid[0], 9, seed=1)[1]["a"]  # always a source left


def test_skill_story_page_tells_sources_outcomes_and_distilled_tokens(tmp_path):
    s = skill()
    s.sources = ["pick-s1@seed7/0", "pick-s2@seed7/3"]
    res = mining.PairedResult(s.id, [("t1", 0), ("t1", 1), ("t2", 0)], [True, True, False], [False, True, False], [])
    rec = mining.record_utility(s, res, 0, MiningConfig(), seed=0)
    assert rec["per_task"] == {"t1": [2, 1, 2], "t2": [0, 0, 1]}
    s.distilled += [{"round": 0, "offered": 40, "useful": 30, "kept": 12}, {"round": 0, "offered": 10, "useful": 0, "kept": 0}]
    page = SkillBank(str(tmp_path), [s]).story(0)
    assert "`pick-s1@seed7/0`, `pick-s2@seed7/3`" in page and s.text() in page
    assert "| t1 | 2 | 1 | 2 |" in page and "| t2 | 0 | 0 | 1 |" in page
    assert f"| 0 | {rec['delta_g']:+.3f} |" in page
    assert "50 tokens of skill-guided actions, 30 in trajectories that beat their plain group" in page
    assert "12 also with a positive advantage: distilled" in page
    assert s.id not in SkillBank(str(tmp_path), [dataclasses.replace(s, round=1)]).story(0)  # not yet proposed
