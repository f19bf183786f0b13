"""The run's configuration: every section's dataclass, the presets, and `load_config`.

Each module owns its section's dataclass and the defaults in it (`gigpo.GiGPOConfig`,
`envs.EnvConfig`, `model.ModelConfig`, ...); the run-level sections are here. `load_config` applies,
in order: the defaults < a preset < gigpo_defaults < config.yaml < the command line, and checks
every value once all are applied (the type of every value set, and each section's `__post_init__` on
the final values), so
a bad value stops the run at start-up with a message naming the key and the fix.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from decoder import SamplingConfig
from distill import DistillConfig
from envs import EnvConfig
from gigpo import GiGPOConfig
from mining import MiningConfig
from model import ModelConfig


@dataclass
class RunConfig:
    """Where and how the run executes."""

    out_dir: str = "runs/default"
    """Output folder: resolved config, metrics.jsonl, checkpoint/, skills/, curves.png, results.md."""
    seed: int = 0
    """Seed of everything (python, numpy, torch, task sampling, rollouts)."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu" or "cuda"."""
    rounds: int = 1
    """SIRI rounds of {Phase 1 mining, Phase 2 distillation} after the warmup."""
    checkpoint_every: int = 1
    """Write a checkpoint every this many units (and always at the end of each phase)."""
    tensorboard: bool = False
    """Also log metrics to TensorBoard (opt-in; needs the tensorboard package)."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    arms: list[str] = field(default_factory=lambda: ["gigpo", "siri"])
    """Branches continued from the same warmup checkpoint, at equal budget (the same update iterations,
    rollouts per iteration and seeds), each evaluated at the end: "gigpo" (the GiGPO-only control),
    "siri" (Phases 1-2), "siri_random" (Phases 1-2 with mining.summariser=random: the falsification
    control). results.md compares them per task type, with a paired interval over eval tasks."""
    ablation: str = "none"
    """One switch per ablation of the paper: "none" | "no_mining" (GiGPO only: the rounds run their
    distillation iterations as plain GiGPO, no skills) | "random_skills" (mining.summariser=random)
    | "no_selection" (distil every skill-guided token: both distill filters off) |
    "no_utility_filter" (distill.utility_filter=false)."""
    log_groups: int = 2
    """Task groups per training iteration written, step by step with their advantages, to
    trajectories.jsonl (Phase 2: as many plain and as many skill-guided groups); 0 = none.
    `python siri.py show` draws one."""
    max_skipped_updates: int = 3
    """Stop the run with a message when this many consecutive optimiser steps were skipped for a
    non-finite loss or gradient (0 = never); a skipped step changes no weight, so the last
    checkpoint holds finite weights."""

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"run.device={self.device!r}: choose auto, cpu, cuda or cuda:N")
        if min(self.rounds, self.threads, self.max_skipped_updates, self.log_groups) < 0 or self.checkpoint_every < 1:
            raise ValueError("run.rounds, threads, max_skipped_updates, log_groups >= 0 and run.checkpoint_every >= 1")


