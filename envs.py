"""Environments for SIRI: the batched manager every environment plays in, and ALFWorld.
WebShop (its config section, prompt, grammar and backends) lives in webshop.py; the shared types
(`EnvState`, the `GameBackend` protocol) in core.py.

Reading order:
  1. Config (`EnvConfig`, with a section per family: `AlfworldConfig`, `webshop.WebShopConfig`).
  2. ALFWorld's prompt template, the anchor key, `backend_class` (family x source -> backend class).
  3. (the protocol every backend follows is `core.GameBackend`)
  4. ALFWorld on TextWorld's PDDL engine: the engine, the embedded task generator, the loader
     for the official game files, and the backends `EmbeddedAlfworld` / `RealAlfworld`.
  5. `EnvManager`: N slots stepped together, in this process or in worker processes.
  6. `python envs.py bench`: generation / reset / step / rollout timings.

Both ALFWorld sources run the *same* engine: TextWorld's `PddlEnv` on the `alfred` PDDL domain
and grammar that ship inside the `alfworld` package, wrapped by alfworld's `AlfredDemangler`
(object names such as "apple 1") and `AlfredInfos`. The embedded source differs only in where
the PDDL problems come from: our own generator (below) instead of `alfworld-download`.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import multiprocessing as mp
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import alfworld.gen.constants as alfred_constants
import alfworld.gen.goal_library as alfred_goals
import alfworld.info as alfworld_info

from core import ANSWER, WIN_REWARD, EnvState, GameBackend, atomic_write, atomic_write_json, collapse, extract_action, history_block
from webshop import EmbeddedWebShop, RealWebShop, WebShopConfig

# The six ALFWorld task types, in ALFWorld's own order (TASK_TYPES in alfred_tw_env.py).
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
INVALID_OBS = "Nothing happens."  # what TextWorld answers to a command it cannot execute


# --------------------------------------------------------------------------------------------
# 1. Config and state
# --------------------------------------------------------------------------------------------
@dataclass
class AlfworldConfig:
    """The ALFWorld section of the environment config (``env.alfworld.*``)."""

    verl_agent_prompt: bool = False
    """Show the step count ("You have taken N step(s); this is step N+1.") and hide `help` from the
    admissible actions, as the public GiGPO code's prompt does (`gigpo_defaults=verl-agent` turns it
    on). Our default is off, measured: with it, the learning test's cold start (4 games, 45 epochs)
    left the tiny model at 0.17 success instead of 0.30 and GiGPO's 10-iteration gain fell to +0.14;
    a 2-layer model generalises poorly over a number that changes every step. An instruct model
    reads it without trouble."""
    receptacles: int = 8
    """embedded difficulty: receptacles in a generated room (more = more searching; real ALFWorld: 15-35)"""
    distractors: int = 4
    """embedded difficulty: objects in the room besides the task's target object(s)"""
    location_priors: bool = True
    """embedded: objects start where their type usually is (envs.HOMES, ALFRED-like: food in the fridge,
    cutlery in drawers), the regularity a skill can carry; false = uniform over the receptacles they fit"""
    num_train_tasks: int = 600
    """embedded: number of generated training games (the six task types in turn)"""
    eval_per_type: int = 20
    """embedded: evaluation games per task type (6 x this; real valid_unseen has 134 games)"""
    cache_dir: str = ".cache/alfworld_embedded"
    """where generated games are cached, one file per seed; a relative path is taken from envs.py's folder"""
    data_path: str = ""
    """real: folder holding train/, valid_seen/, valid_unseen/ ("" = $ALFWORLD_DATA/json_2.1.1)"""
    real_eval_split: str = "valid_unseen"
    """real: the evaluation split, "valid_unseen" (out of distribution) or "valid_seen" """
    real_max_tasks: int = 0
    """real: cap on games per split (0 = all): the first N of the seeded, type-interleaved order
    (`stratified_order`), so the subset is fixed by env.seed and holds every type"""

    def __post_init__(self):
        if self.real_eval_split not in ("valid_unseen", "valid_seen"):
            raise ValueError(f"env.alfworld.real_eval_split={self.real_eval_split!r}: choose valid_unseen or valid_seen")
        if self.receptacles < 1:
            raise ValueError(f"env.alfworld.receptacles={self.receptacles}: must be at least 1")
        for key in ("distractors", "real_max_tasks", "num_train_tasks", "eval_per_type"):
            if getattr(self, key) < 0:
                raise ValueError(f"env.alfworld.{key}={getattr(self, key)}: must be >= 0")


