"""Embedded WebShop: the reward on hand-made goal/product pairs, pages and navigation,
invalid actions, a scripted buyer with a hand-computed reward, determinism, splits, and the
shop through envs.EnvManager (parsing, prompts, rewards 10 x won with the score beside, workers)."""
import dataclasses
import random
import sys
import time

import pytest

import envs
import webshop
from envs import EnvConfig, EnvManager
from webshop import Goal, Product, WebShopBackend, webshop_reward

LIP = "Beauty & Personal Care › Makeup › Lips › Lipstick"
EYE = "Beauty & Personal Care › Makeup › Eyes › Eyeshadow"
EAR = "Electronics › Headphones, Earbuds & Accessories › Headphones & Earbuds › Earbud Headphones"


def cfg(**kw):
    """A small shop: every WebShop knob is an EnvConfig field (defaults defined there once)."""
    return EnvConfig(**{"name": "webshop", "max_steps": 15, "num_products": 300, "num_train_goals": 100,
                        "num_eval_goals": 50, **kw})


def lipstick(**kw):
    fields = dict(asin="b0lip00001", title="Lumina Matte Lipstick", category="beauty", query="lipstick",
                  product_category=LIP, attributes=["long lasting", "cruelty free"],
                  options={"color": ["nude", "pink"]}, price=15.99)
    return Product(**{**fields, **kw})


GOAL = Goal(asin="b0lip00001", category="beauty", query="lipstick", name="Lumina Matte Lipstick",
            product_category=LIP, instruction="i need lipstick that is long lasting and cruelty free with "
            "color: nude, and price lower than 20.00 dollars", attributes=["cruelty free", "long lasting"],
            goal_options={"color": "nude"}, price_upper=20.0)


# --- reward: r_type · (n_att + n_opt + 1[price <= u]) / (|U_att| + |U_opt| + 1) ----------

def test_full_match_is_one():
    r, parts = webshop_reward(lipstick(), GOAL, 15.99, {"color": "nude"})
    assert r == 1.0 and parts == dict(r_type=1.0, n_att=2, n_opt=1, r_price=1.0)


@pytest.mark.parametrize("product, price, chosen, expected", [
    (lipstick(attributes=["long lasting"]), 15.99, {"color": "nude"}, 3 / 4),   # one attribute missing
    (lipstick(attributes=[]), 15.99, {"color": "nude"}, 2 / 4),                 # both missing
    (lipstick(), 15.99, {"color": "pink"}, 3 / 4),                              # wrong option
    (lipstick(), 15.99, {}, 3 / 4),                                             # no option chosen
    (lipstick(), 25.99, {"color": "nude"}, 3 / 4),                              # over budget
    (lipstick(), 20.00, {"color": "nude"}, 1.0),                                # price == bound is within
    (lipstick(attributes=[]), 25.99, {"color": "pink"}, 0.0),                   # everything missed
])
def test_each_miss_costs_its_share(product, price, chosen, expected):
    assert webshop_reward(product, GOAL, price, chosen)[0] == pytest.approx(expected)


def test_attribute_found_fuzzily_or_in_text():
    # token_set_ratio("long-lasting formula", "long lasting") = 100: one token set inside the other
    p = lipstick(attributes=["long-lasting formula", "cruelty free"])
    assert webshop_reward(p, GOAL, 15.99, {"color": "nude"})[0] == 1.0
    # not among the attributes but in the features text (WebShop's substring fallback)
    p = lipstick(attributes=["long lasting"], features=["CRUELTY FREE: never tested on animals."])
    assert webshop_reward(p, GOAL, 15.99, {"color": "nude"})[0] == 1.0
    # unrelated attribute sharing a word stays below the 85 threshold
    assert webshop.token_set_ratio("sulfate free", "cruelty free") <= 85


def test_size_exact_other_options_fuzzy_and_colour_normalised():
    goal = Goal(**{**GOAL.__dict__, "goal_options": {"size": "large"}})
    p = lipstick(options={"size": ["large", "x-large"]})
    assert webshop_reward(p, goal, 15.99, {"size": "large"})[0] == 1.0
    assert webshop_reward(p, goal, 15.99, {"size": "x-large"})[0] == pytest.approx(3 / 4)   # size: exact only
    goal = Goal(**{**GOAL.__dict__, "goal_options": {"style": "large"}})
    p = lipstick(options={"style": ["x-large"]})
    assert webshop_reward(p, goal, 15.99, {"style": "x-large"})[0] == 1.0   # other names: token_set_ratio 100
    goal = Goal(**{**GOAL.__dict__, "goal_options": {"color": "ruby red"}})
    assert webshop.normalize_color("classic red") == webshop.normalize_color("ruby red") == "red"
    assert webshop_reward(lipstick(options={"color": ["classic red"]}), goal, 15.99, {"color": "classic red"})[0] == 1.0


