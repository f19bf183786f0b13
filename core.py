"""The types every module shares, and the small helpers more than one module needs. Imports nothing
of the project.

    EnvState      what an environment slot shows the agent after a reset or a step
    GameBackend   what a game family (ALFWorld in envs.py, WebShop in webshop.py) must provide
    Step          one agent turn: prompt, sampled response, parsed action, reward, anchor state
    Trajectory    one episode: its Steps, the task, the group it belongs to (GiGPO's G rollouts)
    Sample        one training row of the update: a response's tokens under one prompt

    collapse, history_block, ANSWER,   the pieces of a prompt and of its answer rule that both
    extract_action                     environments use (each owns its template and grammar)
    atomic_write / atomic_write_json   files that hold the old or the new content, never half
    atomic_dir                         a folder built aside and renamed into place
    save_figure                        a matplotlib figure as a PNG, by atomic_write
    seed_of                            a deterministic 31-bit seed from any parts
    skill_id                           the one id of a skill, in the bank and in a rollout

Who makes what: agent.rollout plays Steps into Trajectories (envs.EnvManager supplies the
EnvStates); gigpo.samples_from and distill.distill_samples turn them into Samples; gigpo.update
trains on Samples.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Protocol

WIN_REWARD = 10.0
"""Reward of the winning step in both environments (DESIGN: reward = 10 x won); every other step 0."""


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------
@dataclass
class EnvState:
    """What the manager returns for one slot after reset/step."""
    task_id: str
    task_type: str     # e.g. "pick_and_place_simple"
    task: str          # instruction text, e.g. "put a apple in fridge."
    obs: str           # current observation text (the env's feedback)
    admissible: list[str]
    reward: float      # reward of the last transition: WIN_REWARD on the winning step, else 0 (both envs)
    done: bool
    won: bool
    anchor: str        # GiGPO anchor-state key: hash of the normalised current observation
    steps: int         # env steps taken so far in this episode (invalid ones included)
    score: float | None = None  # WebShop: its own reward in [0, 1] of the purchase (0.0 before buying),
    #                             reported as score = 100 x mean and success = (score == 1); ALFWorld: None


class GameBackend(Protocol):
    """One playable environment slot of one game family (envs.py: ALFWorld, webshop.py: WebShop).

    The manager builds one backend per slot with `Backend(cfg)` (plus one more in the main
    process that only answers task_ids / task_type / walkthrough). `info` always carries
    "admissible" (list[str]), "won" (bool), "task" (str) and "task_type" (str); optionally
    "score" (float, copied to EnvState.score) and "invalid" (bool, counted in invalid_steps).
    The reward a backend returns is the training reward (WIN_REWARD x won for both families).
    Optional: a `loaded_task` attribute (the task id whose game is loaded) lets the manager
    route a returning task to the backend that already has it, and `close()` is called at shutdown.

    The class also owns the family's prompt and action grammar (static methods, so the manager
    calls them without a slot): `build_prompt(cfg, state, history, skill)` -> the user message,
    `parse_action(text, admissible)` -> (action or None, valid).
    """

    def __init__(self, cfg) -> None: ...
    def task_ids(self, split: str) -> list[str]: ...            # split in {"train", "eval"}
    def task_type(self, task_id: str) -> str: ...
    def walkthrough(self, task_id: str) -> list[str]: ...        # expert actions that win
    def reset(self, task_id: str) -> tuple[str, dict]: ...       # (obs, info); same id -> same state
    def step(self, action: str) -> tuple[str, float, bool, dict]: ...  # (obs, reward, done, info)


# Prompt pieces both environments use. Our own wording, kept short because a tiny CPU model reads
# it in the tests. A block is either empty or ends in "\n".
ANSWER = "Think briefly inside <think></think>, then give exactly one admissible action inside <action></action>."
HISTORY_BLOCK = "Your recent steps, oldest first:\n{steps}\n"
HISTORY_STEP = "- you saw: {obs}\n  you did: {action}"
_THINK_RE = re.compile(r"<think>.*?</think>", re.S | re.I)
_ACTION_RE = re.compile(r"<action>(.*?)</action>", re.S | re.I)


def collapse(text: str) -> str:
    """Whitespace runs -> one space, ends stripped."""
    return " ".join(text.split())


def history_block(history: list[tuple[str, str | None]], n: int) -> str:
    """The prompt's block of the last n (observation, action) pairs of the episode; "" if none.
    An invalid step's action (None) shows as "(invalid)"."""
    recent = history[-n:] if n > 0 else []
    steps = "\n".join(HISTORY_STEP.format(obs=collapse(o), action=a if a else "(invalid)") for o, a in recent)
    return HISTORY_BLOCK.format(steps=steps) if recent else ""