@dataclass
class EnvConfig:
    """The environment: which family and source, the episode and prompt settings every family
    shares, the worker processes, and one section per family."""

    name: str = "alfworld"
    """environment family: "alfworld" (this module) | "webshop" (webshop.py)"""
    source: str = "embedded"
    """"embedded" (generated offline by our code) | "real" (ALFWorld: official games from `alfworld-download`;
    WebShop: a princeton-nlp/WebShop checkout at env.webshop.path)"""
    max_steps: int = 50
    """episode cap in env steps, invalid steps included (GiGPO's ALFWorld script: 50; WebShop preset: 15)"""
    history_len: int = 2
    """the prompt shows the last H (observation, action) pairs"""
    num_workers: int = 0
    """0: step all slots in this process; >0: that many worker processes, slot i on worker i % num_workers"""
    start_method: str = "fork"
    """multiprocessing start method for workers ("fork" | "forkserver" | "spawn"); see EnvManager"""
    seed: int = 0
    """selects the embedded task set: ALFWorld games (train and eval seeds disjoint for every value), WebShop
    catalogue and goals; the real sources' task order"""
    alfworld: AlfworldConfig = dataclasses.field(default_factory=AlfworldConfig)
    webshop: WebShopConfig = dataclasses.field(default_factory=WebShopConfig)

    def __post_init__(self):
        choices = {"name": ("alfworld", "webshop"), "source": ("embedded", "real"),
                   "start_method": ("fork", "forkserver", "spawn")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"env.{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.max_steps < 1:
            raise ValueError(f"env.max_steps={self.max_steps}: must be at least 1")
        for key in ("history_len", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"env.{key}={getattr(self, key)}: must be >= 0")
        if self.name == "webshop" and self.source == "real":
            self.webshop.check_real()


@dataclass
class PendingStep:
    """An env step begun by `EnvManager.step_begin` (or a reset by `reset_begin`): the states
    known already (done and invalid slots), the (slot, action or task id) pairs sent to the
    environments, and the ticket of that request."""
    new: dict[int, EnvState]
    to_env: list[tuple[int, str]]
    ticket: tuple


class EnvWorkerDied(RuntimeError):
    """An environment worker process ended (killed, out of memory) while the run needed it."""


class AlfworldDataNotFound(FileNotFoundError):
    """The official ALFWorld game files are not where env.alfworld.data_path says."""


# --------------------------------------------------------------------------------------------
# 2. ALFWorld's prompt, and the backends
# --------------------------------------------------------------------------------------------
# Our own wording; kept short because a tiny CPU model reads it in the tests. "{skill}" and
# "{history}" are blocks that are either empty or end in "\n"; the history block and the answer
# line are the ones WebShop's prompt uses too (core.py). `Alfworld.build_prompt` fills it.
# Our choice: the skill block comes before the task, as retrieved context comes before the
# question in a retrieval-augmented prompt, so the task's names stay next to the history and the
# actions that must copy them (the paper does not say where its block goes). Measured with
# `reads.py` on a cold-started tiny model (README, "What the toy can and cannot show"): with the
# block after the task, a right skill sent the model to the object's place but it then lost the
# task's goal (wins plain / right 19 / 21 of 96); before it, 23 / 35.
PROMPT = (
    "You are a household robot. You act in a text-based house by typing commands.\n"
    "{skill}"
    "Your task is to: {task}\n"
    "{history}"
    "{step_count}"
    "Now you see: {obs}\n"
    "Admissible actions: {actions}\n"
    "{answer}"
)
SKILL_BLOCK = "A skill that helped with tasks like this before:\n{skill}\n"
STEP_COUNT = "You have taken {taken} step(s); this is step {step}.\n"
ACTION_SEPARATOR = " | "  # ALFWorld lists its actions on one line


def anchor_key(obs: str) -> str:
    """GiGPO anchor-state key: sha1 of the lower-cased, whitespace-collapsed observation, 16 hex."""
    return hashlib.sha1(collapse(obs).lower().encode("utf-8")).hexdigest()[:16]


def backend_class(cfg: EnvConfig) -> type[GameBackend]:
    """The backend class of cfg.name and cfg.source (a `core.GameBackend`), chosen once per manager."""
    classes = {("alfworld", "embedded"): EmbeddedAlfworld, ("alfworld", "real"): RealAlfworld,
               ("webshop", "embedded"): EmbeddedWebShop, ("webshop", "real"): RealWebShop}
    if (cfg.name, cfg.source) not in classes:
        raise ValueError(f"env.name={cfg.name!r}, env.source={cfg.source!r}: choose alfworld or webshop, embedded or real")
    return classes[cfg.name, cfg.source]


# --------------------------------------------------------------------------------------------
# 4a. The TextWorld PDDL engine, as alfworld wraps it
# --------------------------------------------------------------------------------------------
def make_engine(plan: bool = False):
    """TextWorld's PddlEnv wrapped by alfworld's AlfredDemangler and AlfredInfos.

    plan=True also asks for "extra.walkthrough" at reset: the stored walkthrough, or else the
    engine's own planner (fast-downward) on the current problem. Our choice: playing engines
    do not plan (real game files carry no walkthrough, planning at every reset would cost).
    Each engine loads its own copy of fast-downward's library (~34 MB, ~80 ms): one per slot.
    TextWorld is imported here, not at the top, so prompts/parsing/WebShop skip its 0.5 s import.
    """
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    from textworld.envs import PddlEnv
    _memoize_textworld_parsers()
    infos = textworld.EnvInfos(won=True, admissible_commands=True,
                               extras=["walkthrough"] if plan else [])
    return AlfredInfos(AlfredDemangler(PddlEnv(infos)))


def _memoize_textworld_parsers() -> None:
    """Speed: TextWorld's PDDL engine parses strings with PEG parsers (tatsu) again and again: the
    grammar's text templates at every observation and game load, logic expressions (rule
    conditions, propositions) at every step. Profiled, those parses were about 60 % of an env
    step. Each module-level parse is a pure function of its arguments, so we cache it and hand out
    a fresh copy (callers write into what they get; `_memoized`). Same engine, same text: tests/test_envs.py
    plays games with and without the cache and compares every observation. Idempotent; the
    originals stay as `<module>._parse_uncached` and `fast_downward._pddl2sas_uncached`.
    The same for fast-downward's PDDL -> SAS translation (grounding the game's problem), which
    TextWorld runs twice at every game load and again at every reset of a loaded game: about 70 %
    of a reset (profiled); its result depends only on the domain and problem texts.
    And the text generator's `copy_context`, run at every grammar symbol it expands, deep-copies
    the context's `variables` and `mapping` dicts, whose values (entity records, logic variables)
    nothing writes to: only the dicts are updated. Copying the dicts alone gives the same text
    (the same test); profiled, the deep copies were about a third of the cold start's
    demonstrations' time."""
    import fast_downward
    from textworld import logic
    from textworld.envs.pddl import logic as pddl_logic, textgen
    for module in (textgen, logic, pddl_logic):
        if not hasattr(module, "_parse_uncached"):
            module._parse_uncached = module._parse_and_convert
            module._parse_and_convert = _memoized(module._parse_uncached, "trace", 100_000)
    if not hasattr(fast_downward, "_pddl2sas_uncached"):
        fast_downward._pddl2sas_uncached = fast_downward.pddl2sas
        # one entry ~25-35 KB pickled; 1024 hold both translations of the cpu preset's 264 games
        fast_downward.pddl2sas = _memoized(fast_downward._pddl2sas_uncached, "verbose", 1024,
                                           folder=lambda: TRANSLATIONS_DIR)
    if not hasattr(textgen, "_copy_context_deep"):
        textgen._copy_context_deep = textgen.copy_context
        textgen.copy_context = _copy_context


def _copy_context(context: dict) -> dict:
    """TextWorld's textgen.copy_context with the `variables` and `mapping` dicts copied, not their
    values (see `_memoize_textworld_parsers`)."""
    return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
            "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


_ENGINE_VERSIONS = tuple(_version(p) for p in ("fast_downward_textworld", "textworld", "alfworld"))
TRANSLATIONS_DIR: str | None = None
"""Folder where `_memoized` also keeps fast-downward's PDDL -> SAS translations on disk (None: memory
only). The game generator and the embedded backend's loads set it to the games' cache folder for
their duration (`_translations_in`; the real backend's to None), so a game translated once (at generation) is never translated
again by another process or run."""

@contextlib.contextmanager
def _translations_in(folder: str | None):
    """`TRANSLATIONS_DIR` = folder while the block runs (a game load, a generation), then as before."""
    global TRANSLATIONS_DIR
    before, TRANSLATIONS_DIR = TRANSLATIONS_DIR, folder
    try:
        yield
    finally:
        TRANSLATIONS_DIR = before


UNPICKLE_HITS = True
"""`_memoized` hands out copies by `pickle.loads` (False: `copy.deepcopy`, as before; `python envs.py
bench` times the two side by side)."""


def _memoized(fn, debug_flag: str, limit: int, folder: Callable[[], str | None] = lambda: None):
    """fn with its results cached by arguments, a fresh copy handed out; a call with the keyword
    `debug_flag` true runs fn for real (its debugging output prints). At most `limit` entries, the
    least recently used dropped first (bounds the memory over very many distinct games).

    Speed: each result is also kept pickled and a copy is `pickle.loads` of that: a deep copy as
    `copy.deepcopy` makes one (the same `__reduce_ex__` protocol, shared references kept), at a
    fraction of the cost. Profiled (cProfile, 10 resets of loaded games), deep copies were 88 % of
    a reset; timed once on the cached entries, `pickle.loads` of fast-downward's translations was
    4.4x faster than `copy.deepcopy` of them, of TextWorld's parsed logic 6.5x; per game load
    `python envs.py bench` prints "ratio cache". A result that does not pickle is deep-copied.

    folder(): where pickles also go on disk, one file per call named by a hash of its arguments and
    the engine's versions (None: memory only); a miss in memory reads the file if there is one.
    Every process that plays a game (env workers, test processes, later runs) then finds its
    translation there instead of computing it (~0.1 s per game load, profiled)."""
    cache: collections.OrderedDict = collections.OrderedDict()  # key -> (result, its pickle or None)

    def cached(*args, **kwargs):
        if kwargs.get(debug_flag):
            return fn(*args, **kwargs)
        key = (args, tuple(sorted((k, v) for k, v in kwargs.items() if k != debug_flag)))
        if key in cache:
            cache.move_to_end(key)
        else:
            where = folder()
            path = os.path.join(where, hashlib.sha1(repr((_ENGINE_VERSIONS, key)).encode()).hexdigest() + ".pkl") \
                if where else None
            value = blob = None
            if path and os.path.exists(path):
                with open(path, "rb") as f:
                    blob = f.read()
                try:
                    value = pickle.loads(blob)
                except Exception:  # unreadable (another library build): made anew and rewritten below
                    blob = None
            if blob is None:
                value = fn(*args, **kwargs)
                try:
                    blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
                except Exception:  # unpicklable: deep-copied instead
                    blob = None
                if path and blob is not None:
                    try:
                        atomic_write(path, blob)
                    except OSError:  # a read-only or full cache folder: memory only, as before
                        pass
            cache[key] = (value, blob)
            if len(cache) > limit:
                cache.popitem(last=False)
        value, blob = cache[key]
        return pickle.loads(blob) if blob is not None and UNPICKLE_HITS else copy.deepcopy(value)

    cached.cache = cache  # for tests: what is held
    return cached


@contextlib.contextmanager
def _keep_argv():
    """Pitfall: fast-downward's PDDL translator, which TextWorld runs at every load and reset,
    overwrites the global sys.argv (with ["translate.py", "domain", "task"]). Put it back."""
    argv = sys.argv
    try:
        yield
    finally:
        sys.argv = argv


_BANNER = "-= Welcome to TextWorld, ALFRED! =-"


def split_intro(feedback: str) -> tuple[str, str]:
    """(observation, task) from the engine's opening text.

    Our choice: the banner line and the "Your task is to: ..." sentence are removed from the
    observation, because the prompt states the task on its own line.
    """
    text = feedback.replace(_BANNER, "").strip()
    m = re.search(r"Your task is to:\s*(.*)$", text, re.S)
    if not m:
        return text, ""
    return text[:m.start()].strip(), collapse(m.group(1))


@functools.lru_cache(maxsize=None)
def _alfred_files() -> tuple[str, str]:
    """(PDDL domain text, TextWorld grammar text) shipped inside the alfworld package."""
    with open(alfworld_info.ALFRED_PDDL_PATH) as f:
        domain = f.read()
    with open(alfworld_info.ALFRED_TWL2_PATH) as f:
        grammar = f.read()
    return domain, grammar


# --------------------------------------------------------------------------------------------
# 4b. Embedded ALFWorld: our own generator of PDDL problems for the `alfred` domain
# --------------------------------------------------------------------------------------------
GENERATOR_VERSION = 2  # bump when generated games change: it is part of the cache folder name

# Our room catalogue, in the spirit of ALFRED's scenes. Types are ALFRED's (alfworld.gen.constants);
# which object fits in which receptacle comes from constants.VAL_RECEPTACLE_OBJECTS.
ROOMS = {
    "Kitchen": {
        "receptacles": ["Cabinet", "CounterTop", "Drawer", "Fridge", "Microwave", "SinkBasin",
                        "StoveBurner", "GarbageCan", "DiningTable", "Shelf", "CoffeeMachine",
                        "SideTable"],
        "objects": ["Apple", "Bread", "ButterKnife", "Cup", "DishSponge", "Egg", "Fork", "Kettle",
                    "Knife", "Ladle", "Lettuce", "Mug", "Pan", "PepperShaker", "Plate", "Pot",
                    "Potato", "SaltShaker", "SoapBottle", "Spatula", "Spoon", "Tomato",
                    "WineBottle", "Bowl"],
    },
    "Bathroom": {
        "receptacles": ["Cabinet", "CounterTop", "Drawer", "SinkBasin", "BathtubBasin", "Toilet",
                        "ToiletPaperHanger", "TowelHolder", "HandTowelHolder", "GarbageCan",
                        "Shelf", "Cart"],
        "objects": ["Candle", "Cloth", "DishSponge", "HandTowel", "SoapBar", "SoapBottle",
                    "SprayBottle", "ToiletPaper", "Towel", "Plunger", "TissueBox", "PaperTowel"],
    },
    "Bedroom": {
        "receptacles": ["Bed", "Desk", "Drawer", "Dresser", "Shelf", "SideTable", "GarbageCan",
                        "LaundryHamper", "Safe", "ArmChair"],
        "objects": ["AlarmClock", "BaseballBat", "BasketBall", "Book", "CD", "CellPhone", "Cloth",
                    "CreditCard", "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow", "Bowl",
                    "TennisRacket", "Vase", "Watch", "Statue"],
    },
    "LivingRoom": {
        "receptacles": ["Sofa", "ArmChair", "CoffeeTable", "SideTable", "TVStand", "Shelf",
                        "Drawer", "Cabinet", "Dresser", "DiningTable", "GarbageCan", "Ottoman",
                        "Safe"],
        "objects": ["Book", "CreditCard", "KeyChain", "Laptop", "Newspaper", "Pillow",
                    "RemoteControl", "Statue", "Vase", "Watch", "WateringCan", "CellPhone", "Bowl",
                    "Plate", "TissueBox", "Candle"],
    },
}
# How many of a receptacle type a room may have (our choice); types not listed: at most one.
MAX_INSTANCES = {"Cabinet": 6, "Drawer": 6, "Shelf": 4, "StoveBurner": 4, "CounterTop": 3,
                 "SideTable": 2, "SinkBasin": 2, "ArmChair": 2}
TOOL = {"pick_clean_then_place_in_recep": "SinkBasin",   # CleanObject needs a SinkBasinType
        "pick_heat_then_place_in_recep": "Microwave",
        "pick_cool_then_place_in_recep": "Fridge"}
NEEDS = {"pick_clean_then_place_in_recep": "Cleanable",  # keys of constants.VAL_ACTION_OBJECTS
         "pick_heat_then_place_in_recep": "Heatable",
         "pick_cool_then_place_in_recep": "Coolable"}
# Where each object type usually starts (our table, in the spirit of ALFRED's scene statistics:
# mugs by the coffee machine or in a cabinet, food in the fridge, cutlery in drawers). A generated
# object starts in a receptacle type drawn with these weights among the types in the room that it
# fits; a fitting type not listed here gets OTHER_HOME_WEIGHT. Our choice of spread: the first
# home holds the object about half of the time, so a policy that knows the table finds the object
# at its first try far more often than one that searches in a random order, and still has to
# search in the rest of the games. This is the knowledge a skill can carry (DESIGN.md, "What makes
# a skill worth mining"); `env.alfworld.location_priors=false` turns it off (uniform placement).
HOMES: dict[str, dict[str, float]] = {
    # kitchen
    "Apple": {"Fridge": .5, "CounterTop": .3, "DiningTable": .2},
    "Bread": {"CounterTop": .5, "DiningTable": .3, "Fridge": .2},
    "Egg": {"Fridge": .6, "CounterTop": .25, "DiningTable": .15},
    "Lettuce": {"Fridge": .6, "CounterTop": .25, "DiningTable": .15},
    "Potato": {"Fridge": .5, "CounterTop": .3, "SinkBasin": .2},
    "Tomato": {"Fridge": .5, "CounterTop": .3, "DiningTable": .2},
    "WineBottle": {"Fridge": .5, "Cabinet": .3, "CounterTop": .2},
    "Cup": {"Cabinet": .5, "CounterTop": .3, "SinkBasin": .2},
    "Mug": {"CoffeeMachine": .4, "Cabinet": .25, "Desk": .2, "CounterTop": .15},
    "Bowl": {"Cabinet": .5, "CounterTop": .2, "Shelf": .2, "DiningTable": .1},
    "Plate": {"Cabinet": .5, "CounterTop": .2, "DiningTable": .2, "Shelf": .1},
    "Pan": {"StoveBurner": .6, "Cabinet": .25, "CounterTop": .15},
    "Pot": {"StoveBurner": .6, "Cabinet": .25, "CounterTop": .15},
    "Kettle": {"StoveBurner": .6, "CounterTop": .25, "Cabinet": .15},
    "ButterKnife": {"Drawer": .6, "CounterTop": .25, "DiningTable": .15},
    "Fork": {"Drawer": .6, "CounterTop": .25, "DiningTable": .15},
    "Knife": {"Drawer": .6, "CounterTop": .25, "DiningTable": .15},
    "Spoon": {"Drawer": .6, "CounterTop": .25, "DiningTable": .15},
    "Spatula": {"Drawer": .6, "CounterTop": .25, "SinkBasin": .15},
    "Ladle": {"Drawer": .6, "CounterTop": .25, "Cabinet": .15},
    "PepperShaker": {"Cabinet": .5, "CounterTop": .3, "Shelf": .2},
    "SaltShaker": {"Cabinet": .5, "CounterTop": .3, "Shelf": .2},
    "DishSponge": {"SinkBasin": .5, "CounterTop": .2, "Cabinet": .2, "Cart": .1},
    "SoapBottle": {"CounterTop": .5, "Cabinet": .3, "Shelf": .2},
    # bathroom
    "SoapBar": {"SinkBasin": .4, "BathtubBasin": .3, "CounterTop": .3},
    "HandTowel": {"HandTowelHolder": .7, "CounterTop": .2, "Cabinet": .1},
    "Towel": {"TowelHolder": 1.0},
    "ToiletPaper": {"ToiletPaperHanger": .6, "Cabinet": .2, "Toilet": .2},
    "SprayBottle": {"Cabinet": .5, "Toilet": .3, "CounterTop": .2},
    "Plunger": {"Cabinet": .7, "Cart": .3},
    "PaperTowel": {"CounterTop": .6, "Shelf": .2, "Cart": .2},
    "TissueBox": {"Toilet": .3, "Shelf": .3, "CoffeeTable": .2, "Cabinet": .2},
    "Candle": {"Shelf": .5, "Cabinet": .3, "CoffeeTable": .2},
    "Cloth": {"Cabinet": .4, "Drawer": .3, "LaundryHamper": .2, "BathtubBasin": .1},
    # bedroom and living room
    "AlarmClock": {"SideTable": .5, "Desk": .3, "Dresser": .2},
    "BaseballBat": {"Bed": .7, "SideTable": .3},
    "BasketBall": {"Bed": .5, "ArmChair": .3, "Desk": .2},
    "TennisRacket": {"Bed": .5, "Desk": .3, "Dresser": .2},
    "Book": {"Desk": .4, "Bed": .3, "Shelf": .2, "Sofa": .1},
    "CD": {"Drawer": .4, "Shelf": .3, "Desk": .3},
    "CellPhone": {"Bed": .4, "SideTable": .3, "Desk": .2, "Sofa": .1},
    "CreditCard": {"Drawer": .4, "Desk": .3, "SideTable": .2, "CoffeeTable": .1},
    "KeyChain": {"Drawer": .4, "SideTable": .3, "Dresser": .2, "CoffeeTable": .1},
    "Laptop": {"Desk": .5, "Bed": .3, "Sofa": .2},
    "Pen": {"Desk": .5, "Drawer": .3, "Shelf": .2},
    "Pencil": {"Desk": .5, "Drawer": .3, "Shelf": .2},
    "Pillow": {"Bed": .6, "Sofa": .3, "ArmChair": .1},
    "Vase": {"Shelf": .5, "CoffeeTable": .2, "Dresser": .2, "SideTable": .1},
    "Watch": {"Dresser": .4, "SideTable": .3, "Drawer": .3},
    "Statue": {"Shelf": .5, "Dresser": .3, "CoffeeTable": .2},
    "Newspaper": {"CoffeeTable": .4, "Sofa": .4, "Ottoman": .2},
    "RemoteControl": {"CoffeeTable": .5, "Sofa": .3, "ArmChair": .2},
    "WateringCan": {"Shelf": .5, "SideTable": .3, "CoffeeTable": .2},
}
OTHER_HOME_WEIGHT = 0.03


def home_weights(obj: str, recep_types, priors: bool = True) -> list[float]:
    """Weight of each receptacle type in `recep_types` as the starting place of an `obj`
    (HOMES, OTHER_HOME_WEIGHT for fitting types it does not list; all 1 with priors=False)."""
    if not priors:
        return [1.0] * len(recep_types)
    homes = HOMES.get(obj, {})
    return [homes.get(r, OTHER_HOME_WEIGHT) for r in recep_types]


LAMP, LAMP_HOLDERS = "DeskLamp", ("Desk", "SideTable", "Dresser")


# Renamed rooms for the cold start (`coldstart.rename`, siri.coldstart): the receptacle types of the
# room catalogue permuted among themselves, the object types among themselves, the instance numbers
# 1-9 permuted, all at once and consistently over a whole prompt and its answer. The receptacles
# that actions name (sinkbasin, microwave, fridge) and the desk lamp keep their type, so "heat ...
# with microwave 1" still heats; their numbers are permuted like the others'.
KEPT_NAMES = sorted(t.lower() for t in TOOL.values()) + [LAMP.lower()]  # renumbered, never renamed
RENAMED_RECEPTACLES = sorted({r.lower() for room in ROOMS.values() for r in room["receptacles"]} - set(KEPT_NAMES))
RENAMED_OBJECTS = sorted({o.lower() for room in ROOMS.values() for o in room["objects"]})
_NAMED = re.compile(r"\b(" + "|".join(sorted(RENAMED_RECEPTACLES + RENAMED_OBJECTS + KEPT_NAMES, key=len, reverse=True))
                    + r")(?: ([1-9]))?\b")


def rename_map(rng: random.Random) -> dict[str, str]:
    """One random renaming for `rename`: type name -> type name, and "1".."9" -> a digit."""
    mapping = {}
    for names in (RENAMED_RECEPTACLES, RENAMED_OBJECTS, [str(i) for i in range(1, 10)]):
        mapping.update(zip(names, rng.sample(names, len(names))))
    return mapping


def rename(text: str, mapping: dict[str, str]) -> str:
    """`text` with every type name of the catalogue, and the instance number after it, renamed by
    `mapping` (`rename_map`); other words and numbers stay."""
    def sub(m: re.Match) -> str:
        name = mapping.get(m.group(1), m.group(1))
        return name if m.group(2) is None else f"{name} {mapping[m.group(2)]}"
    return _NAMED.sub(sub, text)


# Types the domain's actions name as constants; the problem must declare them.
DOMAIN_RTYPES, DOMAIN_OTYPES = ("SinkBasin", "Microwave", "Fridge"), ("Knife", "ButterKnife")
EVAL_SEED_OFFSET = 500_000  # eval seed = seed * 1e6 + 500_000 + i, train seed = seed * 1e6 + i
MAX_ATTEMPTS = 10


def _fits(recep: str, obj: str) -> bool:
    """Can an object of type `obj` be put in/on a receptacle of type `recep` (ALFRED's table)?"""
    return obj in alfred_constants.VAL_RECEPTACLE_OBJECTS.get(recep, ())


def _entity(type_name: str, k: int) -> str:
    """PDDL name of the k-th instance of a type, in ALFWorld's mangled style ("|" -> "_bar_").

    alfworld's Demangler shows "Apple_bar_2" as "apple N"; it names basins by prefix + "basin",
    so a sink basin is written "Sink_bar_1_bar_SinkBasin" to read "sinkbasin N" as in ALFWorld.
    """
    if type_name.endswith("Basin"):
        return f"{type_name[:-5]}_bar_{k}_bar_{type_name}"
    return f"{type_name}_bar_{k}"


def generate_game(seed: int, task_type: str, receptacles: int = 8, distractors: int = 4,
                  attempt: int = 0, priors: bool = True) -> dict:
    """One ALFWorld-style game (a `game.tw-pddl` dict), deterministic in its arguments. Unverified.

    Scene: a room of ALFRED receptacles (openable ones closed), the task's target object(s) in a
    receptacle that is not of the goal type (sometimes a closed one), a desk lamp for
    look_at_obj_in_light, and `distractors` other objects wherever they fit. With `priors`, the
    target's starting receptacle type is drawn from its HOMES weights (else uniformly).
    Goal: alfworld's goal_library PDDL for the task type ('#' there stands for PDDL's '-').
    Task text: one of goal_library's templates, put into alfworld's grammar by
    alfworld's own add_task_to_grammar.
    """
    from alfworld.agents.utils.misc import add_task_to_grammar  # imports textworld (0.5 s)

    assert task_type in TASK_TYPES, task_type
    # Our choice: a string seed (hashed with sha512 by `random`) is stable across runs and
    # independent of PYTHONHASHSEED.
    rng = random.Random(f"siri-alfworld:{seed}:{attempt}")
    room = rng.choice(sorted(alfred_constants.GOALS_VALID[task_type]))
    recep_pool, obj_pool = ROOMS[room]["receptacles"], ROOMS[room]["objects"]
    tool, light = TOOL.get(task_type), task_type == "look_at_obj_in_light"
    need = alfred_constants.VAL_ACTION_OBJECTS[NEEDS[task_type]] if task_type in NEEDS else None

    def sources(obj, goal):  # receptacle types the target may start in
        return [s for s in recep_pool if _fits(s, obj) and s != goal
                and not (task_type == "pick_cool_then_place_in_recep" and s == "Fridge")]

    # -- 1. what the task is about: target object type, goal receptacle type, start receptacle type
    if light:
        goal_recep, holder = None, rng.choice([r for r in LAMP_HOLDERS if r in recep_pool])
        target = rng.choice([o for o in obj_pool if sources(o, None)])
        required = [holder]
    else:
        pairs = [(o, r) for o in obj_pool if need is None or o in need
                 for r in recep_pool if r != tool and _fits(r, o) and sources(o, r)]
        target, goal_recep = rng.choice(pairs)
        required = [goal_recep] + ([tool] if tool else [])
    source_types = sources(target, goal_recep)
    source = rng.choices(source_types, home_weights(target, source_types, priors))[0]
    required = list(dict.fromkeys(required + [source]))  # unique, in order

    # -- 2. receptacle instances: the required ones, then random fill-ins up to `receptacles`
    # (or until the room is full: every type at its MAX_INSTANCES)
    rtypes = list(required)
    while len(rtypes) < receptacles:
        room_left = [r for r in recep_pool if rtypes.count(r) < MAX_INSTANCES.get(r, 1)]
        if not room_left:
            break
        rtypes.append(rng.choice(room_left))
    rng.shuffle(rtypes)

    # -- 3. objects as (type, index of the receptacle instance holding it)
    def place(obj, allowed):
        return obj, rng.choice([i for i, r in enumerate(rtypes) if r in allowed and _fits(r, obj)])

    # the first target starts in the drawn `source` type; a second one (pick_two) in a type drawn
    # the same way among the source types present in the room
    present = [r for r in source_types if r in rtypes]
    objects = [place(target, {source})]
    if task_type == "pick_two_obj_and_place":
        objects.append(place(target, {rng.choices(present, home_weights(target, present, priors))[0]}))
    if light:
        objects.append((LAMP, rng.choice([i for i, r in enumerate(rtypes) if r == holder])))
    # Distractors never share the target's type, so the goal cannot hold at the start.
    others = [o for o in obj_pool if o != target and any(_fits(r, o) for r in rtypes)]
    objects += [place(o, set(rtypes)) for o in (rng.choice(others) for _ in range(distractors))]

    problem = _problem_text(seed, rtypes, objects)
    problem += alfred_goals.gdict[task_type]["pddl"].format(
        obj=target, recep=goal_recep or "", toggle=LAMP).replace("#", "-")

    # -- 4. the task sentence, written into alfworld's grammar by alfworld's add_task_to_grammar.
    # We choose the wording with our rng and hand it over as the (only) annotation, so the
    # global `random` module is never touched.
    template = rng.choice(alfred_goals.gdict[task_type]["templates"])
    task_desc = template.format(obj=target.lower(), recep=(goal_recep or "").lower(), toggle=LAMP.lower())
    traj_data = {
        "task_type": task_type,
        "pddl_params": {"object_target": target, "parent_target": goal_recep or "",
                        "toggle_target": LAMP if light else "", "mrecep_target": "",
                        "object_sliced": False},
        "turk_annotations": {"anns": [{"task_desc": task_desc}]},
    }
    domain, grammar = _alfred_files()
    grammar = add_task_to_grammar(grammar, traj_data, goal_desc_human_anns_prob=1.0, rng=rng)
    return {"pddl_domain": domain, "grammar": grammar, "pddl_problem": problem,
            "solvable": False, "walkthrough": [],
            # our extra keys (TextWorld ignores them): provenance and ALFWorld-style traj data
            "siri": {"seed": seed, "attempt": attempt, "room": room, "task": task_desc + ".", "priors": priors,
                     "generator_version": GENERATOR_VERSION, "traj_data": traj_data}}


def _problem_text(seed: int, rtypes: list[str], objects: list[tuple[str, int]]) -> str:
    """The PDDL problem up to (not including) the goal: objects and initial facts."""
    counts: dict[str, int] = {}

    def new_id(type_name):
        counts[type_name] = counts.get(type_name, 0) + 1
        return _entity(type_name, counts[type_name])

    recep_ids = [new_id(r) for r in rtypes]
    obj_ids = [new_id(o) for o, _ in objects]
    otypes = sorted({o for o, _ in objects} | set(DOMAIN_OTYPES))
    all_rtypes = sorted(set(rtypes) | set(DOMAIN_RTYPES))
    actions = alfred_constants.VAL_ACTION_OBJECTS

    decl = ["agent1 - agent"] + [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in all_rtypes]
    decl += [f"{i} - receptacle" for i in recep_ids] + [f"{i} - object" for i in obj_ids]
    decl += [f"loc_bar_{k} - location" for k in range(len(rtypes) + 1)]

    init = ["(atLocation agent1 loc_bar_0)"]  # loc 0 holds no receptacle: "middle of a room"
    for k, (rid, rt) in enumerate(zip(recep_ids, rtypes)):
        init += [f"(receptacleType {rid} {rt}Type)", f"(receptacleAtLocation {rid} loc_bar_{k + 1})"]
        if rt in alfred_constants.OPENABLE_CLASS_SET:
            init.append(f"(openable {rid})")  # no (opened ...): closed at the start
    for oid, (ot, k) in zip(obj_ids, objects):
        init += [f"(objectType {oid} {ot}Type)", f"(inReceptacle {oid} {recep_ids[k]})",
                 f"(objectAtLocation {oid} loc_bar_{k + 1})"]
        if ot == LAMP:
            init.append(f"(toggleable {oid})")
            continue
        init.append(f"(pickupable {oid})")
        init += [f"({fact} {oid})" for fact, key in (("cleanable", "Cleanable"), ("heatable", "Heatable"),
                                                     ("coolable", "Coolable")) if ot in actions[key]]
        if ot in alfred_constants.MOVABLE_RECEPTACLES_SET:
            init.append(f"(isReceptacleObject {oid})")
    init += [f"(canContain {rt}Type {ot}Type)" for rt in sorted(set(rtypes)) for ot in otypes if _fits(rt, ot)]

    return ("(define (problem siri_embedded_%d)\n(:domain alfred)\n(:objects\n    %s\n)\n(:init\n    %s\n)\n"
            % (seed, "\n    ".join(decl), "\n    ".join(init)))


def solve_game(engine, game: dict) -> list[str] | None:
    """Play a game with the engine's own planner; the walkthrough if it wins, else None.

    Checks: the goal does not hold at the start, the planner finds a plan, every planned
    command is admissible when played, and the last one wins. `engine` = make_engine(plan=True).
    """
    with _keep_argv():
        engine.load(dict(game, walkthrough=[]))  # an empty walkthrough makes the engine plan
        state = engine.reset()
    plan = list(state["extra.walkthrough"] or [])
    if state["won"] or not plan:
        return None
    for command in plan:
        if command not in state["admissible_commands"]:
            return None
        state, _, _ = engine.step(command)
    return plan if state["won"] else None


def make_verified_game(seed: int, task_type: str, receptacles: int, distractors: int,
                       engine=None, priors: bool = True) -> dict:
    """generate_game + solve_game, retrying the seed with a new attempt number until solvable."""
    engine = engine or make_engine(plan=True)
    for attempt in range(MAX_ATTEMPTS):
        game = generate_game(seed, task_type, receptacles, distractors, attempt, priors)
        walkthrough = solve_game(engine, game)
        if walkthrough:
            return dict(game, solvable=True, walkthrough=walkthrough)
    raise RuntimeError(f"no solvable game for seed {seed} ({task_type}) in {MAX_ATTEMPTS} attempts")


def embedded_cache_folder(cfg: EnvConfig) -> str:
    """cache_dir/v{version}-rec{receptacles}-dis{distractors}[-uniform]: one file per seed inside."""
    root = os.path.expanduser(cfg.alfworld.cache_dir)
    if not os.path.isabs(root):
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), root)
    uniform = "" if cfg.alfworld.location_priors else "-uniform"
    return os.path.join(root, f"v{GENERATOR_VERSION}-rec{cfg.alfworld.receptacles}-dis{cfg.alfworld.distractors}{uniform}")


