"""Tests for envs.py: embedded game generation, the real-data loader, prompts, parsing, manager.

Offline and CPU only. Generated games are cached once per test session in a tmp folder.
"""
import dataclasses
import json
import os
import random
import sys

import pytest

import core
import envs
import webshop
from envs import AlfworldConfig, EnvConfig, EnvManager, TASK_TYPES

SMALL = dict(receptacles=5, distractors=2, num_train_tasks=6, eval_per_type=1)
parse_action = envs.Alfworld.parse_action


def alf(seed: int = 0, **alfworld) -> EnvConfig:
    """An embedded ALFWorld config with these env.alfworld settings."""
    return EnvConfig(seed=seed, alfworld=AlfworldConfig(**alfworld))


def real(root, **alfworld) -> EnvConfig:
    return EnvConfig(source="real", max_steps=30, alfworld=AlfworldConfig(data_path=str(root), **alfworld))


@pytest.fixture(scope="session")
def cfg(tmp_path_factory):
    """A small embedded config whose games are generated once per session."""
    return EnvConfig(max_steps=30, alfworld=AlfworldConfig(cache_dir=str(tmp_path_factory.mktemp("alfworld_cache")),
                                                           **SMALL))


@pytest.fixture(scope="session")
def manager(cfg):
    with EnvManager(cfg) as m:
        m.task_ids("train"), m.task_ids("eval")  # generate + verify all games now
        yield m


def play_walkthroughs(m, task_ids):
    """Reset all slots, then step each slot's walkthrough in lockstep; returns the step history."""
    plans = [m.walkthrough(t) for t in task_ids]
    history = [m.reset(task_ids)]
    for k in range(max(len(p) for p in plans)):
        history.append(m.step([p[k] if k < len(p) else "look" for p in plans]))
    return plans, history


# ------------------------------------------------------------------------------ generation
def test_every_task_type_generates_solvable_and_its_walkthrough_wins(manager):
    eval_ids = manager.task_ids("eval")
    assert sorted(manager.task_type(t) for t in eval_ids) == sorted(TASK_TYPES)
    for t in eval_ids:  # the cached file is a verified game.tw-pddl
        with open(os.path.join(envs.embedded_cache_folder(manager.cfg), t + ".tw-pddl")) as f:
            game = json.load(f)
        assert game["solvable"] is True and game["walkthrough"]
        assert {"pddl_domain", "grammar", "pddl_problem"} <= set(game)
        assert "UNKNOWN GOAL" not in game["grammar"]
    plans, history = play_walkthroughs(manager, eval_ids)
    final = history[-1]
    assert all(s.won and s.done for s in final)
    for i, plan in enumerate(plans):
        win_step = history[len(plan)][i]
        assert win_step.won and win_step.reward == core.WIN_REWARD and win_step.steps == len(plan)
        assert all(h[i].reward == 0.0 and not h[i].won for h in history[:len(plan)])
    first = history[0]
    assert all(s.task.endswith(".") and s.task_type in TASK_TYPES for s in first)
    assert all(s.obs.startswith("You are in the middle of a room") for s in first)
    assert all("go to" in " ".join(s.admissible) for s in first)