def test_type_reward_rules():
    # goal nouns {lumina, lipstick}; an earbud shares none -> r_type 0, the reward is 0 whatever else matches
    ear = lipstick(title="Voltix Wireless Earbuds", query="wireless earbuds", product_category=EAR)
    assert webshop.type_reward(ear, GOAL) == 0.0
    assert webshop_reward(ear, GOAL, 15.99, {"color": "nude"})[0] == 0.0
    # other brand, same noun: title_score 1/2 > 0.2 -> 1
    assert webshop.type_reward(lipstick(title="Verella Liquid Lipstick"), GOAL) == 1.0
    # goal with 6 nouns, product shares 1 (title_score 1/6, in [0.1, 0.2]): 0.5 unless query/category match
    goal6 = Goal(**{**GOAL.__dict__, "name": "Lumina Lipstick Set Palette Kit Shampoo"})
    assert len(webshop.title_nouns(goal6.name)) == 6
    kit = lipstick(title="Voltix Kit", query="phone case", product_category=EAR)
    assert webshop.type_reward(kit, goal6) == 0.5
    assert webshop_reward(kit, goal6, 15.99, {"color": "nude"})[0] == 0.5
    eye_kit = lipstick(title="Voltix Kit", query="eyeshadow palette", product_category=EYE)
    assert webshop.type_reward(eye_kit, goal6) == 1.0                      # 2 breadcrumb levels shared
    same_query = lipstick(title="Voltix Kit", query="lipstick", product_category=EAR)
    assert webshop.type_reward(same_query, goal6) == 1.0                   # same query
    # 11 nouns, 1 shared: title_score 1/11 < 0.1 -> 0.1 even with the same query
    goal11 = Goal(**{**GOAL.__dict__, "name": goal6.name + " Moisturizer Cream Polish Earbuds Speaker"})
    assert webshop.type_reward(lipstick(title="Voltix Kit"), goal11) == 0.1


def test_summarize():
    assert webshop.summarize([1.0, 0.5, 0.0, 1.0]) == dict(score=62.5, success_rate=0.5)


# --- pages, navigation, invalid actions ------------------------------------------------

@pytest.fixture(scope="module")
def shop():
    return WebShopBackend(cfg())


def test_reset_info_and_search_page(shop):
    tid = shop.task_ids("eval")[0]
    obs, info = shop.reset(tid)
    assert obs == "WebShop [SEP] Search" and info["admissible"] == ["search[<your query>]"]
    assert info["task"] == shop.goals[0].instruction and info["task_type"] == shop.task_type(tid)
    assert info["won"] is False and info["score"] == 0.0 and info["invalid"] is False


def test_pagination_and_back_navigation(shop):
    shop.reset(shop.task_ids("eval")[0])
    obs1, r, done, info = shop.step("search[long lasting lipstick easy to install water resistant]")
    assert (r, done) == (0.0, False) and "Page 1 (Total results: 50)" in obs1
    assert "click[next >]" in info["admissible"] and "click[< prev]" not in info["admissible"]
    items = [a for a in info["admissible"] if a.startswith("click[b0")]
    assert len(items) == 10
    obs2, _, _, info2 = shop.step("click[next >]")
    assert "Page 2" in obs2 and "click[< prev]" in info2["admissible"] and items[0] not in info2["admissible"]
    for _ in range(3):
        obs5, _, _, info5 = shop.step("click[next >]")
    assert "Page 5" in obs5 and "click[next >]" not in info5["admissible"]      # last page
    for _ in range(4):
        back, _, _, _ = shop.step("click[< prev]")
    assert back == obs1
    item, _, _, info = shop.step(items[0])
    p = shop.by_asin[items[0][6:-1]]
    assert p.title in item and f"Price: ${p.price:.2f}" in item
    assert {"click[buy now]", "click[description]", "click[features]", "click[reviews]",
            "click[< prev]"} <= set(info["admissible"])
    value = next(iter(p.options.values()))[0]
    chosen, _, _, _ = shop.step(f"click[{value}]")
    assert chosen.startswith(f"You have clicked {value}.")
    feats, _, _, info = shop.step("click[features]")
    assert p.features[-1] in feats and info["admissible"] == ["click[back to search]", "click[< prev]"]
    assert shop.step("click[< prev]")[0] == chosen                              # sub-page -> item, option kept
    assert shop.step("click[< prev]")[0] == obs1                                # item -> results page
    obs, _, _, info = shop.step("click[back to search]")
    assert obs == "WebShop [SEP] Search" and info["admissible"] == ["search[<your query>]"]


