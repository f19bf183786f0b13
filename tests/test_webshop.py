"""Embedded WebShop: the reward on hand-made goal/product pairs, pages and navigation,
invalid actions, a scripted buyer with a hand-computed reward, determinism, splits, and the
shop through envs.EnvManager (parsing, prompts, rewards 10 x won with the score beside, workers).
Real WebShop: the adapter on a stand-in package, and, with WEBSHOP_PATH set to a checkout,
against WebShop's own reward functions and text env (skipped, with the reason, otherwise)."""
import dataclasses
import difflib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import core
import envs
import webshop
from envs import EnvConfig, EnvManager
from webshop import EmbeddedWebShop, Goal, Product, RealWebShop, WebShopConfig, webshop_reward

LIP = "Beauty & Personal Care › Makeup › Lips › Lipstick"
EYE = "Beauty & Personal Care › Makeup › Eyes › Eyeshadow"
EAR = "Electronics › Headphones, Earbuds & Accessories › Headphones & Earbuds › Earbud Headphones"


def cfg(**kw):
    """A small shop: keyword arguments that name a WebShopConfig field go to the env.webshop section
    (defaults defined there once), the others to EnvConfig."""
    shop = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in dataclasses.fields(WebShopConfig)}}
    return EnvConfig(**{"name": "webshop", "max_steps": 15, **kw},
                     webshop=WebShopConfig(**{"num_products": 300, "num_train_goals": 100, "num_eval_goals": 50, **shop}))


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


def goal_with(options: dict[str, str]) -> Goal:
    return Goal(**{**GOAL.__dict__, "goal_options": options})


def test_size_matched_fuzzily_as_every_option():
    # WebShop's get_option_reward matches every option by token_set_ratio > 85, size included:
    # "x-large" = {x, large} holds {large}: 100, so a size-exact rule would give 3/4 here.
    p = lipstick(options={"size": ["large", "x-large", "small"]})
    assert webshop.token_set_ratio("x-large", "large") == 100
    assert webshop_reward(p, goal_with({"size": "large"}), 15.99, {"size": "x-large"})[0] == 1.0
    # "iphone 13" vs "iphone 14": common "iphone"; difflib matches "iphone 1", 2·8/18 = 0.889 -> 89 > 85
    assert webshop.token_set_ratio("iphone 13", "iphone 14") == 89
    phone = lipstick(options={"size": ["iphone 13", "iphone 14"]})
    assert webshop_reward(phone, goal_with({"size": "iphone 14"}), 15.99, {"size": "iphone 13"})[0] == 1.0
    # "small" vs "large": no common token, difflib matches one letter, 2·1/10 -> 20: a miss, (2 + 0 + 1) / 4
    assert webshop.token_set_ratio("small", "large") == 20
    assert webshop_reward(p, goal_with({"size": "large"}), 15.99, {"size": "small"})[0] == pytest.approx(3 / 4)


def test_each_goal_option_counted_once():
    # goal asks color black and size large; two chosen values meet "black", none meets "large":
    # n_opt = 1 (counting chosen values would give 2 and a winning 5/5), r = (2 + 1 + 1) / 5
    goal = goal_with({"color": "black", "size": "large"})
    p = lipstick(options={"color": ["black", "white"], "size": ["small", "large"], "style": ["black edition"]})
    chosen = {"color": "black", "size": "small", "style": "black edition"}
    r, parts = webshop_reward(p, goal, 15.99, chosen)
    assert parts["n_opt"] == 1 and r == pytest.approx(4 / 5)


def test_option_in_product_text_does_not_count():
    # the text fallback is for attributes only: the chosen "pink" is in the description but
    # the goal asks for "nude", r = (2 + 0 + 1) / 4 (a text fallback for options would give 1)
    p = lipstick(description="Nude or pink: pick your shade.", options={"color": ["nude", "pink"]})
    assert webshop_reward(p, GOAL, 15.99, {"color": "pink"})[0] == pytest.approx(3 / 4)
    assert webshop_reward(p, GOAL, 15.99, {})[0] == pytest.approx(3 / 4)     # nothing chosen: "nude" in text is no choice