def test_memoized_textworld_parsers_give_the_same_game(cfg, monkeypatch):
    """envs._memoize_textworld_parsers caches TextWorld's parses and fast-downward's PDDL -> SAS
    translation (kept pickled, and on disk: `envs.TRANSLATIONS_DIR`) and copies the text generator's
    context dicts only: every observation, admissible list, reward and win of the eval walkthroughs (plus a reset of the loaded games, an invalid and
    a searching step) is the same with the originals (the speed-ups would be bugs if anything
    differed)."""
    from textworld import logic
    from textworld.envs.pddl import logic as pddl_logic, textgen

    def play():
        with EnvManager(cfg) as m:
            ids = m.task_ids("eval")
            plans, history = play_walkthroughs(m, ids)
            history.append(m.reset(ids))
            history.append(m.step(["jump"] * len(ids)))
            history.append(m.step([next(a for a in s.admissible if a.startswith("go to")) for s in history[-1]]))
        return [[(s.obs, s.admissible, s.reward, s.won, s.done) for s in states] for states in history]

    import fast_downward

    envs.make_engine().close()  # installs the caches
    fast_downward.pddl2sas.cache.clear()  # translations come from the disk (written at generation) or are made anew
    cached = play()
    modules = (textgen, logic, pddl_logic)
    assert all(m._parse_and_convert is not m._parse_uncached for m in modules)  # the cache is on
    assert fast_downward.pddl2sas is not fast_downward._pddl2sas_uncached
    assert textgen.copy_context is not textgen._copy_context_deep
    for fn in (fast_downward.pddl2sas, pddl_logic._parse_and_convert):  # hits are unpickled, not deep-copied
        assert fn.cache and all(blob is not None for _, blob in fn.cache.values())
    assert envs.UNPICKLE_HITS
    translations = os.path.join(envs.embedded_cache_folder(cfg), "translations")  # on disk too
    assert len(os.listdir(translations)) >= len(fast_downward.pddl2sas.cache) > 0
    assert envs.TRANSLATIONS_DIR is None  # set for each load only (`envs._translations_in`)
    for m in modules:
        monkeypatch.setattr(m, "_parse_and_convert", m._parse_uncached)
    monkeypatch.setattr(fast_downward, "pddl2sas", fast_downward._pddl2sas_uncached)
    monkeypatch.setattr(textgen, "copy_context", textgen._copy_context_deep)
    assert play() == cached


def test_memoized_keeps_results_on_disk_and_hands_out_fresh_copies(tmp_path, monkeypatch):
    """`envs._memoized` with a disk folder: a second process's cache (a fresh wrapper) reads the
    result from disk instead of calling fn; every call hands out a copy of its own; an unreadable
    file is made anew and rewritten; a folder that cannot be written leaves memory only."""
    calls = []

    def fn(x, verbose=False):
        calls.append(x)
        return {"x": [x, {"nested": x}]}

    wrapped = envs._memoized(fn, "verbose", 8, folder=lambda: str(tmp_path))
    a, b = wrapped(1), wrapped(1)
    assert a == b == fn(1) and a is not b and a["x"] is not b["x"] and calls == [1, 1]
    a["x"].append("written by a caller")
    assert wrapped(1) == fn(1)  # the held copy is untouched
    files = list(tmp_path.glob("*.pkl"))
    assert len(files) == 1
    calls.clear()
    other = envs._memoized(fn, "verbose", 8, folder=lambda: str(tmp_path))  # another process
    assert other(1) == {"x": [1, {"nested": 1}]} and calls == []  # read from disk
    files[0].write_bytes(b"not a pickle")
    third = envs._memoized(fn, "verbose", 8, folder=lambda: str(tmp_path))
    assert third(1) == {"x": [1, {"nested": 1}]} and calls == [1]  # made anew ...
    assert envs._memoized(fn, "verbose", 8, folder=lambda: str(tmp_path))(1) and calls == [1]  # ... and rewritten
    monkeypatch.setattr(envs, "atomic_write", lambda *a: (_ for _ in ()).throw(OSError("read-only")))
    assert envs._memoized(fn, "verbose", 8, folder=lambda: str(tmp_path / "new"))(2) == fn(2)


def test_same_seed_same_game_and_different_seeds_differ():
    for task_type in TASK_TYPES:
        a = envs.generate_game(123, task_type, 5, 2)
        b = envs.generate_game(123, task_type, 5, 2)
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        assert envs.generate_game(124, task_type, 5, 2)["pddl_problem"] != a["pddl_problem"]
        assert "#" not in a["pddl_problem"]  # goal_library's '#' was turned into PDDL's '-'


def test_generation_does_not_depend_on_the_hash_seed():
    """Set iteration order changes with PYTHONHASHSEED; the generator must never depend on it."""
    import hashlib, subprocess  # noqa: E401
    code = ("import envs, json, hashlib; print(hashlib.sha1(json.dumps([envs.generate_game(s, t, 5, 2) "
            "for s, t in enumerate(envs.TASK_TYPES)], sort_keys=True).encode()).hexdigest())")
    here = hashlib.sha1(json.dumps([envs.generate_game(s, t, 5, 2) for s, t in enumerate(TASK_TYPES)],
                                   sort_keys=True).encode()).hexdigest()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="12345")).stdout.strip()
    assert out == here