@dataclass
class ColdStartConfig:
    """Cold start (paper Fig. 2a): supervised fine-tuning on the environment's expert walkthroughs."""

    enabled: str = "auto"
    """"auto" (on for the tiny model, off for instruct models), "on" or "off"."""
    tasks: int = 24
    """Training tasks whose expert walkthroughs form the SFT set."""
    epochs: int = 12
    """Passes over the SFT set."""
    lr: float = 3e-3
    """AdamW learning rate of the cold start (full fine-tune of the base weights)."""
    schedule: str = "cosine"
    """Learning-rate schedule of the cold start: "cosine" (5 % linear warm-up, then a cosine decay
    to 0 after the last step) or "constant"."""
    batch_size: int = 16
    """Steps (prompt, response) per optimiser step."""
    think: str = "plan"
    """Text inside <think>…</think> of the SFT targets (a tiny model cannot write real reasoning)."""
    skill_demos: int = 2
    """Skill-augmented demonstrations per cold-start task, each with its own skill block (see
    skill_places; siri.coldstart_texts). 0 = plain prompts only."""
    skill_places: str = "random"
    """What a skill demonstration's skill says: "mined" (summarised from other tasks' demonstrations of
    the type), "random" (one place of the task's room drawn at random, right or wrong, searched
    first: only the block predicts the first step; siri.coldstart_texts) or "lists" (the same
    place in a mined skill's shape: after places the room lacks, among other objects' entries;
    mining.listed_skill)."""
    games: str = "pool"
    """Which training games the cold start shows: "pool" (the first coldstart.tasks training games,
    inside the RL pool) or "after_pool" (the coldstart.tasks training games after the RL pool,
    warmup.task_pool, so RL, mining and validation play games the cold start never showed, as an
    instruct model never saw the benchmark's games). Our choice for the cpu preset: after_pool,
    because a skill validated on a game the model learned by heart can only send it elsewhere
    (measured, README). Where after_pool cannot hold (not embedded ALFWorld, warmup.task_pool=0,
    too few training games) the preset's choice falls back to pool with a note; an explicit one
    is an error."""
    rename: float = 0.0
    """ALFWorld: the probability that a cold-start sample is shown, in an epoch, in a renamed room
    (`envs.rename`: receptacle and object types and instance numbers permuted consistently over the
    prompt and the answer; drawn anew each time). Our choice for the tiny model (cpu preset: 0.5):
    it can then only answer by copying names from its prompt, as an instruct model does, instead of
    recalling the 48 rooms it saw (measured, README). 0 = off."""

    def __post_init__(self):
        if self.enabled not in ("auto", "on", "off"):
            raise ValueError(f"coldstart.enabled={self.enabled!r}: choose auto, on or off")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"coldstart.schedule={self.schedule!r}: choose constant or cosine")
        if self.games not in ("pool", "after_pool"):
            raise ValueError(f"coldstart.games={self.games!r}: choose pool or after_pool")
        if self.skill_places not in ("mined", "random", "lists"):
            raise ValueError(f"coldstart.skill_places={self.skill_places!r}: choose mined, random or lists")
        if not 0 <= self.rename <= 1:
            raise ValueError(f"coldstart.rename={self.rename}: a probability in [0, 1]")
        if self.tasks < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.skill_demos < 0:
            raise ValueError("coldstart.tasks, epochs and batch_size must be >= 1, lr > 0, skill_demos >= 0")


@dataclass
class WarmupConfig:
    """Phase 0: GiGPO warmup."""

    iterations: int = 4
    """GiGPO iterations (each: rollouts → advantages → update)."""
    tasks_per_iter: int = 4
    """B: task groups per iteration (GiGPO ALFWorld: 16); each is played G = gigpo.group_size times."""
    task_pool: int = 0
    """Train on the first N training tasks only (0 = all). Small pools make CPU demos learn fast."""
    eval_every: int = 0
    """Evaluate every K iterations during the warmup (0 = only before and after)."""
    buffer_size: int = 256
    """Successful plain trajectories kept for Phase 1 (the newest are kept)."""

    def __post_init__(self):
        if self.iterations < 0 or self.tasks_per_iter < 1 or self.task_pool < 0 or self.eval_every < 0 \
                or self.buffer_size < 0:
            raise ValueError(f"warmup.tasks_per_iter must be >= 1 and warmup.iterations, task_pool, eval_every, "
                             f"buffer_size >= 0 (got tasks_per_iter={self.tasks_per_iter}, iterations={self.iterations})")


@dataclass
class EvalConfig:
    """Evaluation: plain prompt, eval split, success per task type."""

    max_tasks: int = 12
    """Evaluate on the first N eval tasks (0 = the whole fixed eval set); the set has equal counts per type."""
    temperature: float = 0.4
    """Sampling temperature at evaluation (GiGPO: 0.4)."""
    episodes_per_task: int = 1
    """Episodes per eval task."""

    def __post_init__(self):
        if self.max_tasks < 0 or self.episodes_per_task < 1 or self.temperature < 0:
            raise ValueError("eval.max_tasks >= 0, eval.episodes_per_task >= 1, eval.temperature >= 0")