def test_webshop_colour_list():
    # WebShop's COLOR_SET: 102 colour words in alphabetical order; the first one found wins
    assert len(webshop.COLOR_SET) == 102 and webshop.COLOR_SET == sorted(webshop.COLOR_SET)
    assert webshop.normalize_color("classic red") == webshop.normalize_color("ruby red") == "red"
    assert webshop.normalize_color("rose gold") == "gold" and webshop.normalize_color("navy blue") == "blue"
    # "ivory" is one of WebShop's colours: "ivory white" -> "ivory" meets a chosen "ivory"
    # (with "white" as the colour it would not: token_set_ratio("white", "ivory") = 20)
    p = lipstick(options={"color": ["ivory", "black"]})
    assert webshop.token_set_ratio("white", "ivory") == 20
    assert webshop_reward(p, goal_with({"color": "ivory white"}), 15.99, {"color": "ivory"})[0] == 1.0
    # and WebShop's quirk: "ash" is a colour, so "light wash" and "dark wash" both read "ash"
    assert webshop.normalize_color("light wash") == webshop.normalize_color("dark wash") == "ash"
    jeans = lipstick(options={"color": ["light wash", "dark wash"]})
    assert webshop_reward(jeans, goal_with({"color": "light wash"}), 15.99, {"color": "dark wash"})[0] == 1.0


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
    return EmbeddedWebShop(cfg())


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
    assert done and r == core.WIN_REWARD and info["won"] and info["score"] == 1.0 and info["admissible"] == []
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
    shop = EmbeddedWebShop(cfg(num_eval_goals=1), products=[p1, p2, p3], goals=[GOAL])
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
    assert [r for _, r, _, _ in steps] == [0.0, 0.0, 0.0, core.WIN_REWARD]   # training reward: 10 x won
    assert [i["score"] for _, _, _, i in steps] == [0.0, 0.0, 0.0, 1.0]      # WebShop's reward


# --- catalogue, goals, splits, determinism ----------------------------------------------

def test_catalogue_is_fast_and_covers_webshop_categories():
    webshop._build_shop.cache_clear()
    t0 = time.perf_counter()
    shop = EmbeddedWebShop(cfg(num_products=1000, num_train_goals=2000, num_eval_goals=500))
    assert time.perf_counter() - t0 < 2.0
    assert {p.category for p in shop.products} == {"beauty", "electronics", "fashion", "food", "furniture"}
    assert len({p.asin for p in shop.products}) == 1000
    for p in shop.products:   # a value clicks to one option name; no two values of a group match each other
        values = [v for vs in p.options.values() for v in vs]
        assert len(values) == len(set(values))
        for vs in p.options.values():
            norm = [webshop.normalize_color(v) for v in vs]
            assert all(webshop.token_set_ratio(a, b) <= 85 for i, a in enumerate(norm) for b in norm[i + 1:])


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
        assert steps[-1][1] == core.WIN_REWARD and steps[-1][3]["score"] == 1.0
        assert all(r == 0.0 and i["score"] == 0.0 for _, r, _, i in steps[:-1])


def test_splits_disjoint_fixed_and_deterministic():
    a = EmbeddedWebShop(cfg(seed=3))
    webshop._build_shop.cache_clear()                   # b builds its shop from scratch
    b = EmbeddedWebShop(cfg(seed=3))
    assert a.products is not b.products
    ev, tr = a.task_ids("eval"), a.task_ids("train")
    assert len(ev) == 50 and len(tr) == 100 and not set(ev) & set(tr)
    assert not {a._goal(t).instruction for t in ev} & {a._goal(t).instruction for t in tr}
    assert ev == b.task_ids("eval") and a.goals == b.goals and a.products == b.products
    bigger = EmbeddedWebShop(cfg(seed=3, num_train_goals=200))              # eval set fixed
    assert bigger.goals[:50] == a.goals[:50]
    tid = ev[7]
    assert a.reset(tid) == b.reset(tid)
    assert [a.step(x) for x in a.walkthrough(tid)] == [b.step(x) for x in b.walkthrough(tid)]
    other = EmbeddedWebShop(cfg(seed=4))
    assert [p.title for p in other.products] != [p.title for p in a.products]