@pytest.mark.parametrize("bad", ["click[b0nothere]", "click[buy now]", "search[again]", "search[]", "buy it", "",
                                 "click[]"])   # search[again]: no search bar on a results page
def test_invalid_action_leaves_page_unchanged(shop, bad):
    shop.reset(shop.task_ids("eval")[1])
    before, _, _, _ = shop.step("search[lipstick]")
    obs, r, done, info = shop.step(bad)
    assert (obs, r, done, info["invalid"]) == (before, 0.0, False, True)
    assert shop.step("click[back to search]")[3]["invalid"] is False          # still usable afterwards


def test_after_buying_the_episode_is_over(shop):
    tid = shop.task_ids("eval")[2]
    shop.reset(tid)
    for a in shop.walkthrough(tid):
        obs, r, done, info = shop.step(a)
    assert done and r == envs.WIN_REWARD and info["won"] and info["score"] == 1.0 and info["admissible"] == []
    obs, r, done, info = shop.step("click[buy now]")
    assert (r, done, info["invalid"], info["score"]) == (0.0, True, True, 1.0)   # the score stays


# --- scripted buyer with a hand-computed reward -----------------------------------------

def test_scripted_buyer_hand_computed():
    # Target p1 has both attributes, but only in its features, which the index does not see;
    # the lure p2 says both in its description, so BM25 ranks it first for the instruction.
    p1 = lipstick(description="A matte lipstick for every day.", features=["Designed with care by our team.",
                  "LONG LASTING: stays on.", "CRUELTY FREE: never tested on animals."], price=12.99)
    p2 = lipstick(asin="b0lip00002", title="Verella Liquid Lipstick", options={"color": ["ruby red"]},
                  description="Long lasting and cruelty free liquid lipstick.", price=35.99)
    p3 = lipstick(asin="b0ear00003", title="Voltix Wireless Earbuds", query="wireless earbuds", product_category=EAR,
                  attributes=["water resistant"], options={"color": ["black", "white"]}, description="Earbuds.",
                  price=29.99)
    shop = WebShopBackend(cfg(num_eval_goals=1), products=[p1, p2, p3], goals=[GOAL])
    assert shop.engine.search(GOAL.instruction)[:2] == ["b0lip00002", "b0lip00001"]
    # The buyer opens p2, cannot click "nude" (not offered), buys with no option:
    # r_type 1 (same query) · (2 attributes + 0 options + 0 price: 35.99 > 20) / (2 + 1 + 1) = 0.5
    assert webshop.scripted_buyer(shop, "webshop:0") == 0.5
    # The expert skips p2 (at most 0.5) and buys p1 in nude: (2 + 1 + 1) / 4 = 1.
    acts = shop.walkthrough("webshop:0")
    assert acts == ["search[i need lipstick that is long lasting and cruelty free with color: nude]",
                    "click[b0lip00001]", "click[nude]", "click[buy now]"]
    shop.reset("webshop:0")
    steps = [shop.step(a) for a in acts]
    assert [r for _, r, _, _ in steps] == [0.0, 0.0, 0.0, envs.WIN_REWARD]   # training reward: 10 x won
    assert [i["score"] for _, _, _, i in steps] == [0.0, 0.0, 0.0, 1.0]      # WebShop's reward


# --- catalogue, goals, splits, determinism ----------------------------------------------

def test_catalogue_is_fast_and_covers_webshop_categories():
    webshop._build_shop.cache_clear()
    t0 = time.perf_counter()
    shop = WebShopBackend(cfg(num_products=1000, num_train_goals=2000, num_eval_goals=500))
    assert time.perf_counter() - t0 < 2.0
    assert {p.category for p in shop.products} == {"beauty", "electronics", "fashion", "food", "furniture"}
    assert len({p.asin for p in shop.products}) == 1000
    for p in shop.products:   # a value clicks to one option name; colours stay distinct after normalising
        values = [v for vs in p.options.values() for v in vs]
        assert len(values) == len(set(values))
        for vs in p.options.values():
            assert len({webshop.normalize_color(v) for v in vs}) == len(vs)