def test_difficulty_knobs_change_the_scene():
    small = envs.generate_game(7, "pick_and_place_simple", receptacles=3, distractors=0)
    big = envs.generate_game(7, "pick_and_place_simple", receptacles=10, distractors=6)
    count = lambda g, kind: g["pddl_problem"].count(f" - {kind}\n")  # noqa: E731
    assert count(small, "receptacle") <= 3 < count(big, "receptacle")
    assert count(small, "object") < count(big, "object")


def test_openables_start_closed_and_the_target_is_sometimes_inside_one():
    import re
    inside_closed = []
    for seed in range(40):
        g = envs.generate_game(seed, "pick_and_place_simple", 6, 3)
        problem, target = g["pddl_problem"], g["siri"]["traj_data"]["pddl_params"]["object_target"]
        assert "(opened " not in problem
        recep = re.search(rf"\(inReceptacle {target}_bar_1 (\S+)\)", problem).group(1)
        inside_closed.append(f"(openable {recep})" in problem)
    assert 0 < sum(inside_closed) < len(inside_closed)


def test_objects_start_at_their_usual_home_unless_priors_are_off():
    """With location priors the target starts in its most likely home type (envs.HOMES) far more
    often than with uniform placement over the receptacles it fits (same seeds, same rooms drawn)."""
    import re

    def at_first_home(priors: bool) -> float:
        hits = []
        for seed in range(120):
            g = envs.generate_game(seed, "pick_and_place_simple", 6, 2, priors=priors)
            problem, target = g["pddl_problem"], g["siri"]["traj_data"]["pddl_params"]["object_target"]
            recep = re.search(rf"\(inReceptacle {target}_bar_1 (\S+)\)", problem).group(1)
            rtype = re.search(rf"\(receptacleType {re.escape(recep)} (\S+)Type\)", problem).group(1)
            homes = envs.HOMES.get(target, {})
            hits.append(bool(homes) and rtype == max(homes, key=homes.get))
        return sum(hits) / len(hits)

    with_priors, uniform = at_first_home(True), at_first_home(False)
    assert with_priors > uniform + 0.2, (with_priors, uniform)
    assert 0.3 < with_priors < 0.9  # a regularity, not a certainty: a plain policy still has to search
    assert envs.home_weights("Mug", ["CoffeeMachine", "Sofa"]) == [0.4, envs.OTHER_HOME_WEIGHT]
    assert envs.home_weights("Mug", ["CoffeeMachine", "Sofa"], priors=False) == [1.0, 1.0]


def test_train_and_eval_seeds_are_disjoint_and_eval_is_balanced():
    for seed in (0, 1, 7):
        c = alf(seed, num_train_tasks=300, eval_per_type=5)
        train, ev = envs.embedded_task_ids(c, "train"), envs.embedded_task_ids(c, "eval")
        seeds = lambda ids: {envs._parse_embedded_id(t)[1] for t in ids}  # noqa: E731
        assert len(train) == 300 and len(ev) == 30
        assert not seeds(train) & seeds(ev)
        assert all(sum(t.startswith(tt + "-s") for t in ev) == 5 for tt in TASK_TYPES)
        assert envs.embedded_task_ids(c, "eval") == ev  # deterministic
    other = alf(1, num_train_tasks=300)
    assert not set(envs.embedded_task_ids(other, "eval")) & set(envs.embedded_task_ids(alf(0), "train"))


def test_room_catalogue_is_consistent():
    for room, spec in envs.ROOMS.items():
        for obj in spec["objects"]:
            assert any(envs._fits(r, obj) for r in spec["receptacles"]), (room, obj)
    for task_type in TASK_TYPES:
        for room in envs.alfred_constants.GOALS_VALID[task_type]:
            recs = envs.ROOMS[room]["receptacles"]
            assert envs.TOOL.get(task_type, recs[0]) in recs
            if task_type == "look_at_obj_in_light":
                assert set(envs.LAMP_HOLDERS) & set(recs)


def test_games_are_cached_on_disk_atomically(manager):
    folder = envs.embedded_cache_folder(manager.cfg)
    names = [n for n in os.listdir(folder) if n != "translations"]  # the games' PDDL -> SAS translations
    assert not [n for n in names if n.startswith(".tmp-")]
    assert len(names) == 12
    mtimes = {n: os.path.getmtime(os.path.join(folder, n)) for n in names}
    assert envs.ensure_embedded_games(manager.cfg, manager.task_ids("eval")) == 0  # nothing regenerated
    assert mtimes == {n: os.path.getmtime(os.path.join(folder, n)) for n in names}
    translations = os.path.join(folder, "translations")
    assert not [n for n in os.listdir(translations) if not n.endswith(".pkl")]  # written atomically too