# --- real WebShop: a stand-in package here, WebShop's own code below ------------------------

def real_cfg(path, **kw):
    return cfg(**{"source": "real", "path": str(path), "num_products": 100, "num_eval_goals": 2, **kw})


def test_real_webshop_missing_gives_one_clear_error(tmp_path):
    for path in ("", str(tmp_path)):
        with pytest.raises(webshop.WebShopNotInstalled, match="princeton-nlp/WebShop.*not its setup.sh.*env.webshop.path"):
            RealWebShop(real_cfg(path))


@pytest.mark.parametrize("key, value, fix", [("num_products", 300, "100, 1000 or 100000 products, or 0"),
                                             ("num_eval_goals", 1600, "at most 1500")])
def test_real_webshop_bad_sizes_are_config_errors(key, value, fix):
    # WebShop has search indexes for 100/1k/100k products only; its train split starts at goal 1500
    with pytest.raises(ValueError, match=f"env.webshop.{key}={value}: .*{fix}"):
        cfg(source="real", **{"num_products": 100, key: value})
    cfg(source="real", num_products=0, num_eval_goals=1500)          # all products, test + val goals
    cfg(num_products=300, num_eval_goals=1600)                        # the embedded shop has no such limits


FAKE_WEBSHOP = '''
import random

N_GOALS = 1503


class SimServer:
    """Stand-in for WebShop's SimServer: the attributes our adapter reads, and its global reseed."""
    def __init__(self):
        random.seed(233)
        self.goals = [dict(category=["fashion", "food", "beauty"][i % 3], instruction_text=f"i need item {i}")
                      for i in range(N_GOALS)]
        self.user_sessions = {}

    def get_page_name(self, url):
        return {"results": "search_results", "item": "item_page", "done": "done"}.get(url, "")


class SimBrowser:
    current_url = None


class WebAgentTextEnv:
    """Stand-in for WebShop's text env: its pages in "text" mode, as far as our adapter reads them."""
    actions = []

    def __init__(self, observation_mode="html", server=None, num_products=None, human_goals=True, session_prefix=None):
        assert observation_mode == "text"
        self.server, self.browser, self.session_prefix = server or SimServer(), SimBrowser(), session_prefix
        self.reset()

    def reset(self, session=None):
        name = str(session) if session is not None else "".join(random.choices("abcdef", k=10))
        self.session = (self.session_prefix or "") + name
        self.goal = self.server.goals[session or 0]
        self.server.user_sessions[self.session] = dict(goal=self.goal, options={})
        self.instruction_text = "Instruction: " + self.goal["instruction_text"]   # WebShop's <h4> text
        self.browser.current_url = "index"
        return self.observation, None

    @property
    def observation(self):
        head = ["Instruction:", self.goal["instruction_text"]]
        page = {"index": ["WebShop", *head, "Search"],
                "results": [*head, "Back to Search", "Page 1 (Total results: 1)", "Next >", "B0FAKE0001",
                            "Fake Jacket", "$10.0"],
                # the item page in text mode reads the same before and after an option click
                "item": [*head, "Back to Search", "< Prev", "color", "black", "white", "Fake Jacket",
                         "Price: $10.0", "Rating: N.A.", "Description", "Features", "Reviews", "Buy Now"],
                "done": ["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)", "1.0"]}
        return " [SEP] ".join(page[self.browser.current_url])

    def get_available_actions(self):
        clicks = {"index": ["search"], "results": ["back to search", "next >", "b0fake0001"],
                  "item": ["back to search", "< prev", "black", "white", "description", "features", "reviews",
                           "buy now"], "done": []}[self.browser.current_url]
        return dict(has_search_bar=self.browser.current_url == "index", clickables=clicks)

    def step(self, action):
        WebAgentTextEnv.actions.append(action)
        random.random()                                   # WebShop draws from the global state too
        options = self.server.user_sessions[self.session]["options"]
        arg = action[action.index("[") + 1:-1]
        reward, done = 0.0, False
        if action.startswith("search["):
            self.browser.current_url = "results"
        elif arg == "b0fake0001":
            self.browser.current_url = "item"
        elif arg in ("black", "white"):
            options["color"] = arg
        elif arg == "buy now":
            self.browser.current_url, done = "done", True
            reward = 1.0 if options.get("color") == "black" else 0.5
        return self.observation, reward, done, None
'''