def embedded_task_ids(cfg: EnvConfig, split: str) -> list[str]:
    """Task ids "<task_type>-s<seed>" of a split; no file is touched.

    train: seeds seed*1e6 + i for i < num_train_tasks; eval: seed*1e6 + 500000 + i for
    i < 6 * eval_per_type. Task type = TASK_TYPES[i % 6], so the eval set has exactly
    eval_per_type games per type and train cycles through the types.
    """
    if split == "train":
        n, offset = cfg.alfworld.num_train_tasks, 0
        assert n <= EVAL_SEED_OFFSET, "num_train_tasks would run into the eval seeds"
    elif split == "eval":
        n, offset = len(TASK_TYPES) * cfg.alfworld.eval_per_type, EVAL_SEED_OFFSET
    else:
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    base = cfg.seed * 1_000_000 + offset
    return [f"{TASK_TYPES[i % len(TASK_TYPES)]}-s{base + i}" for i in range(n)]


def _parse_embedded_id(task_id: str) -> tuple[str, int]:
    task_type, seed = task_id.rsplit("-s", 1)
    return task_type, int(seed)


def _generate_into_cache(args: tuple) -> int:
    """Generate, verify and cache a list of task ids with one planning engine (pool worker)."""
    cfg, task_ids = args
    folder, engine = embedded_cache_folder(cfg), make_engine(plan=True)
    with _translations_in(os.path.join(folder, "translations")):  # the games' translations, for every later load
        for task_id in task_ids:
            path = os.path.join(folder, task_id + ".tw-pddl")
            if not os.path.exists(path):
                task_type, seed = _parse_embedded_id(task_id)
                atomic_write_json(path, make_verified_game(seed, task_type, cfg.alfworld.receptacles,
                                                           cfg.alfworld.distractors, engine, cfg.alfworld.location_priors))
    return len(task_ids)