def extract_action(text: str) -> str | None:
    """The answer rule of both environments (verl-agent's): a response counts only if it has a
    <think>...</think> block and an <action>...</action> block; the last <action> block is the
    action, lower-cased, whitespace collapsed. None if the rule fails or the block is empty. Never
    raises. Each environment then checks the action against its own grammar."""
    if not isinstance(text, str):
        return None
    blocks = _ACTION_RE.findall(text)
    if not blocks or not _THINK_RE.search(text):
        return None
    return collapse(blocks[-1]).lower() or None


# ---------------------------------------------------------------------------------------------
# Episodes and training rows
# ---------------------------------------------------------------------------------------------
@dataclass
class Step:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    action: str | None      # parsed action (None if invalid)
    valid: bool
    reward: float           # reward of this transition
    done: bool              # episode ended with this step
    won: bool
    anchor: str             # GiGPO anchor key of the state the action was taken in
    obs: str                # observation the action was taken on
    plain_prompt_ids: list[int] | None = None  # same prompt without the skill (skill-guided rollouts)
    distilled: bool = False  # Phase 2: selected for distillation (set by distill.distill_samples)
    # per response token, the ids it was sampled among (`decoder.Generation.allowed`); None = free
    allowed: list[list[int] | None] | None = None


@dataclass
class Trajectory:
    task_id: str
    task_type: str
    group: str              # deterministic group key: task id + rollout seed
    index: int              # 0..G-1 inside the group
    skill_id: str | None    # `skill_id` of the skill in the prompt (= its Skill.id), None for plain rollouts
    steps: list[Step]
    won: bool
    task: str = ""          # the task instruction text (EnvState.task at reset)
    # the final state's `score` if the env provides one (WebShop: its [0, 1] purchase reward), else
    # None (ALFWorld, where success is `won`)
    score: float | None = None

    @property
    def reward_sum(self) -> float:
        """Σ_t r_t, the environment's rewards summed (WIN_REWARD x won), without GiGPO's invalid-action
        penalty. GiGPO's R(τ), which its advantages compare, is `gigpo.group_advantages`'s
        "returns" (the penalty included in the default "reward" penalty mode). The distillation's
        utility filter and the `*/return` metrics read this one: whether the task was solved."""
        return sum(s.reward for s in self.steps)


@dataclass
class Sample:
    """One training row: the tokens of one step's response under one prompt.

    ``kind == "pg"``: a plain rollout step, trained with PPO-clip + KL (Phase 0 and 2).
    ``kind == "distill"``: a selected skill-guided step re-scored under the plain prompt
    (Phase 2, see distill.py); ``old_logprobs`` are then the sampling log-probs under the
    skill prompt.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float]
    advantage: float
    kind: str = "pg"
    allowed: list[list[int] | None] | None = None  # the Step's `allowed` (constrained tokens), None = free


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file so that readers see the old or the new content, never half of it: a temp file
    in the same folder, fsync, os.replace (atomic on POSIX and Windows); the temp file is removed
    if anything fails. The file is readable by everyone (0644), as a plain open() would make it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes private files
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """`atomic_write` of json.dumps(obj)."""
    atomic_write(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a folder aside and put it at `path` only when the block ends without an error:
    ``with atomic_dir(p) as tmp: write into tmp``. On an error the partial folder is removed and
    `path` is left as it was. A previous folder at `path` is removed just before the rename (a kill
    in between leaves none; the checkpoint, which must never be lost, keeps a `.old` copy instead,
    siri.save_checkpoint)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"  # a fixed name: a build killed half-way is removed by the next one
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Save a matplotlib figure as a PNG with `atomic_write`, and close it."""
    import matplotlib.pyplot as plt  # optional for everything else in this module

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def seed_of(*parts) -> int:
    """Deterministic 31-bit seed from any parts (Python's hash() of str is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") >> 1


def skill_id(task_type: str, text: str) -> str:
    """The one id of a skill: a hash of its task type and rendered text. `Skill.id` and the
    `Trajectory.skill_id` of a rollout with that skill in its prompt are both this value."""
    return hashlib.sha1(f"{task_type}\n{text}".encode()).hexdigest()[:12]