def forget_webshop_modules():
    webshop._real_server.cache_clear()
    for mod in [m for m in sys.modules if m.startswith("web_agent_site")]:
        del sys.modules[mod]


@pytest.fixture
def fake_webshop(tmp_path, monkeypatch):
    """A package named web_agent_site at tmp_path that stands in for a WebShop checkout."""
    pkg = tmp_path / "web_agent_site" / "envs"
    pkg.mkdir(parents=True)
    (tmp_path / "web_agent_site" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "web_agent_text_env.py").write_text(FAKE_WEBSHOP)
    monkeypatch.setattr(sys, "path", list(sys.path))          # the adapter prepends webshop_path
    yield tmp_path
    forget_webshop_modules()                                   # forget the fake package afterwards


def test_real_source_drives_webshop_text_env(fake_webshop):
    shop = RealWebShop(real_cfg(fake_webshop))
    other = RealWebShop(real_cfg(fake_webshop))
    assert other.env.server is shop.env.server           # loaded once, shared by the slots
    # splits as WebShop's baseline: eval = its test goals from 0, train from goal 1500 (val 500-1499 unused)
    assert shop.task_ids("eval") == ["webshop:0", "webshop:1"]
    assert shop.task_ids("train") == ["webshop:1500", "webshop:1501", "webshop:1502"]
    assert shop.task_type("webshop:1") == "food" and shop.walkthrough("webshop:1") == []   # no expert
    obs, info = shop.reset("webshop:1")
    assert obs == "WebShop [SEP] Search" and info["task"] == "i need item 1" and info["task_type"] == "food"
    assert info["admissible"] == ["search[<your query>]"]
    assert shop.step("click[nothing]")[3]["invalid"] is True
    obs, r, done, info = shop.step("search[item]")
    assert obs == ("Back to Search [SEP] Page 1 (Total results: 1) [SEP] Next > [SEP] B0FAKE0001 [SEP] Fake Jacket "
                   "[SEP] $10.0")
    assert info["admissible"] == ["click[back to search]", "click[next >]", "click[b0fake0001]"]
    plain, _, _, _ = shop.step("click[b0fake0001]")
    assert plain.startswith("Back to Search [SEP] < Prev [SEP] color") and "i need item" not in plain
    # WebShop's text mode shows the same page after an option click; ours notes the choice
    white, _, _, _ = shop.step("click[white]")
    black, _, _, _ = shop.step("click[black]")
    assert white == "You have clicked white. [SEP] " + plain and black == "You have clicked black. [SEP] " + plain
    obs, r, done, info = shop.step("click[buy now]")
    assert (r, done, info["won"], info["score"]) == (core.WIN_REWARD, True, True, 1.0)
    obs, r, done, info = shop.step("click[buy now]")                     # over: invalid, the score stays
    assert (r, done, info["invalid"], info["score"]) == (0.0, True, True, 1.0)


def test_real_webshop_leaves_our_random_state_alone(fake_webshop):
    random.seed(5)
    expected = [random.random() for _ in range(3)]
    random.seed(5)
    got = [random.random()]
    shop = RealWebShop(real_cfg(fake_webshop))       # WebShop reseeds with 233 and draws a session name
    shop.reset("webshop:0")
    shop.step("search[item]")                           # the stand-in draws on every step
    got.append(random.random())
    RealWebShop(real_cfg(fake_webshop)).reset("webshop:1")
    got.append(random.random())
    assert got == expected