def ensure_embedded_games(cfg: EnvConfig, task_ids: list[str], processes: int | None = None) -> int:
    """Make sure every task id has a verified game in the cache; returns how many were generated.

    Our choice: with many missing games (>= 16) generation is spread over `processes`
    (default: the CPU count) processes, each with its own planning engine.
    """
    folder = embedded_cache_folder(cfg)
    missing = [t for t in dict.fromkeys(task_ids) if not os.path.exists(os.path.join(folder, t + ".tw-pddl"))]
    if not missing:
        return 0
    if len(missing) >= 16:
        print(f"[envs] generating {len(missing)} embedded ALFWorld games into {folder} (once; cached)")
    processes = processes or os.cpu_count() or 1
    if processes <= 1 or len(missing) < 16:
        _generate_into_cache((cfg, missing))
        return len(missing)
    chunks = [missing[i::processes] for i in range(processes) if missing[i::processes]]
    with _mp_context(cfg).Pool(len(chunks)) as pool:
        pool.map(_generate_into_cache, [(cfg, c) for c in chunks])
    return len(missing)


# --------------------------------------------------------------------------------------------
# 4c. Real ALFWorld: the official game files from `alfworld-download`
# --------------------------------------------------------------------------------------------
def real_data_path(cfg: EnvConfig) -> str:
    """cfg.alfworld.data_path, or $ALFWORLD_DATA/json_2.1.1 (where `alfworld-download` puts the games)."""
    path = cfg.alfworld.data_path or os.path.join(os.environ.get("ALFWORLD_DATA", "~/.cache/alfworld"), "json_2.1.1")
    return os.path.abspath(os.path.expanduser(os.path.expandvars(path)))