# ------------------------------------------------------------------------------ real data
@pytest.fixture(scope="session")
def real_root(manager, tmp_path_factory):
    """Our generated games written in the official json_2.1.1 layout, plus games ALFWorld skips."""
    root = tmp_path_factory.mktemp("alfworld_data") / "json_2.1.1"
    folder = envs.embedded_cache_folder(manager.cfg)

    def write(split, dirname, trial, game, traj):
        d = root / split / dirname / trial
        d.mkdir(parents=True)
        if game is not None:
            (d / "game.tw-pddl").write_text(json.dumps(game))
        (d / "traj_data.json").write_text(json.dumps(traj))

    for split, ids in (("valid_unseen", manager.task_ids("eval")), ("train", manager.task_ids("train")[:2])):
        for t in ids:
            with open(os.path.join(folder, t + ".tw-pddl")) as f:
                game = json.load(f)
            traj, seed = game["siri"]["traj_data"], game["siri"]["seed"]
            p = traj["pddl_params"]
            official = {k: game[k] for k in ("pddl_domain", "grammar", "pddl_problem", "solvable")}  # no walkthrough
            name = f"{traj['task_type']}-{p['object_target']}-None-{p['parent_target'] or p['toggle_target']}-{seed}"
            write(split, name, f"trial_T{seed}", official, traj)
    some_game = official
    traj = {"task_type": "pick_and_place_simple"}
    write("valid_unseen", "pick_and_place_with_movable_recep-Apple-Bowl-Fridge-1", "trial_T1",
          some_game, {"task_type": "pick_and_place_with_movable_recep"})
    write("valid_unseen", "pick_heat_then_place_in_recep-AppleSliced-None-Fridge-2", "trial_T2",
          some_game, {"task_type": "pick_heat_then_place_in_recep"})
    write("valid_unseen", "pick_and_place_simple-Mug-None-Desk-3", "trial_T3", dict(some_game, solvable=False), traj)
    write("valid_unseen", "pick_and_place_simple-Mug-None-Desk-4", "trial_T4",
          {k: v for k, v in some_game.items() if k != "solvable"}, traj)
    write("valid_unseen", "pick_and_place_simple-Mug-None-Desk-5", "trial_T5", None, traj)
    return root


def test_real_loader_reads_the_official_layout_and_plays(real_root, manager):
    cfg = real(real_root)
    with EnvManager(cfg) as m:
        ids = m.task_ids("eval")
        assert len(ids) == 6  # the movable / Sliced / unsolvable / no-"solvable" / no-game ones are skipped
        assert all(t.startswith("valid_unseen/") and "/trial_T" in t for t in ids)
        assert sorted(m.task_type(t) for t in ids) == sorted(TASK_TYPES)
        assert len(m.task_ids("train")) == 2
        plans, history = play_walkthroughs(m, ids)  # walkthroughs come from the engine's planner here
        assert all(p for p in plans) and all(s.won for s in history[-1])
        # the same games through the embedded source give the same opening
        first_embedded = manager.reset(manager.task_ids("eval"))
        by_type = {s.task_type: (s.obs, s.task) for s in first_embedded}
        assert all(by_type[s.task_type] == (s.obs, s.task) for s in history[0])


def test_real_game_order_is_seeded_and_type_interleaved(real_root):
    games = envs.collect_real_games(str(real_root), "valid_unseen")  # sorted: whole types in turn
    order = envs.stratified_order(games, seed=0)
    assert sorted(order) == sorted(t for t, _ in games)
    types = dict(games)
    assert [types[t] for t in order[:6]] == list(TASK_TYPES)  # any first N holds the types evenly
    big = tuple((f"x/{tt}-{k}/trial", tt) for tt in TASK_TYPES for k in range(5))
    first = envs.stratified_order(big, seed=0)[:12]
    assert sorted(types_of := [t.split("/")[1].rsplit("-", 1)[0] for t in first]) == sorted(TASK_TYPES * 2), types_of
    assert envs.stratified_order(big, seed=0) == envs.stratified_order(big, seed=0) != envs.stratified_order(big, seed=1)
    with EnvManager(real(real_root, real_max_tasks=3)) as m:
        assert m.task_ids("eval") == order[:3]