def test_real_webshop_searches_words_only(fake_webshop):
    # WebShop reads a first word "<r>", "<a>", "<c>", "<q>" as a listing mode ("<a>" crashes it)
    shop = RealWebShop(real_cfg(fake_webshop))
    for query, sent in [("<a> red jacket", "search[a red jacket]"), ("red [xl] jacket", "search[red xl jacket]"),
                        ("<r>", "search[r]")]:
        shop.reset("webshop:0")
        shop.step(f"search[{query}]")
        assert shop.env.actions[-1] == sent
    shop.reset("webshop:0")
    assert shop.step("search[[ ]]")[3]["invalid"] and shop.env.actions[-1] == "search[r]"   # no words: not sent


def test_real_webshop_too_few_goals_for_the_train_split(fake_webshop, monkeypatch):
    RealWebShop(real_cfg(fake_webshop))                               # 1503 goals: train = 1500-1502
    monkeypatch.setattr(sys.modules["web_agent_site.envs.web_agent_text_env"], "N_GOALS", 1500)
    webshop._real_server.cache_clear()
    with pytest.raises(webshop.WebShopNotInstalled, match="loaded 1500 goals.*starts at goal 1500.*num_train_goals=0"):
        RealWebShop(real_cfg(fake_webshop))
    assert RealWebShop(real_cfg(fake_webshop, num_train_goals=0)).task_ids("train") == []   # evaluate only


# --- against WebShop's own code: WEBSHOP_PATH=<princeton-nlp/WebShop checkout> ---------------
# Each test skips, saying why, where the checkout or a package it needs is missing.

WEBSHOP_PATH = os.environ.get("WEBSHOP_PATH", "")


def need_webshop(*packages):
    if not WEBSHOP_PATH:
        pytest.skip("set WEBSHOP_PATH to a princeton-nlp/WebShop checkout to compare with its own code")
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"WebShop's code needs {', '.join(missing)} (README.md: real WebShop)")


@pytest.fixture
def upstream_goal(monkeypatch):
    need_webshop("thefuzz", "spacy")
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield webshop.upstream_goal_module(WEBSHOP_PATH)
    forget_webshop_modules()


def test_token_set_ratio_is_webshops():
    need_webshop("thefuzz")
    from thefuzz import fuzz
    if getattr(fuzz, "SequenceMatcher", None) is not difflib.SequenceMatcher:
        pytest.skip("this thefuzz scores with rapidfuzz; WebShop pins thefuzz 0.19, which scores with difflib")
    phrases = ["large", "x-large", "small", "iphone 13", "iphone 14", "20 count", "50 count", "ivory white", "ivory",
               "long lasting", "long-lasting formula", "cruelty free", "sulfate free", "light wash", "dark wash",
               "black edition", "rose gold", "gold", "3 tier", "5 tier", "8 fl oz", "16 fl oz"]
    for a in phrases:
        for b in phrases:
            assert webshop.token_set_ratio(a, b) == fuzz.token_set_ratio(a, b), (a, b)


HAND_CASES = [   # (product options/texts, goal options, chosen): the hand-computed cases above
    (dict(options={"size": ["large", "x-large"]}), {"size": "large"}, {"size": "x-large"}),
    (dict(options={"size": ["iphone 13", "iphone 14"]}), {"size": "iphone 14"}, {"size": "iphone 13"}),
    (dict(options={"size": ["large", "small"]}), {"size": "large"}, {"size": "small"}),
    (dict(options={"color": ["black", "white"], "size": ["small", "large"], "style": ["black edition"]}),
     {"color": "black", "size": "large"}, {"color": "black", "size": "small", "style": "black edition"}),
    (dict(description="Nude or pink: pick your shade.", options={"color": ["nude", "pink"]}), {"color": "nude"},
     {"color": "pink"}),
    (dict(options={"color": ["ivory", "black"]}), {"color": "ivory white"}, {"color": "ivory"}),
    (dict(options={"color": ["light wash", "dark wash"]}), {"color": "light wash"}, {"color": "dark wash"}),
    (dict(attributes=["long-lasting formula", "cruelty free"]), {"color": "nude"}, {"color": "nude"}),
    (dict(attributes=["long lasting"], features=["CRUELTY FREE: never tested on animals."]), {"color": "nude"}, {}),
    (dict(attributes=["sulfate free"]), {"color": "nude"}, {"color": "nude"}),
]