def _missing_data(path: str, detail: str) -> AlfworldDataNotFound:
    return AlfworldDataNotFound(
        f"ALFWorld game files not found: {detail} (looked in {path}). Run `alfworld-download` "
        "(needs internet; it fills $ALFWORLD_DATA, default ~/.cache/alfworld) or pass "
        "env.alfworld.data_path=<folder holding train/, valid_seen/ and valid_unseen/>; offline, use "
        "env.source=embedded.")


@functools.lru_cache(maxsize=None)
def collect_real_games(root: str, split: str) -> tuple[tuple[str, str], ...]:
    """((task_id, task_type), ...) of one official split, sorted, with ALFWorld's own filters.

    The same rules as alfworld's AlfredTWEnv.collect_game_files: a game is a folder with
    traj_data.json; skip paths containing "movable" or "Sliced"; keep the six task types; the
    game.tw-pddl must exist, have a "solvable" key, and be solvable. Our choice: the path
    rules look at the path below the data root only. task_id = the trial folder relative to root.
    """
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise _missing_data(root, f"no {split}/ folder")
    games = []
    for dirpath, _, files in os.walk(split_dir):
        rel = os.path.relpath(dirpath, root)
        if "traj_data.json" not in files or "movable" in rel or "Sliced" in rel:
            continue
        with open(os.path.join(dirpath, "traj_data.json")) as f:
            task_type = json.load(f).get("task_type")
        game_file = os.path.join(dirpath, "game.tw-pddl")
        if task_type not in TASK_TYPES or not os.path.exists(game_file):
            continue
        with open(game_file) as f:
            if not json.load(f).get("solvable", False):
                continue
        games.append((rel.replace(os.sep, "/"), task_type))
    if not games:
        raise _missing_data(root, f"no playable game under {split}/")
    return tuple(sorted(games))


def stratified_order(games: tuple[tuple[str, str], ...], seed: int) -> list[str]:
    """Real game ids in a seeded, type-interleaved order: each type's games shuffled with `seed`,
    then one of each type in turn (TASK_TYPES order) until every type runs out. So every "first N"
    the run takes (coldstart.tasks, warmup.task_pool, eval.max_tasks, env.alfworld.real_max_tasks) holds
    the six types as evenly as the split allows; the official folders, sorted, would give whole
    types in alphabetical order. The same on every rank (it depends on the seed only)."""
    by_type: dict[str, list[str]] = {t: [] for t in TASK_TYPES}
    for task_id, task_type in sorted(games):
        by_type[task_type].append(task_id)
    rng = random.Random(seed)
    for ids in by_type.values():
        rng.shuffle(ids)
    order = []
    for k in range(max(map(len, by_type.values()), default=0)):
        order += [ids[k] for ids in by_type.values() if k < len(ids)]
    return order