def test_wrong_option_or_missing_attribute_never_wins(shop):
    for g in shop.goals[:50]:
        p = shop.by_asin[g.asin]
        assert webshop_reward(p, g, p.price, dict(g.goal_options))[0] == 1.0
        for k, v in g.goal_options.items():
            for other in set(p.options[k]) - {v}:
                assert webshop_reward(p, g, p.price, {**g.goal_options, k: other})[0] < 1.0


def test_walkthroughs_win_within_15_steps(shop):
    for tid in shop.task_ids("eval"):
        shop.reset(tid)
        acts = shop.walkthrough(tid)
        assert len(acts) <= 15
        steps = [shop.step(a) for a in acts]
        assert steps[-1][1] == envs.WIN_REWARD and steps[-1][3]["score"] == 1.0
        assert all(r == 0.0 and i["score"] == 0.0 for _, r, _, i in steps[:-1])


def test_splits_disjoint_fixed_and_deterministic():
    a = WebShopBackend(cfg(seed=3))
    webshop._build_shop.cache_clear()                   # b builds its shop from scratch
    b = WebShopBackend(cfg(seed=3))
    assert a.products is not b.products
    ev, tr = a.task_ids("eval"), a.task_ids("train")
    assert len(ev) == 50 and len(tr) == 100 and not set(ev) & set(tr)
    assert not {a._goal(t).instruction for t in ev} & {a._goal(t).instruction for t in tr}
    assert ev == b.task_ids("eval") and a.goals == b.goals and a.products == b.products
    bigger = WebShopBackend(cfg(seed=3, num_train_goals=200))              # eval set fixed
    assert bigger.goals[:50] == a.goals[:50]
    tid = ev[7]
    assert a.reset(tid) == b.reset(tid)
    assert [a.step(x) for x in a.walkthrough(tid)] == [b.step(x) for x in b.walkthrough(tid)]
    other = WebShopBackend(cfg(seed=4))
    assert [p.title for p in other.products] != [p.title for p in a.products]


def test_real_webshop_missing_gives_one_clear_error(tmp_path):
    for path in ("", str(tmp_path)):
        with pytest.raises(webshop.WebShopNotInstalled, match="princeton-nlp/WebShop.*setup.sh"):
            WebShopBackend(cfg(source="real", webshop_path=path))


FAKE_WEBSHOP = '''
from types import SimpleNamespace

class WebAgentTextEnv:
    """Stand-in for WebShop's text env: the calls our adapter makes, nothing more."""
    def __init__(self, observation_mode="html", server=None, num_products=None, human_goals=True, session_prefix=None):
        assert observation_mode == "text"
        self.server = server or SimpleNamespace(goals=[dict(category=c, instruction_text=f"i need item {i}")
                                                       for i, c in enumerate(["fashion", "food", "beauty"])])
    def reset(self, session=None):
        self.instruction_text, self.page = self.server.goals[session]["instruction_text"], "search"
        return f"WebShop [SEP] Instruction: [SEP] {self.instruction_text} [SEP] Search", None
    def get_available_actions(self):
        if self.page == "search":
            return dict(has_search_bar=True, clickables=["search"])
        return dict(has_search_bar=False, clickables=["back to search", "b0fake0001"])
    def step(self, action):
        if action.startswith("search["):
            self.page = "results"
            return f"Instruction: [SEP] {self.instruction_text} [SEP] Back to Search [SEP] b0fake0001", 0.0, False, None
        return "Thank you for shopping with us!", 1.0, True, None
'''


def test_real_source_drives_webshop_text_env(tmp_path, monkeypatch):
    pkg = tmp_path / "web_agent_site" / "envs"
    pkg.mkdir(parents=True)
    (tmp_path / "web_agent_site" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "web_agent_text_env.py").write_text(FAKE_WEBSHOP)
    monkeypatch.setattr(sys, "path", list(sys.path))          # the adapter prepends webshop_path
    try:
        shop = WebShopBackend(cfg(source="real", webshop_path=str(tmp_path), num_eval_goals=2))
        other = WebShopBackend(cfg(source="real", webshop_path=str(tmp_path), num_eval_goals=2))
        assert other.real.env.server is shop.real.env.server       # loaded once, shared by the slots
    finally:                                                   # forget the fake package afterwards
        webshop._real_server.cache_clear()
        for mod in [m for m in sys.modules if m.startswith("web_agent_site")]:
            del sys.modules[mod]
    assert shop.task_ids("eval") == ["webshop:0", "webshop:1"] and shop.task_ids("train") == ["webshop:2"]
    assert shop.task_type("webshop:1") == "food"
    obs, info = shop.reset("webshop:1")
    assert obs == "WebShop [SEP] Search" and info["task"] == "i need item 1" and info["task_type"] == "food"
    assert info["admissible"] == ["search[<your query>]"]
    assert shop.step("click[nothing]")[3]["invalid"] is True
    obs, r, done, info = shop.step("search[item]")
    assert obs == "Back to Search [SEP] b0fake0001"
    assert info["admissible"] == ["click[back to search]", "click[b0fake0001]"]
    obs, r, done, info = shop.step("click[b0fake0001]")
    assert (r, done, info["won"], info["score"]) == (envs.WIN_REWARD, True, True, 1.0)