@pytest.mark.parametrize("product, goal_options, chosen", HAND_CASES)
def test_reward_parts_match_webshops_own(upstream_goal, product, goal_options, chosen):
    p, g = lipstick(**product), goal_with(goal_options)
    _, parts = webshop_reward(p, g, 15.99, chosen)
    theirs = dict(Attributes=p.attributes, Title=p.title, BulletPoints=p.features, Description=p.description)
    assert parts["n_att"] == upstream_goal.get_attribute_reward(theirs, dict(attributes=g.attributes))[1]
    assert parts["n_opt"] == upstream_goal.get_option_reward(list(chosen.values()), list(goal_options.values()))[1]


def test_colour_list_is_webshops(monkeypatch):
    need_webshop()
    monkeypatch.setattr(sys, "path", [WEBSHOP_PATH, *sys.path])
    try:
        assert webshop.COLOR_SET == importlib.import_module("web_agent_site.engine.normalize").COLOR_SET
    finally:
        forget_webshop_modules()


REAL_PACKAGES = ("pyserini", "thefuzz", "spacy", "gym", "flask", "bs4", "cleantext", "selenium", "torch")


@pytest.fixture(scope="module")
def webshop_checkout(tmp_path_factory):
    """WEBSHOP_PATH's code with a small catalogue of ours in WebShop's product-file format
    (items_shuffle / items_ins_v2 / items_human_ins), indexed by WebShop's own script and
    pyserini: 30 products, 51 human-style instructions each (1530 goals, so a train split)."""
    need_webshop(*REAL_PACKAGES)
    if shutil.which("java") is None:
        pytest.skip("pyserini's search index needs Java (README.md: real WebShop)")
    root = tmp_path_factory.mktemp("webshop")
    shutil.copytree(Path(WEBSHOP_PATH) / "web_agent_site", root / "web_agent_site")
    (root / "search_engine").mkdir()
    shutil.copy(Path(WEBSHOP_PATH) / "search_engine" / "convert_product_file_format.py", root / "search_engine")
    products = webshop.generate_catalogue(0, 30)
    items = [dict(asin=p.asin.upper(), name=p.title, full_description=p.description, small_description=p.features,
                  pricing=f"${p.price:.2f}", category=p.category, query=p.query, product_category=p.product_category,
                  customization_options={k: [dict(value=v, image=None) for v in vs] for k, vs in p.options.items()},
                  images=["https://example.invalid/no-image.jpg"]) for p in products]
    human = {p.asin.upper(): [dict(instruction=f"i want {p.query} that is {p.attributes[0]} with "
                                   f"{', '.join(vs[k % len(vs)] for vs in p.options.values())}, number {k}.",
                                   instruction_attributes=p.attributes[:1],
                                   instruction_options=[vs[k % len(vs)] for vs in p.options.values()])
                              for k in range(51)] for p in products}
    (root / "data").mkdir()
    for name, data in [("items_shuffle_1000.json", items), ("items_human_ins.json", human),
                       ("items_ins_v2_1000.json", {p.asin.upper(): dict(attributes=p.attributes) for p in products})]:
        (root / "data" / name).write_text(json.dumps(data))
    se = root / "search_engine"
    for d in ("resources", "resources_100", "resources_1k", "resources_100k"):
        (se / d).mkdir()
    subprocess.run([sys.executable, "convert_product_file_format.py"], cwd=se, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "pyserini.index.lucene", "--collection", "JsonCollection", "--input",
                    "resources_100", "--index", "indexes_100", "--generator", "DefaultLuceneDocumentGenerator",
                    "--threads", "1", "--storePositions", "--storeDocvectors", "--storeRaw"],
                   cwd=se, check=True, capture_output=True)
    return root, {p.asin.upper(): p for p in products}