# --------------------------------------------------------------------------------------------
# 4d. The ALFWorld backends: one base that plays, one subclass per source
# --------------------------------------------------------------------------------------------
class Alfworld:
    """One ALFWorld slot (a `core.GameBackend`): one TextWorld engine, games loaded by task id;
    ALFWorld's prompt and action grammar. The source's subclass says which games exist and where
    their files are (`task_ids`, `task_type`, `game_file`).

    Loading a game (parsing the grammar, translating the PDDL) costs ~0.1 s on embedded games
    and more on real ones; TextWorld's env.reset() restarts a loaded game (~30 ms). So the
    engine keeps the game it loaded (`loaded_task`) and a reset with the same task id only
    restarts it; `_Slots` hands each slot a backend that already holds its task when it can.
    Our choice: one loaded game per backend, because each engine holds its own 34 MB copy of
    fast-downward's library; extra engines would cost more memory than the loads they save.
    """

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self._engine = None     # playing engine, made on the first reset
        self._planner = None    # planning engine, made only if a walkthrough must be planned
        self.loaded_task: str | None = None  # task id of the game in the engine (see _Slots)
        self.translations: str | None = None  # `TRANSLATIONS_DIR` while this backend loads a game
        self._task, self._task_type = "", ""

    # -- prompt and grammar --------------------------------------------------------------------
    @staticmethod
    def build_prompt(cfg: EnvConfig, state: EnvState, history: list[tuple[str, str | None]],
                     skill: str | None = None) -> str:
        """The user message for one step (the policy applies the chat template): `skill` (one block,
        before the task: see PROMPT; with skill=None the prompt holds no skill text at all, so plain
        and skill prompts differ only by that block), the last cfg.history_len (observation, action) pairs
        (``history`` is the whole episode so far, so the prompt can count the steps taken), the
        current observation, the admissible actions on one line and the answer format.
        env.alfworld.verl_agent_prompt: as the public GiGPO code's prompt, the step count is shown
        and "help" is not offered (it prints the command list and never advances a task; typed, it
        still plays)."""
        verl = cfg.alfworld.verl_agent_prompt
        actions = [a for a in state.admissible if a != "help"] if verl else state.admissible
        return PROMPT.format(
            task=state.task, skill=SKILL_BLOCK.format(skill=skill.strip()) if skill else "",
            history=history_block(history, cfg.history_len),
            step_count=STEP_COUNT.format(taken=len(history), step=len(history) + 1) if verl else "",
            obs=collapse(state.obs), actions=ACTION_SEPARATOR.join(actions), answer=ANSWER)

    @staticmethod
    def parse_action(text: str, admissible: list[str]) -> tuple[str | None, bool]:
        """(action, valid) from a model response, never raising: the answer rule of
        `core.extract_action`, then the action must equal an admissible action normalised the same
        way; the admissible string itself is returned. Anything else -> (None, False), which the
        manager plays as an invalid step."""
        action = extract_action(text)
        for cand in admissible if action else ():
            if action == collapse(cand).lower():
                return cand, True
        return None, False

    # -- the source's part -------------------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        raise NotImplementedError

    def task_type(self, task_id: str) -> str:
        raise NotImplementedError

    def game_file(self, task_id: str) -> str:
        raise NotImplementedError

    def walkthrough(self, task_id: str) -> list[str]:
        """Expert commands that win: the verified plan stored in embedded games, else planned."""
        with open(self.game_file(task_id)) as f:
            game = json.load(f)
        if game.get("walkthrough"):
            return list(game["walkthrough"])
        self._planner = self._planner or make_engine(plan=True)
        with _translations_in(self.translations):
            return solve_game(self._planner, game) or []

    # -- playing -----------------------------------------------------------------------------
    def reset(self, task_id: str) -> tuple[str, dict]:
        if self._engine is None:
            self._engine = make_engine(plan=False)
        with _keep_argv(), _translations_in(self.translations):  # this source's folder (or None)
            if self.loaded_task != task_id:
                self.loaded_task = None
                self._engine.load(self.game_file(task_id))
                self.loaded_task = task_id
            state = self._engine.reset()
        obs, self._task = split_intro(state.feedback)
        self._task_type = self.task_type(task_id)
        return obs, self._info(state)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        state, _, done = self._engine.step(action)
        won = bool(state["won"])
        return state.feedback.strip(), WIN_REWARD if won else 0.0, bool(done) or won, self._info(state)

    def _info(self, state) -> dict:
        return {"admissible": list(state["admissible_commands"]), "won": bool(state["won"]),
                "task": self._task, "task_type": self._task_type}

    def close(self) -> None:
        for engine in (self._engine, self._planner):
            if engine is not None:
                engine.close()
        self._engine = self._planner = None
        self.loaded_task = None


class EmbeddedAlfworld(Alfworld):
    """ALFWorld on games our generator made (section 4b), cached under env.alfworld.cache_dir, with
    their PDDL -> SAS translations (`TRANSLATIONS_DIR`)."""

    def __init__(self, cfg: EnvConfig):
        super().__init__(cfg)
        self.translations = os.path.join(embedded_cache_folder(cfg), "translations")

    def task_ids(self, split: str) -> list[str]:
        ids = embedded_task_ids(self.cfg, split)
        ensure_embedded_games(self.cfg, ids)  # "checked solvable before use"
        return ids

    def task_type(self, task_id: str) -> str:
        return _parse_embedded_id(task_id)[0]

    def game_file(self, task_id: str) -> str:
        """Path of the task's game.tw-pddl, generated and verified first if missing."""
        path = os.path.join(embedded_cache_folder(self.cfg), task_id + ".tw-pddl")
        if not os.path.exists(path):
            _generate_into_cache((self.cfg, [task_id]))
        return path


class RealAlfworld(Alfworld):
    """ALFWorld on the official game files (section 4c) under env.alfworld.data_path."""

    def __init__(self, cfg: EnvConfig):
        super().__init__(cfg)
        self._real_types: dict[str, str] = {}
        if not os.path.isdir(real_data_path(cfg)):
            raise _missing_data(real_data_path(cfg), "the data folder does not exist")

    def task_ids(self, split: str) -> list[str]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        games = collect_real_games(real_data_path(self.cfg),
                                   "train" if split == "train" else self.cfg.alfworld.real_eval_split)
        self._real_types.update(games)
        ids = stratified_order(games, self.cfg.seed)
        return ids[:self.cfg.alfworld.real_max_tasks or None]

    def task_type(self, task_id: str) -> str:
        # official folder names start with the task type: "<split>/<task_type>-<obj>-.../trial_..."
        return self._real_types.get(task_id) or task_id.split("/")[-2].split("-")[0]

    def game_file(self, task_id: str) -> str:
        return os.path.join(real_data_path(self.cfg), task_id, "game.tw-pddl")


# --------------------------------------------------------------------------------------------
# 5. The batched manager
# --------------------------------------------------------------------------------------------
class _Slots:
    """Backends of the slots one process owns (the main process, or one worker).

    Our choice: backends are interchangeable between the slots of a process, so at a reset each
    slot is handed a backend that already holds its task when one is idle (a reset of a loaded
    game is ~3x cheaper than a load). Preference: the slot's own backend, then any backend
    holding the task, then the slot's own / any idle one, then a new one. Backends left over
    when fewer slots are reset wait in `spare`. Backends without `loaded_task` just keep their slot.
    A reset in parts (`EnvManager.reset_begin`): the first part's "reset" makes every other
    backend spare, each later part's "reset_more" keeps the slots already reset and picks among
    the spares (its slots' own backends are spares by then, so only "holds the task" and "any
    idle" apply to them).
    """

    def __init__(self, cfg: EnvConfig):
        self.cfg, self.backend = cfg, backend_class(cfg)
        self.backends: dict[int, Any] = {}  # slot -> backend
        self.spare: list = []

    def _assign(self, items: list[tuple[int, str]], keep_others: bool = False) -> None:
        """keep_others: the slots not in items keep their backends (a reset in parts, `reset_more`);
        else their backends become spare."""
        held = lambda b: getattr(b, "loaded_task", None)  # noqa: E731
        resetting = {slot for slot, _ in items}
        kept = {s: b for s, b in self.backends.items() if s not in resetting} if keep_others else {}
        busy = {id(b) for b in kept.values()}
        idle = {id(b): b for b in [*self.backends.values(), *self.spare] if id(b) not in busy}
        own = {slot: id(b) for slot, b in self.backends.items()}
        new: dict[int, Any] = {}
        for slot, tid in items:                                   # 1. own backend holds the task
            if own.get(slot) in idle and held(idle[own[slot]]) == tid:
                new[slot] = idle.pop(own[slot])
        for slot, tid in items:                                   # 2. another idle one holds it
            key = next((k for k, b in idle.items() if held(b) == tid), None) if slot not in new else None
            if key is not None:
                new[slot] = idle.pop(key)
        for slot, _ in items:                                     # 3. own / any idle / new
            if slot not in new:
                key = own.get(slot) if own.get(slot) in idle else next(iter(idle), None)
                new[slot] = idle.pop(key) if key is not None else self.backend(self.cfg)
        self.backends, self.spare = {**kept, **new}, list(idle.values())

    def run(self, cmd: str, items: list[tuple[int, Any]]) -> list:
        if cmd in ("reset", "reset_more"):
            self._assign(items, keep_others=cmd == "reset_more")
            return [self.backends[slot].reset(task_id) for slot, task_id in items]
        return [self.backends[slot].step(action) for slot, action in items]

    def close(self) -> None:
        for backend in [*self.backends.values(), *self.spare]:
            if hasattr(backend, "close"):
                backend.close()
        self.backends, self.spare = {}, []