def test_real_loader_missing_data_raises_a_clear_error(tmp_path, real_root):
    with pytest.raises(envs.AlfworldDataNotFound, match="alfworld-download"):
        EnvManager(real(tmp_path / "nowhere"))
    with EnvManager(real(real_root, real_eval_split="valid_seen")) as m:
        with pytest.raises(envs.AlfworldDataNotFound, match="valid_seen"):
            m.task_ids("eval")


# ------------------------------------------------------------------------------ parsing
ADM = ["go to fridge 1", "open fridge 1", "look"]


@pytest.mark.parametrize("text, expected", [
    ("<think>go</think><action>go to fridge 1</action>", ("go to fridge 1", True)),
    ("go to fridge 1", (None, False)),                                          # no tags
    ("<think>x</think>go to fridge 1", (None, False)),                          # no action tag
    ("<action>go to fridge 1</action>", (None, False)),                         # missing think
    ("<think>a</think><action>look</action> then <action>open fridge 1</action>", ("open fridge 1", True)),
    ("<think>a</think><action>   go   to\n fridge  1 </action>", ("go to fridge 1", True)),  # spaces
    ("<think>a</think><action>GO TO Fridge 1</action>", ("go to fridge 1", True)),         # case
    ("<THINK>a</THINK><ACTION>look</ACTION>", ("look", True)),
    ("<think>a</think><action>go to fridge 2</action>", (None, False)),         # inadmissible
    ("<think>a</think><action></action>", (None, False)),                       # empty action
    ("", (None, False)),
    ("<think>a</think><action>go to <action>fridge 1</action>", (None, False)),  # garbled
    ("<think>unclosed <action>look", (None, False)),
])
def test_parse_action(text, expected):
    assert parse_action(text, ADM) == expected


def test_parse_action_never_raises_and_each_env_has_its_grammar():
    web_parse = webshop.WebShop.parse_action
    for junk in (None, 3, "<think></think><action>\x00</action>", "<" * 1000):
        assert parse_action(junk, ADM) == (None, False)
        assert web_parse(junk, ["search[<your query>]"]) == (None, False)
    web = ["search[<your query>]", "click[buy now]"]
    # ALFWorld: exact match only, a bracket template is just another string
    assert parse_action("<think>t</think><action>Search[Red  shoes]</action>", web) == (None, False)
    # WebShop: any non-empty query where the page offers the search template (webshop.is_admissible)
    assert web_parse("<think>t</think><action>Search[Red  shoes]</action>", web) == ("search[red shoes]", True)
    assert web_parse("<think>t</think><action>click[Buy Now]</action>", web) == ("click[buy now]", True)
    for bad in ("search[]", "search[ ]", "search[<your query>]", "search red shoes", "click[red shoes]"):
        assert web_parse(f"<think>t</think><action>{bad}</action>", web) == (None, False)
    assert web_parse("<think>t</think><action>search[shoes]</action>", ["click[buy now]"]) == (None, False)


# ------------------------------------------------------------------------------ prompts
def test_prompt_plain_and_with_skill(manager):
    state = manager.reset(manager.task_ids("eval")[:1])[0]
    history = [("obs A", "look"), ("obs B", "go to x 1"), ("obs C", None)]
    plain = manager.build_prompt(state, history)
    skill = "SKILL-TEXT: find the object first, then go to the target."
    with_skill = manager.build_prompt(state, history, skill=skill)
    assert state.task in plain and state.obs in plain
    assert envs.ACTION_SEPARATOR.join(state.admissible) + "\n" in plain and "step(s)" not in plain
    verl = dataclasses.replace(manager.cfg, alfworld=dataclasses.replace(manager.cfg.alfworld, verl_agent_prompt=True))  # the public GiGPO code's prompt
    assert "help" in state.admissible  # offered by the engine, not by that prompt
    assert envs.ACTION_SEPARATOR.join(a for a in state.admissible if a != "help") + "\n" in envs.Alfworld.build_prompt(verl, state, history)
    assert "taken 3 step(s); this is step 4" in envs.Alfworld.build_prompt(verl, state, history)
    assert "this is step 1." in envs.Alfworld.build_prompt(verl, state, [])
    assert "<think>" in plain and "<action>" in plain
    assert "obs A" not in plain and "obs B" in plain and "(invalid)" in plain  # history_len = 2
    assert skill in with_skill and "SKILL" not in plain and "skill" not in plain.lower()
    assert with_skill.replace(envs.SKILL_BLOCK.format(skill=skill), "") == plain
    assert manager.build_prompt(state, [], skill=None) == manager.build_prompt(state, [], skill="")
    assert "steps" not in manager.build_prompt(state, [])
    assert webshop.SEARCH_HINT not in plain and "\n".join(state.admissible) not in plain