def test_real_webshop_checkout(webshop_checkout, monkeypatch):
    """Our adapter on WebShop's own env: the instruction shown once, the chosen option noted,
    the baseline's splits, our random state untouched, and WebShop's reward of a purchase equal
    to ours for the same product and goal. Where spaCy's en_core_web_sm is missing, WebShop's
    goal module is imported first with a blank pipeline (only its type reward uses the model)."""
    root, products = webshop_checkout
    monkeypatch.setattr(sys, "path", list(sys.path))
    webshop.upstream_goal_module(str(root))
    try:
        random.seed(7)
        expected = [random.random() for _ in range(2)]
        random.seed(7)
        got = [random.random()]
        shop = RealWebShop(real_cfg(root, num_eval_goals=3, num_train_goals=5))
        assert len(shop.goals) == 1530
        assert shop.task_ids("eval") == ["webshop:0", "webshop:1", "webshop:2"]
        assert shop.task_ids("train") == [f"webshop:{i}" for i in range(1500, 1505)]
        for tid in shop.task_ids("eval"):
            goal = shop.goals[int(tid.split(":")[1])]
            p = products[goal["asin"]]
            ours = Goal(p.asin, p.category, p.query, goal["name"], p.product_category, goal["instruction_text"],
                        goal["attributes"], dict(enumerate(goal["goal_options"])), goal["price_upper"])
            wrong = {k: next(v for v in vs if v not in goal["goal_options"]) for k, vs in p.options.items()}
            for chosen in (dict(zip(p.options, goal["goal_options"])), wrong):
                obs, info = shop.reset(tid)
                assert obs == "WebShop [SEP] Search" and info["task"] == goal["instruction_text"].strip()
                obs, _, _, info = shop.step(f"search[{p.title}]")
                assert f"click[{p.asin}]" in info["admissible"] and info["task"] not in obs
                item, _, _, _ = shop.step(f"click[{p.asin}]")
                assert "Instruction:" not in item and info["task"] not in item
                for value in chosen.values():
                    obs, _, _, _ = shop.step(f"click[{value}]")
                assert obs == " [SEP] ".join([f"You have clicked {v}." for v in chosen.values()] + [item])
                obs, r, done, info = shop.step("click[buy now]")
                score = webshop_reward(p, ours, products[goal["asin"]].price, chosen)[0]
                assert done and info["score"] == pytest.approx(score) and r == core.WIN_REWARD * (score == 1.0)
                assert (score == 1.0) == (chosen != wrong)
        got.append(random.random())
        assert got == expected
    finally:
        forget_webshop_modules()


def test_slots_share_the_shop_but_not_the_session():
    a, b = EmbeddedWebShop(cfg()), EmbeddedWebShop(cfg())
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
    c = EnvConfig(name="webshop").webshop
    assert (c.num_products, c.num_train_goals, c.num_eval_goals, c.path) == (1000, 2000, 500, "")
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
        assert all(s.won and s.done and s.reward == core.WIN_REWARD and s.score == 1.0 for s in states)
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
    assert envs.Alfworld.parse_action(respond("search[red lipstick]"), search_page) == (None, False)


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
        assert webshop.SEARCH_HINT in plain and "<think>" in plain and "<action>" in plain
        (s1,) = m.step(["search[lipstick]"])
        prompt = m.build_prompt(s1, [(s0.obs, "search[lipstick]")])
        assert "\n".join(s1.admissible) in prompt and envs.ACTION_SEPARATOR not in prompt
        assert webshop.SEARCH_HINT not in prompt            # no search bar on a results page
        assert "you did: search[lipstick]" in prompt
        skill = "Search the product type first, then open Features to check the attributes."
        with_skill = m.build_prompt(s1, [(s0.obs, "search[lipstick]")], skill=skill)
        assert with_skill.replace(webshop.SKILL_BLOCK.format(skill=skill), "") == prompt
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
    assert all(s.won and s.score == 1.0 and s.reward == core.WIN_REWARD for s in final[::2])
    assert all(s.score is not None for t in trace0 for s in t)