def test_slots_share_the_shop_but_not_the_session():
    a, b = WebShopBackend(cfg()), WebShopBackend(cfg())
    assert a.products is b.products and a.engine is b.engine          # built once per settings
    obs_b, _ = b.reset("webshop:1")
    a.reset("webshop:0")
    a.step("search[lipstick]")
    assert b.step("click[back to search]")[3]["invalid"] and b.session.goal is b.goals[1]
    assert b.reset("webshop:1")[0] == obs_b


# --- through envs.EnvManager -------------------------------------------------------------

def respond(action: str) -> str:
    return f"<think>next step</think><action>{action}</action>"


def test_config_fields_are_the_one_source_of_defaults():
    c = EnvConfig(name="webshop")
    assert (c.num_products, c.num_train_goals, c.num_eval_goals, c.webshop_path) == (1000, 2000, 500, "")
    assert not hasattr(webshop, "WebShopSettings")


def test_manager_group_copies_identical_and_walkthrough_wins():
    with EnvManager(cfg()) as m:
        tid = m.task_ids("train")[3]
        states = m.reset([tid] * 3)
        assert len({(s.obs, s.task, tuple(s.admissible), s.anchor) for s in states}) == 1
        assert all(s.score == 0.0 and s.reward == 0.0 and not s.done and s.steps == 0 for s in states)
        assert states[0].task_type in webshop.TYPES and states[0].obs == "WebShop [SEP] Search"
        plan = m.walkthrough(tid)
        for k, action in enumerate(plan):
            # the policy's path: a model response -> manager.parse_action -> manager.step
            parsed = [m.parse_action(respond(action.upper() if i == 1 else action), s.admissible)
                      for i, s in enumerate(states)]
            assert all(p == (action, True) for p in parsed)
            states = m.step([p[0] for p in parsed])
            if k < len(plan) - 1:
                assert all(s.reward == 0.0 and s.score == 0.0 and not s.done for s in states)
        assert all(s.won and s.done and s.reward == envs.WIN_REWARD and s.score == 1.0 for s in states)
        assert all(s.steps == len(plan) for s in states) and m.invalid_steps == [0, 0, 0]
        assert m.step(["click[buy now]"] * 3) == states          # done slots ignore their actions


def test_manager_eval_ids_are_the_fixed_first_goals():
    with EnvManager(cfg()) as m, EnvManager(cfg(num_train_goals=300)) as bigger:
        ev = m.task_ids("eval")
        assert ev == [f"webshop:{i}" for i in range(50)] == bigger.task_ids("eval")
        assert len(m.task_ids("train")) == 100 and not set(ev) & set(m.task_ids("train"))
        assert [s.task for s in m.reset(ev)] == [s.task for s in bigger.reset(ev)]   # same goals
        assert [s.task for s in m.reset(ev[:3])] == [g.instruction for g in m._meta.goals[:3]]
        assert m.task_type(ev[0]) == m._meta.goals[0].category


def test_manager_parse_action_rules():
    with EnvManager(cfg()) as m:
        search_page = ["search[<your query>]"]
        item_page = ["click[back to search]", "click[< prev]", "click[nude]", "click[buy now]"]
        assert m.parse_action(respond("Search[ Red   Lipstick ]"), search_page) == ("search[red lipstick]", True)
        assert m.parse_action(respond("CLICK[Buy Now]"), item_page) == ("click[buy now]", True)
        for bad, page in [("search[]", search_page), ("search[ ]", search_page),
                          ("search[<your query>]", search_page),      # the template copied as is
                          ("search[red lipstick]", item_page),        # no search bar on this page
                          ("click[b0nothere]", item_page), ("buy now", item_page), ("red lipstick", search_page)]:
            assert m.parse_action(respond(bad), page) == (None, False), bad
        assert m.parse_action("<action>click[buy now]</action>", item_page) == (None, False)   # no <think>
    # ALFWorld keeps exact matching: a bracket template is just another string there
    assert envs.parse_action(respond("search[red lipstick]"), search_page) == (None, False)