def _worker_main(conn, cfg: EnvConfig) -> None:
    """Worker process loop: ("reset"|"reset_more"|"step", [(slot, arg), ...]) -> ("ok", results) | ("error", tb).

    SIGINT is ignored: a Ctrl-C in the terminal reaches the whole process group, and the main
    process (which finishes its unit and checkpoints) still needs its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    slots = _Slots(cfg)
    try:
        while True:
            while not conn.poll(1.0):  # the main process was killed (-9): the pipe may stay open in
                if os.getppid() != parent:  # the other workers forked from it, so watch the parent
                    return
            try:
                cmd, items = conn.recv()
            except EOFError:
                break
            if cmd == "close":
                break
            try:
                conn.send(("ok", slots.run(cmd, items)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        slots.close()
        conn.close()


def _mp_context(cfg: EnvConfig):
    method = cfg.start_method if cfg.start_method in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method)


class EnvManager:
    """N environment slots stepped together; the interface every phase and evaluation uses.

    reset(task_ids) starts one episode per slot (the same id twice -> the same initial state,
    which is how a GiGPO group of G rollouts replays one task); step(actions) advances them all.
    A done slot ignores its action and returns its state unchanged. Action None is an invalid
    step: observation "Nothing happens.", reward 0, the env is not touched, and it counts toward
    max_steps (and in `invalid_steps`, as does a WebShop action the page does not offer, reported
    by the backend as info["invalid"]). Reaching max_steps ends the episode (done, not won).
    Rewards are 10 x won for both environments (DESIGN); WebShop's own reward in [0, 1] travels
    separately as EnvState.score.

    With cfg.num_workers > 0 the backends live in worker processes (multiprocessing Pipes, slot
    i on worker i % num_workers, round-robin so that the G copies of a task are spread out).
    Our choice: the "fork" start method by default. It starts in milliseconds and does not
    re-import the caller's main module (spawn/forkserver would import torch into every
    worker); the workers never touch torch or CUDA, which is what makes forking a process that
    has torch loaded safe here. Use "spawn" where fork is unavailable or unwanted.
    """

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self._pid = os.getpid()  # a forked copy of this object must not stop our workers
        self.backend = backend_class(cfg)  # the class: its prompt and grammar serve every slot
        self._meta = self.backend(cfg)  # one instance answers task_ids/task_type/walkthrough here
        self._task_ids: dict[str, list[str]] = {}
        self._states: list[EnvState] = []
        self.invalid_steps: list[int] = []
        self._local: _Slots | None = None
        self._workers: list[tuple[Any, Any]] = []  # (process, connection)
        self._tickets = itertools.count()  # requests sent to the workers, numbered ...
        self._in_flight: list[int] = []    # ... and those not yet collected, oldest first
        if cfg.num_workers > 0:
            ctx = _mp_context(cfg)
            for _ in range(cfg.num_workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(child, cfg), daemon=True)
                proc.start()
                child.close()
                self._workers.append((proc, parent))
        else:
            self._local = _Slots(cfg)

    # -- tasks --------------------------------------------------------------------------------
    def task_ids(self, split: str) -> list[str]:
        """Deterministic task ids of "train" or "eval" (embedded: generated and verified on first call)."""
        if split not in self._task_ids:
            self._task_ids[split] = list(self._meta.task_ids(split))
        return list(self._task_ids[split])

    def task_type(self, task_id: str) -> str:
        return self._meta.task_type(task_id)

    def walkthrough(self, task_id: str) -> list[str]:
        """Expert action sequence that wins the task (for cold-start SFT and tests)."""
        return self._meta.walkthrough(task_id)

    @property
    def states(self) -> list[EnvState]:
        return list(self._states)

    # -- episodes -----------------------------------------------------------------------------
    def reset(self, task_ids: list[str]) -> list[EnvState]:
        """Start one episode per slot: task_ids[i] in slot i."""
        (pending,) = self.reset_begin(task_ids, [list(range(len(task_ids)))])
        self.reset_end(pending)
        return list(self._states)

    def reset_begin(self, task_ids: list[str], parts: list[list[int]]) -> list["PendingStep"]:
        """`reset`, begun in parts (lists of slots that together cover every slot), one request
        each, sent in order; `reset_end` each part in that order before using its slots. With
        workers this returns at once: `agent.rollout` decodes its first wave while the workers
        load the next wave's games. In-process the resets are done here."""
        self._states = [None] * len(task_ids)  # type: ignore[list-item]  # filled by reset_end
        self.invalid_steps = [0] * len(task_ids)
        first: dict[int, int] = {}  # process -> the part that brings its first request: a full "reset"
        for k, part in enumerate(parts):
            for i in part:
                first.setdefault(self._owner(i), k)
        out = []
        for k, part in enumerate(parts):
            items = [(i, task_ids[i]) for i in part]
            out.append(PendingStep({}, items, self._send(
                lambda w, k=k: "reset" if first[w] == k else "reset_more", items)))
        return out

    def reset_end(self, pending: "PendingStep") -> dict[int, EnvState]:
        """Wait for one part begun by `reset_begin`; the initial states of its slots."""
        for (i, tid), (obs, info) in zip(pending.to_env, self._collect(pending.ticket)):
            self._states[i] = self._state(tid, obs, 0.0, False, info, 0)
        return {i: dataclasses.replace(self._states[i]) for i, _ in pending.to_env}

    def step(self, actions: list[str | None]) -> list[EnvState]:
        """Advance every slot (actions[i] for slot i; a done slot ignores its action)."""
        assert len(actions) == len(self._states), f"{len(actions)} actions for {len(self._states)} slots"
        self.step_end(self.step_begin(dict(enumerate(actions))))
        return [dataclasses.replace(s) for s in self._states]

    def step_begin(self, actions: dict[int, str | None]) -> "PendingStep":
        """Start the env step of some slots ({slot: action}); `step_end` finishes it.

        With workers, the valid actions are sent and this returns at once: the workers step while
        the caller does something else (`agent.rollout` decodes its other wave of slots). Steps
        of disjoint slot sets may be in flight together; finish them in the order they began.
        In-process (num_workers=0) the step is done here."""
        new, to_env = {}, []
        for i, action in actions.items():
            state = self._states[i]
            if state.done:
                new[i] = state
            elif action is None:
                self.invalid_steps[i] += 1
                new[i] = self._state(state.task_id, INVALID_OBS, 0.0, False,
                                     {"admissible": state.admissible, "won": False, "task": state.task,
                                      "task_type": state.task_type, "score": state.score}, state.steps + 1,
                                     anchor=state.anchor)
            else:
                to_env.append((i, action))
        return PendingStep(new, to_env, self._send("step", to_env))

    def step_end(self, pending: "PendingStep") -> dict[int, EnvState]:
        """Wait for a step started by `step_begin`; the new states of its slots."""
        for (i, _), (obs, reward, done, info) in zip(pending.to_env, self._collect(pending.ticket)):
            self.invalid_steps[i] += bool(info.get("invalid"))  # WebShop: an unlisted action reached the env
            pending.new[i] = self._state(self._states[i].task_id, obs, reward, done, info, self._states[i].steps + 1)
        self._states = [pending.new.get(i, s) for i, s in enumerate(self._states)]
        return {i: dataclasses.replace(s) for i, s in pending.new.items()}

    def _state(self, task_id, obs, reward, done, info, steps, anchor: str | None = None) -> EnvState:
        """`info` may carry "score" (WebShop's own reward of the purchase); ALFWorld's has none -> None.

        anchor: GiGPO's anchor-state key, by default `anchor_key(obs)`. After an invalid step the
        caller passes the previous state's key. Our choice: the environment was not touched, so the
        agent is in the state it was in; keying it by the text "Nothing happens." instead would put
        the after-invalid steps of every state of a group into one step group, comparing returns of
        unrelated states. With the old key, the retry lands in its state's group beside the valid
        choices made there (GiGPO's repeated visits), which is the comparison Eq. 7-8 intend.
        """
        won = bool(info["won"])
        score = info.get("score")
        return EnvState(task_id=task_id, task_type=info["task_type"], task=info["task"], obs=obs,
                        admissible=list(info["admissible"]), reward=float(reward),
                        done=bool(done) or won or steps >= self.cfg.max_steps, won=won,
                        anchor=anchor or anchor_key(obs), steps=steps, score=None if score is None else float(score))

    def _owner(self, slot: int) -> int:
        """The process that holds a slot's backend: worker slot % num_workers (in-process: 0)."""
        return slot % len(self._workers) if self._workers else 0

    def _send(self, cmd: str | Callable[[int], str], items: list[tuple[int, Any]]) -> tuple:
        """Hand items [(slot, arg)] to the workers that own their slots (all at once) and return a
        ticket for `_collect`; in-process, run them now and the ticket holds the results. cmd may
        depend on the process (a function of its `_owner` index)."""
        command = cmd if callable(cmd) else lambda _w: cmd
        if self._local is not None:
            return ("done", self._local.run(command(0), items))
        batches: list[list[tuple[int, int, Any]]] = [[] for _ in self._workers]
        for pos, (slot, arg) in enumerate(items):
            batches[self._owner(slot)].append((pos, slot, arg))
        with self._worker_errors():
            for w, ((_, conn), batch) in enumerate(zip(self._workers, batches)):
                if batch:
                    conn.send((command(w), [(slot, arg) for _, slot, arg in batch]))
        ticket = ("sent", batches, len(items), next(self._tickets))
        self._in_flight.append(ticket[3])
        return ticket

    def _collect(self, ticket: tuple) -> list:
        """The results of a `_send`, in item order (a worker answers its requests in order, so
        tickets are collected in the order they were sent)."""
        if ticket[0] == "done":
            return ticket[1]
        _, batches, n_items, number = ticket
        assert self._in_flight and self._in_flight[0] == number, "env requests must finish in the order they began"
        self._in_flight.pop(0)
        with self._worker_errors():
            replies = [conn.recv() if batch else None for (_, conn), batch in zip(self._workers, batches)]
        out, errors = [None] * n_items, []
        for w, (reply, batch) in enumerate(zip(replies, batches)):
            if batch:
                status, payload = reply
                if status == "error":
                    errors.append(f"env worker {w}:\n{payload}")
                    continue
                for (pos, _, _), result in zip(batch, payload):
                    out[pos] = result
        if errors:
            raise RuntimeError("\n".join(errors))
        return out

    @contextlib.contextmanager
    def _worker_errors(self):
        """A broken pipe -> EnvWorkerDied naming the dead workers and their exit codes."""
        try:
            yield
        except (EOFError, BrokenPipeError, ConnectionResetError):
            dead = [w for w, (proc, _) in enumerate(self._workers) if not proc.is_alive()]
            raise EnvWorkerDied(f"env worker {', '.join(map(str, dead)) or '?'} died "
                                f"(exit code {[self._workers[w][0].exitcode for w in dead]})") from None

    # -- prompts ------------------------------------------------------------------------------
    def build_prompt(self, state: EnvState, history: list[tuple[str, str]], skill: str | None = None) -> str:
        """The environment's own prompt (`Alfworld.build_prompt`, `webshop.WebShop.build_prompt`)."""
        return self.backend.build_prompt(self.cfg, state, history, skill)

    def parse_action(self, text: str, admissible: list[str]) -> tuple[str | None, bool]:
        """The environment's own action grammar (`Alfworld.parse_action`, `webshop.WebShop.parse_action`)."""
        return self.backend.parse_action(text, admissible)

    # -- shutdown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (or close the in-process backends). Safe to call twice."""
        if os.getpid() != self._pid:
            return
        for proc, conn in self._workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("close", None))
        for proc, conn in self._workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=1)
            conn.close()
        self._workers = []
        if self._local is not None:
            self._local.close()
        if hasattr(self._meta, "close"):
            self._meta.close()

    def __enter__(self) -> "EnvManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def make_envs(cfg: EnvConfig) -> EnvManager:
    """The batched environment manager for a config."""
    return EnvManager(cfg)