def test_rename_permutes_names_and_numbers_and_is_undone_by_the_inverse_map(manager):
    """envs.rename (the cold start's renamed rooms): every game's walkthrough action stays admissible
    in the renamed room, the tools keep their type, and renaming back gives the text: no name is
    ever renamed in part ("pen" inside "pencil") or missed on one side."""
    rng = random.Random(0)
    for tid in manager.task_ids("train")[:6]:
        state = manager.reset([tid])[0]
        text = manager.build_prompt(state, []) + "\n" + manager.walkthrough(tid)[0]
        mapping = envs.rename_map(rng)
        renamed = envs.rename(text, mapping)
        assert renamed != text and envs.rename(renamed, {v: k for k, v in mapping.items()}) == text
        *_, first = renamed.split("\n")
        assert first in renamed.split("Admissible actions: ")[1].split("\n")[0].split(" | ")
    mapping = envs.rename_map(rng)
    assert sorted(mapping[n] for n in envs.RENAMED_RECEPTACLES) == envs.RENAMED_RECEPTACLES
    assert envs.rename("heat pencil 2 with microwave 1, pen 3", mapping) == \
        f"heat {mapping['pencil']} {mapping['2']} with microwave {mapping['1']}, {mapping['pen']} {mapping['3']}"


# ------------------------------------------------------------------------------ manager
def test_group_copies_share_the_initial_state(manager):
    tid = manager.task_ids("train")[0]
    argv = list(sys.argv)
    states = manager.reset([tid] * 4)
    assert sys.argv == argv  # fast-downward's translator overwrites sys.argv; envs.py restores it
    assert len({(s.obs, s.task, tuple(s.admissible), s.anchor) for s in states}) == 1
    assert all(s.steps == 0 and not s.done and s.reward == 0.0 and s.task_id == tid for s in states)
    assert all(s.score is None for s in states)  # only WebShop reports a score
    assert states[0].anchor == envs.anchor_key(states[0].obs) and len(states[0].anchor) == 16


def test_invalid_action_is_a_counted_noop(manager):
    tid = manager.task_ids("train")[1]
    start = manager.reset([tid, tid])
    after = manager.step([None, start[1].admissible[0]])
    assert after[0].obs == "Nothing happens." and after[0].reward == 0.0 and after[0].steps == 1
    assert after[0].admissible == start[0].admissible and not after[0].done and after[0].score is None
    assert after[1].steps == 1 and after[1].obs != "Nothing happens."
    assert manager.invalid_steps == [1, 0]
    assert after[0].anchor == start[0].anchor  # the env state is unchanged, so is its anchor key
    assert manager.step([None, None])[1].anchor == after[1].anchor != start[0].anchor
    again = manager.step([start[1].admissible[0], None])  # the env was untouched by the Nones
    assert again[0].obs == after[1].obs


def test_max_steps_ends_the_episode(cfg):
    with EnvManager(dataclasses.replace(cfg, max_steps=3)) as m:
        tid = m.task_ids("train")[0]
        m.reset([tid])
        states = [m.step(["look"])[0] for _ in range(3)]
        assert [s.done for s in states] == [False, False, True] and not states[-1].won
        assert m.step(["look"])[0] == states[-1]  # done slot: action ignored, state unchanged


def test_done_slots_ignore_actions(manager):
    tid = manager.task_ids("train")[2]
    plan = manager.walkthrough(tid)
    manager.reset([tid])
    for a in plan:
        last = manager.step([a])[0]
    assert last.won and last.done
    assert manager.step(["look"])[0] == last