def test_manager_invalid_click_is_an_invalid_step_not_a_crash():
    with EnvManager(cfg()) as m:
        tid = m.task_ids("eval")[0]
        (start,) = m.reset([tid])
        (results,) = m.step([m.parse_action(respond("search[lipstick]"), start.admissible)[0]])
        action, valid = m.parse_action(respond("click[b0nothere]"), results.admissible)
        assert (action, valid) == (None, False)
        (after,) = m.step([action])
        assert after.obs == envs.INVALID_OBS and after.reward == 0.0 and after.score == 0.0
        assert after.admissible == results.admissible and after.steps == 2 and not after.done
        assert m.invalid_steps == [1]
        # an unlisted action handed straight to step (no parser): the page stays, counted invalid
        (direct,) = m.step(["click[b0nothere]"])
        assert direct.obs == results.obs and direct.steps == 3 and m.invalid_steps == [2]
        (back,) = m.step(["click[back to search]"])
        assert back.obs == start.obs and m.invalid_steps == [2]


def test_manager_max_steps_15_ends_unbought_with_score_zero():
    with EnvManager(cfg()) as m:
        states = m.reset(m.task_ids("eval")[:1])
        for _ in range(15):
            states = m.step([None])
        assert states[0].done and not states[0].won and states[0].steps == 15
        assert (states[0].reward, states[0].score) == (0.0, 0.0)


def test_manager_prompt_lists_actions_one_per_line():
    with EnvManager(cfg(history_len=1)) as m:
        (s0,) = m.reset(m.task_ids("eval")[:1])
        plain = m.build_prompt(s0, [])
        assert s0.task in plain and s0.obs in plain and "\nsearch[<your query>]\n" in plain
        assert envs.PROMPTS["webshop_search"] in plain and "<think>" in plain and "<action>" in plain
        (s1,) = m.step(["search[lipstick]"])
        prompt = m.build_prompt(s1, [(s0.obs, "search[lipstick]")])
        assert "\n".join(s1.admissible) in prompt and envs.ACTION_SEPARATOR not in prompt
        assert envs.PROMPTS["webshop_search"] not in prompt            # no search bar on a results page
        assert "you did: search[lipstick]" in prompt
        skill = "Search the product type first, then open Features to check the attributes."
        with_skill = m.build_prompt(s1, [(s0.obs, "search[lipstick]")], skill=skill)
        assert with_skill.replace(envs.PROMPTS["webshop_skill"].format(skill=skill), "") == prompt
        assert "household" not in plain and "advice" not in prompt


def _scripted(m, task_ids, n_steps=9):
    """Even slots follow their walkthrough, odd slots act at random (searching the task text); some Nones."""
    rng = random.Random(0)
    plans, pos = [m.walkthrough(t) for t in task_ids], [0] * len(task_ids)
    trace = [m.reset(task_ids)]
    for _ in range(n_steps):
        actions = []
        for i, s in enumerate(trace[-1]):
            if i % 2 == 0 and pos[i] < len(plans[i]):
                actions.append(plans[i][pos[i]])
                pos[i] += 1
            elif rng.random() < 0.2 or not s.admissible:
                actions.append(None)
            else:
                a = rng.choice(s.admissible)
                actions.append(f"search[{s.task}]" if a == webshop.SEARCH_TEMPLATE else a)
        trace.append(m.step(actions))
    return trace


def test_manager_workers_match_in_process():
    ids = [f"webshop:{i}" for i in (50, 51, 52) for _ in range(2)]   # three train goals, two copies each
    with EnvManager(cfg()) as m0:
        trace0 = _scripted(m0, ids)
    with EnvManager(dataclasses.replace(cfg(), num_workers=2)) as m2:
        trace2 = _scripted(m2, ids)
        assert m2.walkthrough(ids[0]) == m0.walkthrough(ids[0])
    assert trace0 == trace2
    final = trace0[-1]
    assert all(s.won and s.score == 1.0 and s.reward == envs.WIN_REWARD for s in final[::2])
    assert all(s.score is not None for t in trace0 for s in t)