# --------------------------------------------------------------------------------------------
# 6. Benchmark: python envs.py bench
# --------------------------------------------------------------------------------------------
def bench(games_per_type: int = 4, slot_counts: tuple[int, ...] = (16, 64), workers: tuple[int, ...] = (0, 2),
          group_size: int = 8, steps: int = 20) -> None:
    """Print generation speed, reset/step latency and random-action rollout wall times."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EnvConfig(max_steps=steps, alfworld=AlfworldConfig(cache_dir=tmp, eval_per_type=games_per_type,
                                                                 num_train_tasks=max(slot_counts) // group_size))
        ids = embedded_task_ids(cfg, "eval")
        t = time.perf_counter()
        ensure_embedded_games(cfg, ids, processes=1)
        dt = time.perf_counter() - t
        print(f"generation (fresh cache, 1 process): {len(ids)} games in {dt:.2f} s = {len(ids) / dt:.1f} games/s")
        cfg_par = dataclasses.replace(cfg, alfworld=dataclasses.replace(cfg.alfworld, eval_per_type=games_per_type * 2))
        more = embedded_task_ids(cfg_par, "eval")[len(ids):]
        t = time.perf_counter()
        ensure_embedded_games(cfg_par, more, processes=os.cpu_count())
        dt = time.perf_counter() - t
        print(f"generation (fresh cache, {os.cpu_count()} processes): {len(more)} games in {dt:.2f} s = "
              f"{len(more) / dt:.1f} games/s")

        backend = EmbeddedAlfworld(cfg)
        t = time.perf_counter(); backend.reset(ids[0]); cold = time.perf_counter() - t
        loads, resets, step_times = [], [], []
        rng = random.Random(0)
        for tid in ids[1:7]:
            t = time.perf_counter(); _, info = backend.reset(tid); loads.append(time.perf_counter() - t)
            t = time.perf_counter(); _, info = backend.reset(tid); resets.append(time.perf_counter() - t)
            for _ in range(10):
                t = time.perf_counter()
                _, _, done, info = backend.step(rng.choice(info["admissible"]))
                step_times.append(time.perf_counter() - t)
                if done:
                    break
        from textworld.envs.pddl import textgen  # patched by the first engine (_memoize_textworld_parsers)
        walk = {"TextWorld's deep copies": [], "dicts copied (ours)": []}
        for _ in range(3):  # the two alternated, best of 3: side by side on a noisy machine
            for label, copy_fn in zip(walk, (textgen._copy_context_deep, _copy_context)):
                textgen.copy_context = copy_fn
                t, n = time.perf_counter(), 0
                for tid in ids[1:7]:
                    backend.reset(tid)
                    for action in backend.walkthrough(tid):
                        backend.step(action)
                        n += 1
                walk[label].append((time.perf_counter() - t) / n)
        textgen.copy_context = _copy_context
        global UNPICKLE_HITS
        hits = {"deep-copied": [], "unpickled (ours)": []}
        try:
            for _ in range(3):  # loads of games whose translation and parses are cached: the two alternated
                for label, unpickle in zip(hits, (False, True)):
                    UNPICKLE_HITS = unpickle
                    t = time.perf_counter()
                    for tid in ids[1:7]:
                        backend.reset(tid)  # another game than the slot holds: a load, then a reset
                    hits[label].append((time.perf_counter() - t) / 6)
        finally:
            UNPICKLE_HITS = True
        backend.close()
        ms = lambda xs: 1000 * sum(xs) / len(xs)  # noqa: E731
        print(f"reset latency: first {1000 * cold:.0f} ms (engine start + load), new task {ms(loads):.0f} ms "
              f"(load + reset), same task {ms(resets):.0f} ms (reset only)")
        print(f"step latency: {ms(step_times):.1f} ms (random admissible actions, {len(step_times)} steps)")
        deep, ours = (1000 * min(v) for v in walk.values())
        print(f"text generator's context copies, walkthroughs of 6 loaded games: {deep:.1f} ms per step with "
              f"TextWorld's deep copies, {ours:.1f} ms with the dicts copied; ratio copies {deep / ours:.2f}")
        deep, ours = (1000 * min(v) for v in hits.values())
        print(f"cached results (translations, parses), loads of 6 games seen before: {deep:.1f} ms per load + "
              f"reset deep-copied, {ours:.1f} ms unpickled; ratio cache {deep / ours:.2f}")

        train = embedded_task_ids(cfg, "train")
        ensure_embedded_games(cfg, train)
        for n in slot_counts:
            for w in workers:
                run_cfg = dataclasses.replace(cfg, num_workers=w)
                task_ids = [train[i // group_size] for i in range(n)]
                rng = random.Random(0)
                t0 = time.perf_counter()
                with EnvManager(run_cfg) as envs:
                    t1 = time.perf_counter()
                    states = envs.reset(task_ids)
                    t2 = time.perf_counter()
                    n_steps = 0
                    while not all(s.done for s in states):
                        n_steps += sum(not s.done for s in states)
                        states = envs.step([None if s.done else rng.choice(s.admissible) for s in states])
                    t3 = time.perf_counter()
                    envs.reset(task_ids)  # same ids again: cached games, reset only
                    t4 = time.perf_counter()
                print(f"rollout N={n:3d} workers={w}: total {t3 - t0:6.2f} s (start {t1 - t0:.2f}, "
                      f"first reset {t2 - t1:.2f}, {n_steps} env steps {t3 - t2:.2f} s = "
                      f"{n_steps / (t3 - t2):.0f} steps/s); second reset {t4 - t3:.2f} s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        bench()
    else:
        print("usage: python envs.py bench")