@dataclass
class Config:
    """Everything a run reads. ``python siri.py key.sub=value`` overrides any field."""

    preset: str = "cpu"
    """Named preset applied before config.yaml overrides: cpu | qwen1.5b | qwen7b-qlora."""
    gigpo_defaults: str = "ours"
    """Where the GiGPO and SIRI papers are silent: "ours" (the defaults documented on each field)
    or "verl-agent" (the choices of the public GiGPO code, `GIGPO_DEFAULTS`), applied after the
    preset and before config.yaml and the command line, which still win."""
    run: RunConfig = field(default_factory=RunConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: SamplingConfig = field(default_factory=SamplingConfig)
    gigpo: GiGPOConfig = field(default_factory=GiGPOConfig)
    coldstart: ColdStartConfig = field(default_factory=ColdStartConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


PRESETS: dict[str, dict] = {
    # CPU laptop, offline: the tiny model the project builds itself, embedded ALFWorld in rooms of
    # 6 receptacles (objects at their usual homes about half of the time, so searching matters),
    # 14 steps, actions kept admissible at decoding (rollout.constrain_actions: half the tiny
    # model's free actions were inadmissible, README). Our choice of sizes, to keep `python
    # siri.py` under 10 minutes on 2 cores (measured alone: 6 min 58 s, README; a shorter cold
    # start learned less in one run: 9 epochs gave 0.092 eval success after it, 11 gave 0.125,
    # though float rounding alone has moved the latter to 0.050): a cold start
    # of 48 games x 3 demonstrations x 11 epochs, a training pool of 96 other games (16 per type: 5
    # validate a type's skills, 11 are its summary sources; the cold start's games come after
    # them, coldstart.games), 4 warmup iterations, 30 paired episodes per validation (5 tasks x 6),
    # Phase 2 of 3 iterations x 3 tasks (8, 48, 4 x 4 before: 12 min 15 s), the full eval set
    # (20 games per type), 2 env worker
    # processes (loading 120 games is most of an evaluation); lr 3e-3 and 2 mini-batches per
    # iteration (tests/test_learning.py, README).
    "cpu": {"model.name": "tiny", "model.dtype": "float32", "rollout.max_new_tokens": 32,
            "env.alfworld.receptacles": 6, "env.alfworld.distractors": 2, "env.alfworld.num_train_tasks": 144,
            "env.max_steps": 14, "env.num_workers": 2,
            "rollout.constrain_actions": True,
            "coldstart.tasks": 48, "coldstart.epochs": 11, "coldstart.rename": 0.5, "coldstart.games": "after_pool",
            "warmup.task_pool": 96, "warmup.iterations": 4,
            "gigpo.lr": 3e-3, "gigpo.group_size": 8, "gigpo.minibatches": 2, "eval.max_tasks": 0,
            "mining.trajectories_per_skill": 8, "mining.validation_tasks": 5, "mining.validation_group": 6,
            "distill.iterations": 3, "distill.tasks_per_iter": 3},
    # One GPU (24 GB+): the reproduction default of the GiGPO ALFWorld script, with LoRA.
    "qwen1.5b": {
        "model.name": "Qwen/Qwen2.5-1.5B-Instruct", "model.dtype": "bfloat16",
        "model.gradient_checkpointing": True, "gigpo.lr": 1e-5, "gigpo.token_budget": 16384,
        "rollout.max_new_tokens": 512, "warmup.iterations": 150, "warmup.tasks_per_iter": 16,
        "eval.max_tasks": 0, "mining.summariser": "policy", "run.rounds": 3,
        "distill.iterations": 20, "distill.tasks_per_iter": 8,
    },
    # The paper's model, 4-bit base + LoRA (QLoRA) to fit one GPU.
    "qwen7b-qlora": {
        "model.name": "Qwen/Qwen2.5-7B-Instruct", "model.dtype": "bfloat16", "model.qlora": True,
        "model.gradient_checkpointing": True, "gigpo.lr": 1e-5, "gigpo.token_budget": 8192,
        "rollout.max_new_tokens": 512, "warmup.iterations": 150, "warmup.tasks_per_iter": 16,
        "eval.max_tasks": 0, "mining.summariser": "policy", "run.rounds": 3,
        "distill.iterations": 20, "distill.tasks_per_iter": 8,
    },
}

# gigpo_defaults -> settings. "verl-agent": the public GiGPO code (johnhaofu/verl-agent, its
# trainer config and ALFWorld script) where it differs from our defaults; README, "the method in
# code", lists each point. Dual clip (c = 3) and the k3 clamp are our defaults already.
GIGPO_DEFAULTS: dict[str, dict] = {
    "ours": {},
    "verl-agent": {"gigpo.invalid_penalty_mode": "row", "gigpo.episode_stats": "step",
                   "gigpo.entropy_coef": 0.001, "gigpo.old_logprobs": "recompute",
                   "gigpo.clip_ratio_c": 3.0, "env.alfworld.verl_agent_prompt": True},
}

# run.ablation -> the settings it stands for ("no_mining" also drops the mining units, see build_units)
ABLATIONS: dict[str, dict] = {
    "none": {},
    "no_mining": {},
    "random_skills": {"mining.summariser": "random"},
    "no_selection": {"distill.utility_filter": False, "distill.advantage_filter": False},
    "no_utility_filter": {"distill.utility_filter": False},
}

ARMS = {"gigpo": "GiGPO-continued (control)", "siri": "SIRI (Phases 1-2)",
        "siri_random": "SIRI, random skills (control)"}  # run.arms -> row label in results.md

ENV_SHORTHANDS: dict[str, dict] = {
    "alfworld": {"env.name": "alfworld"},
    # GiGPO's WebShop setting: 15 steps per episode.
    "webshop": {"env.name": "webshop", "env.max_steps": 15},
}


MOVED_KEYS = {f"env.{k}": f"env.alfworld.{k}" for k in (
    "verl_agent_prompt", "receptacles", "distractors", "location_priors", "num_train_tasks", "eval_per_type",
    "cache_dir", "data_path", "real_eval_split", "real_max_tasks")} | {
    "env.num_products": "env.webshop.num_products", "env.num_train_goals": "env.webshop.num_train_goals",
    "env.num_eval_goals": "env.webshop.num_eval_goals", "env.webshop_path": "env.webshop.path"}
"""keys of earlier versions -> where they live now (each environment has its own section)"""


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key and the fix."""


def _check_type(value, tp, key: str):
    """Coerce/check one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not a {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (typing.Any,)
        return [_check_type(v, inner, f"{key}[]") for v in value]
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
        return "on" if value else "off"
    raise ConfigError(f"config key '{key}': expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _apply(obj, dotted: str, value, prefix: str = ""):
    """Set ``obj.a.b = value`` from "a.b", with a clear error for unknown or mistyped keys."""
    head, _, rest = dotted.partition(".")
    names = [f.name for f in dataclasses.fields(obj)]
    full = prefix + head
    if head not in names:
        if prefix + dotted in MOVED_KEYS:
            raise ConfigError(f"config key '{prefix + dotted}' is now '{MOVED_KEYS[prefix + dotted]}'")
        close = difflib.get_close_matches(head, names, n=1)
        hint = f" — did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(prefix + n for n in names)}"
        raise ConfigError(f"unknown config key '{full}'{hint}")
    hints = typing.get_type_hints(type(obj))
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if rest:
            return _apply(current, rest, value, full + ".")
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{full}' is a section; give it a mapping, not {value!r}")
        for k, v in value.items():
            _apply(current, str(k), v, full + ".")
        return
    if rest:
        raise ConfigError(f"config key '{full}' is a value, not a section (got '{full}.{rest}')")
    setattr(obj, head, _check_type(value, hints[head], full))


def load_config(path: str | None, overrides: list[str]) -> Config:
    """Defaults → preset → config.yaml → env shorthand → CLI ``key=value`` overrides."""
    pairs: list[tuple[str, object]] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        pairs.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    file_data = {}
    if path:
        if not Path(path).exists():
            raise ConfigError(f"config file {path} not found; pass --config PATH or create it")
        file_data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(file_data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections")
    preset = dict(pairs).get("preset", file_data.get("preset", "cpu"))
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config()
    for key, value in PRESETS[preset].items():
        _apply(cfg, key, value)
    defaults = dict(pairs).get("gigpo_defaults", file_data.get("gigpo_defaults", "ours"))
    if defaults not in GIGPO_DEFAULTS:
        raise ConfigError(f"gigpo_defaults={defaults!r}: choose one of {', '.join(GIGPO_DEFAULTS)}")
    for key, value in GIGPO_DEFAULTS[defaults].items():
        _apply(cfg, key, value)
    for key, value in file_data.items():
        _apply(cfg, str(key), value)
    for key, value in pairs:
        if key == "env" and isinstance(value, str):
            if value not in ENV_SHORTHANDS:
                raise ConfigError(f"env={value!r}: choose one of {', '.join(ENV_SHORTHANDS)}")
            for k, v in ENV_SHORTHANDS[value].items():
                _apply(cfg, k, v)
        else:
            _apply(cfg, key, value)
    cfg.preset = preset
    explicit = set(flat(dict(pairs))) | set(flat(file_data))
    if cfg.env.source == "real" and cfg.env.name == "alfworld" and "env.max_steps" not in explicit \
            and cfg.env.max_steps != 50:
        # the preset's cap is sized for embedded rooms of a few receptacles; real ALFWorld rooms hold
        # 15-35, and GiGPO plays them for 50 steps
        print(f"note: env.source=real: env.max_steps {cfg.env.max_steps} (preset {preset}, sized for embedded rooms) "
              "-> 50, as GiGPO's ALFWorld script; set env.max_steps to choose")
        cfg.env.max_steps = 50
    if cfg.env.name == "webshop" and cfg.env.source == "real" and cfg.coldstart.enabled != "off":
        # no expert walkthroughs to imitate there (webshop.RealWebShop.walkthrough returns [])
        if cfg.coldstart.enabled == "on":
            raise ConfigError("coldstart.enabled=on: real WebShop has no expert walkthroughs; set coldstart.enabled=off")
        if cfg.model.name == "tiny":
            print("note: env.source=real WebShop has no expert walkthroughs: no cold start (coldstart.enabled=off)")
        cfg.coldstart.enabled = "off"
    if cfg.env.name != "alfworld" and cfg.coldstart.rename:
        # renaming permutes ALFWorld's receptacle and object types; WebShop's text has neither
        if "coldstart.rename" in explicit:
            raise ConfigError(f"coldstart.rename={cfg.coldstart.rename}: renamed rooms are ALFWorld's; set "
                              "coldstart.rename=0 for env.name=webshop")
        cfg.coldstart.rename = 0.0
    if cfg.env.name != "alfworld" and cfg.rollout.constrain_actions:
        # WebShop's search[...] takes any query: its actions cannot be listed
        if "rollout.constrain_actions" in explicit:
            raise ConfigError("rollout.constrain_actions=true: only ALFWorld lists every action; set "
                              "rollout.constrain_actions=false for env.name=webshop")
        cfg.rollout.constrain_actions = False
    if cfg.rollout.constrain_actions and cfg.rollout.engine != "custom":
        raise ConfigError("rollout.constrain_actions=true needs rollout.engine=custom; set one of them")
    if cfg.coldstart.games == "after_pool":
        # the cold start's games after the RL pool: bounded only where the embedded generator makes
        # as many training games as asked; elsewhere, and with too few games, the preset's choice
        # falls back to "pool" (as coldstart.rename does for WebShop), an explicit one is an error
        n_train = cfg.env.alfworld.num_train_tasks
        need = cfg.warmup.task_pool + cfg.coldstart.tasks
        why = ""
        if (cfg.env.name, cfg.env.source) != ("alfworld", "embedded"):
            why = "needs env.name=alfworld, env.source=embedded"
        elif not cfg.warmup.task_pool:
            why = "needs a bounded RL pool (warmup.task_pool > 0)"
        elif n_train < need:
            why = f"needs env.alfworld.num_train_tasks >= warmup.task_pool + coldstart.tasks = {need}, not {n_train}"
        if why and "coldstart.games" in explicit:
            raise ConfigError(f"coldstart.games=after_pool {why}; set that, or coldstart.games=pool")
        if why:
            print(f"note: coldstart.games=after_pool (preset {preset}) {why}: the cold start uses the first "
                  "training games (coldstart.games=pool)")
            cfg.coldstart.games = "pool"
    if cfg.run.ablation not in ABLATIONS:
        raise ConfigError(f"run.ablation={cfg.run.ablation!r}: choose one of {', '.join(ABLATIONS)}")
    for key, value in ABLATIONS[cfg.run.ablation].items():  # the ablation wins over other settings
        _apply(cfg, key, value)
    if not cfg.run.arms or len(set(cfg.run.arms)) != len(cfg.run.arms) or set(cfg.run.arms) - set(ARMS):
        raise ConfigError(f"run.arms={cfg.run.arms!r}: a non-empty list of distinct arms from {', '.join(ARMS)}, "
                          "e.g. run.arms=[gigpo,siri]")
    _check_sections(cfg)
    return cfg


def _check_sections(obj, prefix: str = "") -> None:
    """Re-run every section's own checks (`__post_init__`) on the final values, a nested section
    (env.alfworld) before the one that holds it: `_apply` sets fields after the sections were made."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), prefix + f.name
        if not dataclasses.is_dataclass(value):
            continue
        _check_sections(value, name + ".")
        if hasattr(value, "__post_init__"):
            try:
                value.__post_init__()
            except (ValueError, TypeError) as e:
                raise ConfigError(f"section '{name}': {e}") from None


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source with ``ast``)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_reference() -> str:
    """config.yaml as shipped: every key, its default and its meaning, commented out.

    The defaults live in the dataclasses only; this text is generated from them (and a test
    checks that config.yaml equals it), so the file can never drift from the code.
    """
    lines = ["# SIRI configuration. Every key is listed with its default and meaning; all are commented",
             "# out, so this file changes nothing until you uncomment a line. Order of precedence:",
             "# dataclass defaults < preset < gigpo_defaults < this file < command line (python siri.py key.sub=value).",
             "# Regenerate after changing a default: python siri.py --write-config",
             "#", "# Presets (preset=NAME on the command line or here):"]
    for name, values in PRESETS.items():
        body = ", ".join(f"{k}={v}" for k, v in values.items())
        lines += textwrap.wrap(f"{name}: {body}", 88, initial_indent="#   ", subsequent_indent="#     ")
    lines += ["#", "# gigpo_defaults=verl-agent (after the preset, before this file): the public GiGPO code's"]
    body = ", ".join(f"{k}={v}" for k, v in GIGPO_DEFAULTS["verl-agent"].items())
    lines += textwrap.wrap(body, 88, initial_indent="#   ", subsequent_indent="#   ")
    lines += ["", "# preset: cpu", "# gigpo_defaults: ours", ""]
    for section in dataclasses.fields(Config):
        if section.name in ("preset", "gigpo_defaults"):
            continue
        lines.append(f"# {section.name}:")
        lines += _section_lines(getattr(Config(), section.name), "#   ")
        lines.append("")
    return "\n".join(lines)


def _section_lines(obj, indent: str) -> list[str]:
    """`config_reference`'s lines of one section: each field's doc and default; a sub-section
    (env.alfworld, env.webshop) nested under its name."""
    docs, lines = field_docs(type(obj)), []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += [f"{indent}{f.name}:", *_section_lines(value, indent + "  ")]
            continue
        for doc_line in textwrap.wrap(docs.get(f.name, ""), 88 - len(indent)):
            lines.append(f"{indent}# {doc_line}")
        dumped = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()
        lines.append(f"{indent}{dumped[1:-1]}")
    return lines


def flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