def test_returning_tasks_reuse_loaded_games(cfg):
    """reset([a, a, b, b]) then reset([b, b, a, a]): slots get the backends already holding their game."""
    with EnvManager(cfg) as m:
        a, b = m.task_ids("train")[:2]
        first = m.reset([a, a, b, b])
        old = dict(m._local.backends)
        second = m.reset([b, b, a, a])
        now = m._local.backends
        assert {id(now[0]), id(now[1])} == {id(old[2]), id(old[3])}
        assert {id(now[2]), id(now[3])} == {id(old[0]), id(old[1])}
        assert [s.obs for s in second] == [s.obs for s in first[2:] + first[:2]]
        m.reset([a])  # fewer slots: the other backends wait as spares
        assert len(m._local.backends) == 1 and len(m._local.spare) == 3
        # a reset in parts (agent.rollout's waves): the second part keeps the first part's backends
        # and still finds the spares that hold its games
        parts = m.reset_begin([a, a, b, b], [[0, 1], [2, 3]])
        m.reset_end(parts[0])
        held = {k: id(m._local.backends[k]) for k in (0, 1)}
        m.reset_end(parts[1])
        assert {k: id(m._local.backends[k]) for k in (0, 1)} == held and len(m._local.backends) == 4
        assert all(m._local.backends[k].loaded_task == b for k in (2, 3)) and not m._local.spare
        assert [s.obs for s in m.states] == [s.obs for s in first]


def test_a_reset_in_parts_starts_each_worker_with_a_full_reset(cfg):
    """Each worker's first request of a rollout is "reset" (its other slots' backends become spare),
    later ones "reset_more", also when a worker has no slot in the first part."""
    with EnvManager(dataclasses.replace(cfg, num_workers=2)) as m:
        a, b = m.task_ids("train")[:2]
        sent, send = [], m._send

        def spy(cmd, items, log=sent):
            log.append(sorted({(i % 2, cmd(i % 2)) for i, _ in items}))
            return send(cmd, items)

        m._send = spy
        for part in m.reset_begin([a, a, b, b], [[0, 1], [2, 3]]):
            m.reset_end(part)
        for part in m.reset_begin([a, b], [[0], [1]]):
            m.reset_end(part)
        assert sent == [[(0, "reset"), (1, "reset")], [(0, "reset_more"), (1, "reset_more")],
                        [(0, "reset")], [(1, "reset")]]
        assert [s.task_id for s in m.states] == [a, b]


def _scripted_run(m, task_ids, n_steps=12):
    """Even slots follow their walkthrough (with some invalid steps), odd slots act at random."""
    rng = random.Random(0)
    plans = [m.walkthrough(t) for t in task_ids]
    pos = [0] * len(task_ids)
    trace = [m.reset(task_ids)]
    for _ in range(n_steps):
        actions = []
        for i, s in enumerate(trace[-1]):
            if rng.random() < 0.2:
                actions.append(None)
            elif i % 2 == 0 and pos[i] < len(plans[i]):
                actions.append(plans[i][pos[i]])
                pos[i] += 1
            else:
                actions.append(rng.choice(s.admissible))
        trace.append(m.step(actions))
    return trace


def test_workers_give_the_same_states_as_in_process(cfg):
    ids = [t for t in EnvManager(cfg).task_ids("train")[:3] for _ in range(2)]
    with EnvManager(cfg) as m0:
        trace0 = _scripted_run(m0, ids)
    with EnvManager(dataclasses.replace(cfg, num_workers=2)) as m2:
        trace2 = _scripted_run(m2, ids)
        assert _scripted_run(m2, ids) == trace2  # second reset of the same ids (cached games)
    assert trace0 == trace2
    assert all(s.won for s in trace0[-1][::2]) and any(s.obs == "Nothing happens." for t in trace0 for s in t)


def test_make_envs_and_unknown_names():
    assert isinstance(envs.make_envs(alf(num_train_tasks=0, eval_per_type=0)), EnvManager)
    with pytest.raises(ValueError):
        EnvManager(EnvConfig(name="nethack"))
    with pytest.raises(ValueError):
        EnvManager(EnvConfig(source="somewhere"))


def test_env_bench_runs_at_a_tiny_size(capsys):
    """`python envs.py bench` (README, Benchmarks) keeps working; its copy comparison restores ours."""
    from textworld.envs.pddl import textgen
    envs.bench(games_per_type=1, slot_counts=(4,), workers=(0,), group_size=2, steps=3)
    out = capsys.readouterr().out
    assert "ratio copies" in out and "rollout N=  4 workers=0" in out
    assert textgen.copy_context is envs._copy_context
