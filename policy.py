"""The policy: model loading, a KV-cached batched decoder, log-prob scoring, group rollouts.

Read it top to bottom:

1. configs            `ModelConfig`, `SamplingConfig` (every default is defined here, once)
2. tiny model         `build_tiny_model`: a random Qwen2 + a BPE tokenizer trained on env text, offline
3. loading            `load_policy`: hub id / local path / "tiny" -> `Policy` (LoRA via peft, QLoRA on CUDA)
4. decoding           `Policy.generate`: our KV-cached decoder (default; it samples from a copy with the
                      LoRA adapter merged into the weights, `merged_copy`) or HF `generate` (the oracle)
5. scoring            `Policy.score`: per-token log-probs (+ entropy) of responses, with or without grad,
                      in length-sorted micro-batches (`Policy.pack_rows`)
6. rollouts           `rollout`: G episodes per task played together, returned as `Trajectory`s

The KL reference policy of GiGPO/SIRI is the same model with the LoRA adapter disabled
(`Policy.score(..., reference=True)`), so no second copy of the weights is kept in memory.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

# peft imports bitsandbytes, which on some CPU-only machines logs a warning about an optional
# CPU kernel we never use (QLoRA runs on CUDA only here). Silence that one logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import peft  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Cache,
    DynamicCache,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.cache_utils import CacheLayerMixin  # noqa: E402

import mining  # noqa: E402  (skill_id only: one id for a skill in the bank and in a rollout)


# ---------------------------------------------------------------------------------------------
# 1. Configs
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "Qwen/Qwen2.5-1.5B-Instruct"
    """hub id, local directory, or "tiny" (a random 2-layer Qwen2 built offline, for tests/CPU)"""
    dtype: str = "auto"
    """"auto" (the checkpoint's own dtype, from its config) | "float32" | "bfloat16" | "float16\""""
    lora_r: int = 16
    """LoRA rank (our choice for the 1.5B reproduction; the paper does not state its adapter setup)"""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is (lora_alpha / lora_r) * B @ A"""
    lora_dropout: float = 0.0
    """our choice: 0, so the PPO ratio is exactly 1 on the first update (dropout would make the
    update's log-probs differ from the sampling ones)"""
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """modules that get a LoRA adapter (all linear layers of a Qwen2 block)"""
    qlora: bool = False
    """load the base model in 4-bit NF4 (bitsandbytes) under the LoRA adapter; CUDA only"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, ~30% slower updates"""
    tiny_dir: str = ".cache/tiny"
    """where name="tiny" models are built and cached (one subfolder per corpus + tiny config)"""
    tiny_layers: int = 2
    """tiny model: decoder layers"""
    tiny_hidden: int = 128
    """tiny model: hidden size"""
    tiny_heads: int = 4
    """tiny model: attention heads (head dim = tiny_hidden / tiny_heads)"""
    tiny_kv_heads: int = 2
    """tiny model: key/value heads (grouped-query attention, as in Qwen2.5)"""
    tiny_vocab: int = 3000
    """tiny model: BPE vocabulary target (smaller if the corpus has fewer merges to offer)"""
    tiny_seed: int = 0
    """tiny model: seed of its random weights"""

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if min(self.lora_r, self.lora_alpha, self.tiny_layers, self.tiny_hidden, self.tiny_heads,
               self.tiny_kv_heads, self.tiny_vocab) < 1 or not 0 <= self.lora_dropout < 1:
            raise ValueError("model.lora_r, lora_alpha and the tiny_* sizes must be >= 1, lora_dropout in [0, 1)")
        if self.tiny_hidden % self.tiny_heads or self.tiny_heads % self.tiny_kv_heads:
            raise ValueError(f"model.tiny_hidden ({self.tiny_hidden}) must divide by tiny_heads ({self.tiny_heads}) "
                             f"and tiny_heads by tiny_kv_heads ({self.tiny_kv_heads})")


@dataclass
class SamplingConfig:
    engine: str = "custom"
    """"custom" (our KV-cached decoder) | "hf" (transformers `generate`, the reference oracle)"""
    temperature: float = 1.0
    """sampling temperature; 0 = greedy (argmax). verl-agent evaluates ALFWorld at 0.4"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p (1 = off)"""
    top_k: int = 0
    """keep only the k most likely tokens (0 = off)"""
    max_new_tokens: int = 512
    """response cap in tokens (verl-agent ALFWorld: 512)"""
    min_new_tokens: int = 0
    """EOS is blocked until this many tokens exist (HF semantics); benchmarks use it to force lengths"""
    stop: tuple[str, ...] = ("</action>",)
    """a response also ends once its text contains one of these strings (the token that completes
    the string is kept; nothing after it is generated)"""
    logprob_temperature: float = 1.0
    """log-probs returned with each sampled token are log_softmax(logits / this); 1 = the raw policy,
    which is what the PPO update scores"""
    share_prefix: bool = True
    """identical prompts in a batch are prefilled once and their KV cache rows copied (custom engine)"""
    drop_finished: bool = True
    """finished rows leave the batch and the KV cache (custom engine); `bench.py decode` measures it"""
    kv_cache: str = "preallocated"
    """custom engine's KV cache: "preallocated" (allocated once per call, written in place) |
    "dynamic" (HF's DynamicCache, grown by concatenation); same outputs, `bench.py decode` times both"""
    merge_adapter: bool = True
    """custom engine: sample from a copy of the model with the LoRA adapter folded into its weights,
    W + (lora_alpha / lora_r)·B·A (`merged_copy`), built once per rollout and dropped after it.
    our choice: on, because our decode step on the LoRA-wrapped model costs ~1.3x the merged one
    (`bench.py decode`, models "lora" and "lora_merged"), and the merged copy samples the same
    policy: equal log-probs to ~1e-6 in float32, to the rounding of W + BA in bf16 (tested). The
    update always scores the wrapped model. Where the adapter cannot be merged (QLoRA's 4-bit
    base, a disabled adapter, LoRA variants such as DoRA) the wrapped model samples, as with false"""
    waves: int = 1
    """`rollout` decodes its slots in this many waves of whole task groups (cut inside the groups
    when there are fewer tasks than waves), one after another;
    with env workers (env.num_workers > 0) the env step of one wave runs while the next wave
    decodes (ping-pong), and at the start the later waves' games load while wave 0 decodes, so
    decoding and environments stop waiting for each other. Results
    depend on the number of waves (each wave samples from its own random stream), never on
    whether the overlap happens (tested). our choice: 1, see `python bench.py rollout`: on a
    CPU whose cores all decode, two half batches cost more decoding than the overlap saves"""
    overlap_env: bool = True
    """with waves >= 2 and env workers: overlap a wave's env step with the next wave's decoding
    (false: wait for each step; the same results, `bench.py rollout` compares the two)"""

    def __post_init__(self):
        if self.engine not in ("custom", "hf") or self.kv_cache not in ("preallocated", "dynamic"):
            raise ValueError(f"rollout.engine must be custom|hf and rollout.kv_cache preallocated|dynamic "
                             f"(got {self.engine!r}, {self.kv_cache!r})")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"rollout.max_new_tokens must be >= 1 and rollout.min_new_tokens in [0, max_new_tokens] "
                             f"(got {self.max_new_tokens}, {self.min_new_tokens})")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.logprob_temperature <= 0:
            raise ValueError("rollout.temperature >= 0, rollout.top_p in (0, 1], rollout.top_k >= 0 and "
                             "rollout.logprob_temperature > 0")
        if self.waves < 1:
            raise ValueError(f"rollout.waves must be >= 1 (got {self.waves})")


# ---------------------------------------------------------------------------------------------
# 2. A tiny model the project builds itself, offline
# ---------------------------------------------------------------------------------------------
# Qwen's chat format: <|im_start|>role\n...<|im_end|>\n, ending with the assistant header when a
# generation prompt is asked for. (Real Qwen2.5 templates also insert a default system message.)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn start, eos (as Qwen)


def default_tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """ALFWorld-like strings (rooms, tasks, think/action turns) to train the tiny tokenizer on when the
    caller has no environment text at hand (tests, bench). siri.py passes the env's own prompts."""
    rng = random.Random(seed)
    objects = ("alarmclock apple baseballbat basketball book bowl box bread butterknife candle cd cellphone "
               "cloth creditcard cup dishsponge egg fork glassbottle handtowel houseplant kettle keychain "
               "knife ladle laptop lettuce mug newspaper pan papertowelroll pen pencil peppershaker pillow "
               "plate plunger pot potato remotecontrol saltshaker soapbar soapbottle spatula spoon "
               "spraybottle statue tennisracket tissuebox toiletpaper tomato towel vase watch wateringcan "
               "winebottle desklamp floorlamp").split()
    places = ("armchair bathtubbasin bed cabinet cart coffeemachine coffeetable countertop desk diningtable "
              "drawer dresser fridge garbagecan handtowelholder laundryhamper microwave ottoman safe shelf "
              "sidetable sinkbasin sofa stoveburner toaster toilet toiletpaperhanger towelholder "
              "tvstand").split()
    tasks = ["put a {o} in {p}.", "put some {o} on {p}.", "clean some {o} and put it in {p}.",
             "heat some {o} and put it in {p}.", "cool some {o} and put it in {p}.",
             "look at {o} under the desklamp.", "put two {o} in {p}.", "find two {o} and put them in {p}."]
    verbs = ["go to {p} {i}", "open {p} {i}", "close {p} {i}", "take {o} {i} from {p} {i}",
             "move {o} {i} to {p} {i}", "examine {p} {i}", "use desklamp {i}", "inventory", "look",
             "heat {o} {i} with microwave {i}", "cool {o} {i} with fridge {i}",
             "clean {o} {i} with sinkbasin {i}", "slice {o} {i} with knife {i}"]
    thoughts = ["I need to find a {o} first. It is probably in the {p}.",
                "The {o} is not here, so I should check another {p}.",
                "Now I have the {o}. Next, I must go to the {p} and put it there.",
                "I still have not found it; maybe the {p} is closed and I should open it.",
                "The task is done once the {o} is in the {p}."]
    corpus = []
    for _ in range(n):
        o, p, i = rng.choice(objects), rng.choice(places), rng.randint(1, 20)
        seen = ", ".join(f"a {rng.choice(places)} {rng.randint(1, 20)}" for _ in range(rng.randint(3, 9)))
        acts = [rng.choice(verbs).format(o=rng.choice(objects), p=rng.choice(places), i=rng.randint(1, 20))
                for _ in range(4)]
        think = rng.choice(thoughts).format(o=o, p=p)
        corpus += [
            f"-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly "
            f"around you, you see {seen}.\n\nYour task is to: " + rng.choice(tasks).format(o=o, p=p),
            f"You arrive at {p} {i}. On the {p} {i}, you see a {o} {rng.randint(1, 3)}.",
            f"You open the {p} {i}. The {p} {i} is open. In it, you see nothing.",
            f"You pick up the {o} {i} from the {p} {i}. Nothing happens.",
            f"Your admissible actions of the current situation are: {acts}.",
            f"<think>{think}</think><action>{acts[0]}</action>",
        ]
    return corpus


# Qwen2's pre-tokenizer split (as in transformers' Qwen2Tokenizer): words, single digits, punctuation
# runs, newlines, spaces. A saved qwen2 model directory reloads its tokenizer as Qwen2Tokenizer, which
# rebuilds exactly this pipeline (NFC, split, byte-level), so we train with it too.
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` (milliseconds) with Qwen2's pre-tokenization and
    wrap it like a Qwen tokenizer: Qwen chat template, eos = <|im_end|>, pad = <|endoftext|>.
    Byte-level means any text encodes; the vocabulary is smaller than vocab_size when the corpus
    has fewer distinct word pieces to merge."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text
    )


def make_tiny_model(corpus: list[str], layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                    vocab_size: int = 3000, seed: int = 0) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A random-weight Qwen2 causal LM (fp32, seeded) and its tokenizer trained on `corpus`."""
    tokenizer = build_tiny_tokenizer(corpus, vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        tie_word_embeddings=False,  # our choice: a random tied head echoes its input token forever
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def build_tiny_model(out_dir: str, corpus: list[str], layers: int = 2, hidden: int = 128, heads: int = 4,
                     kv_heads: int = 2, vocab_size: int = 3000, seed: int = 0) -> str:
    """Make the tiny model (`make_tiny_model`), save model + tokenizer to `out_dir`, return it.

    The directory then loads exactly like a downloaded hub model (`load_policy` with name=out_dir).
    """
    model, tokenizer = make_tiny_model(corpus, layers, hidden, heads, kv_heads, vocab_size, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _tiny_model_dir(cfg: ModelConfig, corpus) -> str:
    """Build (once) and return the cached tiny model for this corpus + tiny config."""
    corpus = corpus() if callable(corpus) else corpus
    corpus = default_tiny_corpus() if corpus is None else list(corpus)
    spec = dict(layers=cfg.tiny_layers, hidden=cfg.tiny_hidden, heads=cfg.tiny_heads,
                kv_heads=cfg.tiny_kv_heads, vocab_size=cfg.tiny_vocab, seed=cfg.tiny_seed)
    key = hashlib.sha1(json.dumps([spec, corpus]).encode()).hexdigest()[:12]
    out_dir = os.path.join(cfg.tiny_dir, f"tiny-{key}")
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        tmp = f"{out_dir}.tmp{os.getpid()}"  # build aside, then rename: safe if two processes race
        build_tiny_model(tmp, corpus, **spec)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ---------------------------------------------------------------------------------------------
# 3. Loading
# ---------------------------------------------------------------------------------------------
class ModelLoadError(ValueError):
    """The model asked for cannot be loaded here; the message says how to fix it."""


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_policy(cfg: ModelConfig, corpus=None, device: str = "auto", adapter: str | None = None) -> Policy:
    """Load tokenizer + causal LM, wrap it with a LoRA adapter, return a `Policy`.

    cfg.name: a hub id ("Qwen/Qwen2.5-1.5B-Instruct"), a local directory, or "tiny" (built on demand
    under cfg.tiny_dir from `corpus`: a list of strings or a function returning one, called only
    when the tiny model is not cached yet; None = `default_tiny_corpus()`).
    device: "auto" (cuda if available, else cpu) | "cpu" | "cuda" | "cuda:1" ...
    adapter: directory of a saved adapter (`Policy.save`) to resume from, else a fresh LoRA.
    Raises `ModelLoadError` (one message, naming the fix) when the model cannot be loaded.
    """
    name = cfg.name
    if name == "tiny":
        name = _tiny_model_dir(cfg, corpus)
    device = _resolve_device(device)
    if cfg.qlora and device.type != "cuda":  # checked before anything touches bitsandbytes' kernels
        raise ModelLoadError(
            f"model.qlora=true needs a CUDA GPU (4-bit NF4 through bitsandbytes), but the device is "
            f"'{device}'. Fix: set model.qlora=false (plain LoRA) or run on a CUDA machine.")
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") != 1
    if looks_local or os.path.isdir(os.path.expanduser(name)):  # absolute: a saved adapter's base loads from anywhere
        name = os.path.abspath(os.path.expanduser(name))
    if looks_local and not os.path.isdir(name):
        raise ModelLoadError(
            f"model path '{name}' does not exist. Fix: use model.name=tiny (built offline), a local "
            f"directory with a downloaded model, or a hub id such as Qwen/Qwen2.5-1.5B-Instruct.")

    kwargs: dict = {"dtype": cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)}
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name))
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), **kwargs)
    except (OSError, ValueError) as e:  # missing files, no internet, unknown architecture
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"could not load model '{name}': {first_line}\nFix: with no internet use model.name=tiny "
            f"(built offline) or a local directory holding a downloaded model; a hub id needs internet "
            f"or a filled Hugging Face cache.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    if cfg.qlora:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model.to(device)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable()  # non-reentrant: works with a frozen base under LoRA
    with warnings.catch_warnings():  # peft still calls transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if adapter is not None:
            model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                   target_modules=list(cfg.lora_target_modules), bias="none",
                                   task_type="CAUSAL_LM")
            model = peft.get_peft_model(model, lora)
    return Policy(model, tokenizer, device, cfg)


# ---------------------------------------------------------------------------------------------
# Data exchanged with the other modules (plain dataclasses: save them with dataclasses.asdict)
# ---------------------------------------------------------------------------------------------
@dataclass
class Generation:
    ids: list[int]          # response token ids (the EOS token is kept when the row ended on it)
    logprobs: list[float]   # log pi(token | context) of each sampled token, at `logprob_temperature`
    text: str               # decoded response, special tokens removed
    finish_reason: str      # "eos" | "stop" (a stop string) | "length" (max_new_tokens)


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


@dataclass
class Trajectory:
    task_id: str
    task_type: str
    group: str              # deterministic group key: task id + rollout seed
    index: int              # 0..G-1 inside the group
    skill_id: str | None    # `mining.skill_id` of the skill in the prompt (= its Skill.id), None for plain rollouts
    steps: list[Step]
    won: bool
    task: str = ""          # the task instruction text (EnvState.task at reset)
    # the final state's `score` if the env provides one (WebShop: its [0, 1] purchase reward), else
    # None (ALFWorld, where success is `won`)
    score: float | None = None

    @property
    def return_(self) -> float:
        """Undiscounted episode return: the sum of step rewards."""
        return sum(s.reward for s in self.steps)


# ---------------------------------------------------------------------------------------------
# 4. Decoding helpers
# ---------------------------------------------------------------------------------------------
def _dedupe(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Unique prompts (first-seen order) and, for each input row, the index of its unique prompt."""
    index: dict[tuple[int, ...], int] = {}
    inverse = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], inverse


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, u: torch.Tensor | None) -> torch.Tensor:
    """Pick one token per row from (B, V) float logits: greedy if temperature == 0, else
    temperature -> top-k -> top-p -> sample (the order HF's logits warpers use), with u (B, 1)
    float64 uniforms in [0, 1), one per row."""
    if cfg.temperature == 0:
        return logits.argmax(-1)  # (B,)
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)  # (B, V) ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - cfg.top_p  # drop the low tail whose mass is <= 1 - top_p
        remove[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    # Inverse-CDF sampling: pick the first token whose cumulative probability exceeds u. Same
    # distribution as torch.multinomial, ~8x cheaper on CPU (one random number per row, not per
    # vocabulary entry). float64 keeps 1e-8-probability tokens of a 152k vocabulary.
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)  # (B, V)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1); right=True skips p=0 tokens
    return idx.squeeze(1).clamp_(max=cdf.shape[1] - 1)  # (B,)


class _StopRule:
    """When does a response end? Shared by both engines so that they truncate identically.

    After each new token: EOS id -> "eos" (token kept); else if the decoded tail of the response
    contains a stop string -> "stop" (the completing token kept). Decoding is the slow part, so it
    runs only when the new token's text contains the last character of a stop string (a token that
    completes a stop string must contain its last character).
    """

    def __init__(self, tokenizer, eos_ids: list[int], stop: tuple[str, ...]):
        self.tokenizer, self.eos, self.stop = tokenizer, set(eos_ids), tuple(s for s in stop if s)
        self.last_chars = {s[-1] for s in self.stop}
        # tokens to decode: one token holds at least one byte; +3 covers a cut multi-byte character
        self.tail = max((len(s.encode()) for s in self.stop), default=0) + 3
        self._piece: dict[int, bool] = {}  # token id -> may it complete a stop string?

    def __call__(self, ids: list[int], eos_allowed: bool = True) -> str | None:
        tok = ids[-1]
        if eos_allowed and tok in self.eos:
            return "eos"
        if not self.stop:
            return None
        if tok not in self._piece:
            piece = self.tokenizer.decode([tok])
            self._piece[tok] = "\ufffd" in piece or any(c in piece for c in self.last_chars)
        if self._piece[tok]:
            text = self.tokenizer.decode(ids[-self.tail:])
            if any(s in text for s in self.stop):
                return "stop"
        return None


class _PreallocatedLayer(CacheLayerMixin):
    """One layer's KV cache, allocated once for the whole generation: (B, kv, max_len, hd) buffers
    that every step writes into, handing attention a view of the first `length` positions.

    our choice: HF's default `DynamicLayer` grows by `torch.cat`, which allocates and copies the
    whole cache at every step; `StaticCache` preallocates too but attends over all max_len
    positions (the unused ones masked out). This layer does neither: same keys and values as
    DynamicLayer, bit for bit (tested), and the decode step costs about a quarter less here
    (`bench.py decode`, "raw forward, dynamic cache").
    """

    is_sliding = False

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.length = max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, kv, _, hd = key_states.shape
        self.k_buf = key_states.new_empty((b, kv, self.max_len, hd))  # (B, kv, max_len, hd)
        self.v_buf = value_states.new_empty((b, kv, self.max_len, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.length, key_states.shape[-2]
        if n + m > self.max_len:
            raise ValueError(f"KV cache full: {n} + {m} tokens > max_len {self.max_len}")
        self.k_buf[:, :, n:n + m] = key_states  # (B, kv, m, hd) written in place
        self.v_buf[:, :, n:n + m] = value_states
        self.length = n + m
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]  # views
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # as DynamicLayer: (kv_length, kv_offset)

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) batch rows: (B, kv, max_len, hd) -> (len(indices), kv, max_len, hd);
        only the filled positions are copied."""
        if not self.is_initialized:
            return
        bufs = []
        for buf in (self.k_buf, self.v_buf):
            new = buf.new_empty((len(indices), *buf.shape[1:]))
            torch.index_select(buf[:, :, :self.length], 0, indices, out=new[:, :, :self.length])
            bufs.append(new)
        self.k_buf, self.v_buf = bufs
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """name -> LoRA wrapper module of a peft model's inner transformers model ({} if none)."""
    if not isinstance(model, peft.PeftModel):
        return {}
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def merged_copy(model) -> torch.nn.Module | None:
    """The LoRA model as a plain transformers model that samples the same policy, or None.

    Every LoRA-wrapped linear layer becomes a plain `nn.Linear` holding W' = W + Σ (α/r)·B·A over
    the active adapters (peft's `get_delta_weight`), summed in float32 and rounded once to W's
    dtype; every other tensor (embeddings, norms, the untouched weights W) is *shared* with
    `model`, not copied. The original model is never written, so nothing needs restoring.
    Cost: one new tensor per adapted layer (for Qwen2.5-1.5B in bf16 about 2.6 GB) for as long
    as the copy lives, and one r-rank matmul per layer to build it.

    our choice: a merged copy rather than peft's in-place `merge_adapter()` + `unmerge_adapter()`,
    because unmerging computes (W + ΔW) − ΔW, which is not W bit for bit in floating point, and
    because a plain `nn.Linear` also drops the wrapper's per-call Python (~40 % of the LoRA
    overhead of a tiny-model decode step, measured). None (sample from `model` as it is) when
    there is nothing to merge or it cannot be merged: no peft adapter, adapters disabled,
    a quantised base (QLoRA: 4-bit NF4 weights cannot hold W + ΔW; a merged bf16 copy of a 7B
    base would cost the ~15 GB QLoRA exists to save), or a LoRA variant (DoRA, lora bias).
    """
    layers = _lora_layers(model)
    if not layers:
        return None
    for m in layers.values():
        w = getattr(m.get_base_layer(), "weight", None)
        if (type(m.get_base_layer()) is not torch.nn.Linear or w is None or not w.is_floating_point()
                or m.disable_adapters or m.merged or m.fan_in_fan_out or getattr(m, "lora_variant", None)
                or any(m.lora_bias.values())):
            return None
    lm = model.get_base_model()
    shared = {id(t): t for t in [*lm.parameters(), *lm.buffers()]}
    plain = copy.deepcopy(lm, memo=shared)  # the module tree is copied, every tensor is shared
    with torch.no_grad():
        for name, m in layers.items():
            base = m.get_base_layer()
            delta = sum(m.get_delta_weight(a).float() for a in m.active_adapters if a in m.lora_A)
            linear = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
            linear.weight = torch.nn.Parameter((base.weight.float() + delta).to(base.weight.dtype),
                                               requires_grad=False)  # (out, in)
            linear.bias = base.bias  # shared (None for Qwen2's projections but q/k/v)
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, linear)
    return plain.eval()


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------
class Policy:
    """A causal LM (normally a `peft.PeftModel` with one LoRA adapter) + its tokenizer."""

    def __init__(self, model, tokenizer, device: torch.device | str | None = None,
                 cfg: ModelConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg  # the ModelConfig it was loaded with (None if built by hand)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._lm_config = lm.config
        eos = [tokenizer.eos_token_id, lm.generation_config.eos_token_id]
        flat = [e for x in eos for e in (x if isinstance(x, (list, tuple)) else [x]) if e is not None]
        self.eos_ids: list[int] = list(dict.fromkeys(flat))  # e.g. Qwen2.5: <|im_end|>, <|endoftext|>
        self.pad_id: int = tokenizer.pad_token_id
        # our choice: SamplingConfig is the only source of sampling settings. Checkpoints ship their
        # own (Qwen2.5: temperature 0.7, top_k 20, repetition_penalty 1.05) which HF `generate` would
        # otherwise merge in; we keep only the special tokens.
        lm.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        # Decode steps pass a ready boolean mask (B, 1, 1, L) instead of the 2D padding mask when the
        # model uses SDPA over full attention: for a single query token the causal+padding mask IS the
        # padding mask, and it skips transformers' per-step mask construction (measured by bench.py).
        layer_types = getattr(lm.config, "layer_types", None) or ["full_attention"]
        self._full_attention = all(t == "full_attention" for t in layer_types)
        self._ready_mask = lm.config._attn_implementation == "sdpa" and self._full_attention
        self._merged: torch.nn.Module | None = None  # the merged copy while `merged_adapter` is open

    def new_cache(self, max_len: int, kind: str = "preallocated") -> Cache:
        """An empty KV cache for sequences of up to max_len tokens (prompt + response): preallocated
        layers (`_PreallocatedLayer`) when every layer attends to the full sequence, else (or with
        kind="dynamic") HF's `DynamicCache` (what sliding-window / hybrid models need)."""
        if kind not in ("preallocated", "dynamic"):
            raise ValueError(f"sampling.kv_cache must be 'preallocated' or 'dynamic', got {kind!r}")
        if kind == "dynamic" or not self._full_attention:
            return DynamicCache(config=self._lm_config)
        n_layers = self._lm_config.get_text_config(decoder=True).num_hidden_layers
        return Cache(layers=[_PreallocatedLayer(max_len) for _ in range(n_layers)])

    # -- prompts --------------------------------------------------------------------------------
    def chat_ids(self, user_text: str) -> list[int]:
        """Token ids of one user message in the model's chat template, plus the assistant header."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                                  tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token lists into input ids (B, P) and a 0/1 attention mask (B, P)."""
        P = max(len(r) for r in rows)
        ids = torch.full((len(rows), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), P), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, P - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, P - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- decoding -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def merged_adapter(self, enabled: bool = True):
        """While open, our decoder samples from `merged_copy(self.model)` (the adapter folded into
        the weights; see `SamplingConfig.merge_adapter`). Yields the copy, or None where there is
        nothing to merge. `rollout` opens it once for all the steps of a rollout; `generate` opens
        it per call when nobody has. Nested opens reuse the outer copy. The copy is a snapshot:
        do not train inside the block (nothing in this project does)."""
        if not enabled or self._merged is not None:
            yield self._merged
            return
        self._merged = merged_copy(self.model)
        try:
            yield self._merged
        finally:
            self._merged = None  # the merged weights are freed; self.model was never touched

    def decoder(self, cfg: SamplingConfig) -> torch.nn.Module:
        """The module our decoder runs: the merged copy when one is open and cfg asks for it."""
        return self._merged if cfg.merge_adapter and self._merged is not None else self.model

    def generate(self, prompts: list[list[int]], cfg: SamplingConfig,
                 generator: torch.Generator | None = None) -> list[Generation]:
        """Sample one response per prompt (token-id lists). Runs the model in eval mode.

        generator: a torch.Generator on `self.device` for reproducible sampling (None = global RNG).
        """
        if not prompts:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            if cfg.engine == "custom":
                with self.merged_adapter(cfg.merge_adapter):
                    return self._generate_custom(prompts, cfg, generator)
            if cfg.engine == "hf":
                return self._generate_hf(prompts, cfg, generator)
            raise ValueError(f"sampling.engine must be 'custom' or 'hf', got {cfg.engine!r}")
        finally:
            self.model.train(was_training)

    @torch.inference_mode()
    def _generate_custom(self, prompts, cfg, generator) -> list[Generation]:
        """Our decoder: one prefill of the (unique) left-padded prompts, then one token per step
        reusing the KV cache; finished rows leave the batch."""
        B = len(prompts)
        model = self.decoder(cfg)  # the merged copy, or the LoRA-wrapped model
        stop_rule = _StopRule(self.tokenizer, self.eos_ids, cfg.stop)
        eos = torch.tensor(self.eos_ids, device=self.device)

        # Prefill. Shared prefix: a group of G rollouts of one task has G identical prompts; prefill
        # each distinct prompt once, then copy its KV cache rows G times.
        uniq, inverse = _dedupe(prompts) if cfg.share_prefix else (prompts, list(range(B)))
        ids, mask = self._left_pad(uniq)  # (U, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (U, P) position 0 = first real token
        P = ids.shape[1]
        cache = self.new_cache(P + cfg.max_new_tokens, cfg.kv_cache)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()  # (U, V) next-token logits
        if len(uniq) < B:
            expand = torch.tensor(inverse, device=self.device)  # (B,) row -> its unique prompt
            cache.batch_select_indices(expand)  # every layer's K, V: (U, kv, P, hd) -> (B, kv, P, hd)
            logits, mask, positions = logits[expand], mask[expand], positions[expand]
        next_pos = positions[:, -1] + 1  # (B,)
        # the mask of every step is a prefix of this one buffer: prompt mask, then ones
        full_mask = torch.ones((B, P + cfg.max_new_tokens), dtype=torch.bool, device=self.device)
        full_mask[:, :P] = mask.bool()

        rows = list(range(B))  # batch row -> original prompt index (rows leave as they finish)
        done = [False] * B
        out_ids: list[list[int]] = [[] for _ in range(B)]
        out_lp: list[list[float]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        uniforms = None if cfg.temperature == 0 else torch.rand(  # drawn at once: one call, not one per step
            (cfg.max_new_tokens, B, 1), generator=generator, device=self.device, dtype=torch.float64)  # (T, B, 1)
        # the mask handed to the model at step t is a view of this buffer: (b, 1, 1, L) or (b, L)
        mask_buf = full_mask[:, None, None, :] if self._ready_mask else full_mask.long()
        for t in range(cfg.max_new_tokens):
            # log pi of the token we are about to pick, under the (raw) policy
            lp_logits = logits if cfg.logprob_temperature == 1.0 else logits / cfg.logprob_temperature
            logp = lp_logits.log_softmax(-1)  # (b, V)
            if t < cfg.min_new_tokens:
                logits = logits.index_fill(1, eos, float("-inf"))  # EOS not allowed yet
            # one uniform per *original* row and step: a row's samples do not depend on which other
            # rows are still in the batch (dropping finished rows changes no output)
            u = None if uniforms is None else uniforms[t]  # (b, 1); rows gathered again when rows leave
            tok = sample_next(logits, cfg, u)  # (b,)
            tok_lp = logp.gather(1, tok[:, None]).squeeze(1)  # (b,)

            finished_now = False
            for r, k, lp in zip(rows, tok.tolist(), tok_lp.tolist()):
                if done[r]:  # only when drop_finished=False: a finished row still in the batch
                    continue
                out_ids[r].append(k)
                out_lp[r].append(lp)
                reason = stop_rule(out_ids[r], eos_allowed=t >= cfg.min_new_tokens)
                if reason is not None:
                    reasons[r], done[r], finished_now = reason, True, True
            if all(done) or t == cfg.max_new_tokens - 1:
                break
            if finished_now and cfg.drop_finished:  # finished rows stop costing compute
                keep = [i for i, r in enumerate(rows) if not done[r]]
                keep_t = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_t)  # K, V: (b, kv, L, hd) -> (b', kv, L, hd)
                mask_buf, next_pos, tok = mask_buf[keep_t], next_pos[keep_t], tok[keep_t]
                if uniforms is not None:
                    uniforms = uniforms[:, keep_t]  # (T, b', 1): each row keeps its own draws
                rows = [rows[i] for i in keep]

            L = P + t + 1  # keys after this step: prompt + the t+1 tokens fed so far
            step_mask = mask_buf[..., :L]  # (b, 1, 1, L) or (b, L)
            attn = {"full_attention": step_mask} if self._ready_mask else step_mask
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        cache=cache, use_cache=True)
            logits = out.logits[:, -1].float()  # (b, V)
            next_pos = next_pos + 1
        texts = self.tokenizer.batch_decode(out_ids, skip_special_tokens=True)
        return [Generation(ids=out_ids[i], logprobs=out_lp[i], finish_reason=reasons[i], text=texts[i])
                for i in range(B)]

    def hf_generate_ids(self, prompts: list[list[int]], cfg: SamplingConfig) -> list[list[int]]:
        """HF `generate` on left-padded prompts; returns the raw new tokens per row (rows that ended
        early are padded by HF). Sampling uses torch's global RNG (HF takes no generator)."""
        ids, mask = self._left_pad(prompts)
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        gen_cfg = GenerationConfig(
            **(sampling if cfg.temperature > 0 else dict(do_sample=False)),
            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, stop_strings=list(cfg.stop) or None)
        with torch.inference_mode():
            seqs = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                       tokenizer=self.tokenizer if cfg.stop else None)  # (B, P + T)
        return seqs[:, ids.shape[1]:].tolist()

    def _generate_hf(self, prompts, cfg, generator) -> list[Generation]:
        """The oracle: HF `generate`, truncated post hoc by the same `_StopRule` as our decoder.

        our choice: log-probs come from one `score` pass after generation rather than from
        generate's per-step logits, which would hold (B, T, V) floats (40 GB for 128 rows x 512
        tokens x Qwen's 152k vocabulary).
        """
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if generator is not None:  # reproducible without touching the caller's global RNG
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
            raw = self.hf_generate_ids(prompts, cfg)
        stop_rule = _StopRule(self.tokenizer, self.eos_ids, cfg.stop)
        responses, reasons = [], []
        for row in raw:
            kept, reason = [], "length"
            for t, k in enumerate(row):
                kept.append(k)
                reason = stop_rule(kept, eos_allowed=t >= cfg.min_new_tokens) or "length"
                if reason != "length":
                    break
            responses.append(kept)
            reasons.append(reason)
        with torch.inference_mode():
            logps = self.score(prompts, responses, token_budget=16384, temperature=cfg.logprob_temperature)
        return [Generation(ids=r, logprobs=lp.tolist(), finish_reason=why,
                           text=self.tokenizer.decode(r, skip_special_tokens=True))
                for r, lp, why in zip(responses, logps, reasons)]

    # -- scoring --------------------------------------------------------------------------------
    def score(self, prompts: list[list[int]], responses: list[list[int]], token_budget: int,
              with_entropy: bool = False, reference: bool = False, temperature: float = 1.0,
              entropy_grad: bool = True):
        """Per-token log-probs log pi(y_t | x, y_<t) of each response under its prompt.

        Returns a list of 1-D tensors (one per row, length len(response)); with_entropy=True returns
        (logprobs, entropies), the entropy of the full next-token distribution at each position.
        Gradient flows when called under grad (the PPO update). reference=True scores with the LoRA
        adapter disabled (the base model = the KL reference policy) under no_grad.
        entropy_grad=False computes the entropy without grad: for logging, it then keeps no extra
        (b, R, V) tensor alive for the backward pass (log_softmax's own output is kept either way).

        Micro-batching: `pack_rows` (sorted by length, within `token_budget`, little padding).
        Layout (our choice): prompts left-padded and responses right-padded, so every response
        starts at the same column P and only the R response positions go through the LM head
        (logits (b, R, V), never (b, P + R, V)).
        """
        n = len(prompts)
        assert len(responses) == n and all(len(p) > 0 for p in prompts)
        logps: list = [None] * n
        ents: list = [None] * n
        ctx = contextlib.ExitStack()
        if reference:
            ctx.enter_context(torch.no_grad())
            ctx.enter_context(self.model.disable_adapter())
        with ctx:
            for batch in self.pack_rows([(len(p), len(r)) for p, r in zip(prompts, responses)], token_budget):
                self._score_batch(prompts, responses, batch, temperature, with_entropy, logps, ents, entropy_grad)
        return (logps, ents) if with_entropy else logps

    @staticmethod
    def pack_rows(lengths: list[tuple[int, int]], token_budget: int, max_pad: float = 0.125) -> list[list[int]]:
        """Micro-batches for `score`: lists of row indices, given each row's (prompt, response) token
        counts. A micro-batch becomes one (b, P + R) tensor (P, R: its longest prompt and response).

        Rows are sorted by (prompt, response) length, longest first, and cut greedily: a row starts
        a new micro-batch when adding it would make the tensor exceed `token_budget` tokens (a row
        alone may), or would make more than `max_pad` of it padding.
        our choice: sort and cut, not packing rows into one sequence with a block-diagonal mask:
        without varlen attention kernels (SDPA on CPU has none) a packed row attends over all of
        its tokens, quadratic in the packed length; and 1/8 because ALFWorld prompts grow with the
        history (300-700 tokens), so a mini-batch in one tensor was ~20-45 % padding
        (`bench.py loop`, "padding"), while smaller cuts only fragment GPU batches.
        """
        batches: list[list[int]] = []
        P = R = real = 0  # the open micro-batch: longest prompt / response, real tokens
        for k in sorted(range(len(lengths)), key=lambda k: lengths[k], reverse=True):
            p, r = lengths[k]
            if batches:
                rows, width = len(batches[-1]) + 1, P + max(R, r)  # prompts come sorted: P stays
                if rows * width <= token_budget and real + p + r >= (1 - max_pad) * rows * width:
                    batches[-1].append(k)
                    R, real = max(R, r), real + p + r
                    continue
            batches.append([k])
            P, R, real = p, r, p + r
        return batches

    def _score_batch(self, prompts, responses, batch, temperature, with_entropy, logps, ents, entropy_grad=True):
        """One micro-batch of `score`; writes into logps[i] / ents[i] for i in batch."""
        P = max(len(prompts[i]) for i in batch)
        R = max(len(responses[i]) for i in batch)
        if R == 0:
            for i in batch:
                logps[i] = ents[i] = torch.zeros(0, device=self.device)
            return
        ids = torch.full((len(batch), P + R), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), P + R), dtype=torch.long)
        for j, i in enumerate(batch):
            p, r = prompts[i], responses[i]
            ids[j, P - len(p):P + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask[j, P - len(p):P + len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)  # (b, P + R)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, P + R)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         logits_to_keep=R + 1)
        logits = out.logits[:, :-1].float()  # (b, R, V): column P-1+t predicts response token t
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = logits.log_softmax(-1)  # (b, R, V)
        tok_lp = logp_all.gather(-1, ids[:, P:, None]).squeeze(-1)  # (b, R)
        ent = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = -(logp_all.exp() * logp_all).sum(-1)  # (b, R)
        for j, i in enumerate(batch):
            n_r = len(responses[i])
            logps[i] = tok_lp[j, :n_r]
            if with_entropy:
                ents[i] = ent[j, :n_r]

    # -- saving ---------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Save the LoRA adapter (+ tokenizer). Load it back with plain peft:
        `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)`."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's own weights under their plain transformers names (no adapter, no
        peft prefixes): what `AutoModelForCausalLM.from_pretrained` expects."""
        plain = {}
        for k, v in self.model.state_dict().items():
            if "lora_" not in k:
                plain[k.removeprefix("base_model.model.").replace(".base_layer.", ".")] = v.detach().cpu()
        return plain

    def set_base_path(self, path: str) -> None:
        """Where the adapter's base model lives (adapter_config.json's base_model_name_or_path):
        an absolute local path, so a saved adapter loads with plain peft from any directory."""
        for config in self.model.peft_config.values():
            config.base_model_name_or_path = os.path.abspath(path)

    def save_base_weights(self, path: str) -> None:
        """Save the base model's own weights (siri.py's cold start trains them) in the transformers
        layout (config, safetensors, tokenizer) with a COMPLETE marker, written aside and renamed
        into place; from then on saved adapters name this folder as their base. Plain
        `AutoModelForCausalLM.from_pretrained(path)` loads it; `load_base_weights` puts it back."""
        tmp = f"{path}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.get_base_model().save_pretrained(tmp, state_dict=self.base_state_dict())
        self.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write("ok")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        self.set_base_path(path)

    def load_base_weights(self, path: str) -> None:
        """Load a folder written by `save_base_weights` into the base model (the adapter is untouched)."""
        saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(self.model.parameters()).dtype).state_dict()
        names = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): k
                 for k in self.model.state_dict() if "lora_" not in k}
        if set(saved) != set(names):
            raise ValueError(f"{path} does not match this model: {sorted(set(saved) ^ set(names))[:3]}")
        self.model.load_state_dict({names[k]: v for k, v in saved.items()}, strict=False)
        self.set_base_path(path)


# ---------------------------------------------------------------------------------------------
# 6. Group rollouts
# ---------------------------------------------------------------------------------------------
def rollout(policy: Policy, envs, task_ids: list[str], group_size: int, cfg: SamplingConfig,
            skill: dict[str, str] | None = None, seed: int = 0, desc: str = "rollout",
            stats: dict | None = None) -> list[Trajectory]:
    """Play len(task_ids) x group_size episodes together, each to its end (won or max_steps).

    Slots are group-contiguous: [t0, t0, .., t0, t1, ..] (G copies of each task, identical initial
    states), so a group's prompts coincide at the first step and share one prefill (within a wave:
    cfg.waves > 1 decodes the slots in parts, see `SamplingConfig.waves`).
    skill: task_type -> skill text put in the prompt (None = plain prompts). Then every Step also
    carries plain_prompt_ids, the same prompt without the skill (Phase 2 re-scores actions on it).
    stats: if given, accumulates wall seconds "reset_s" (env reset), "prompt_s" (build + tokenize),
    "generate_s", "env_s" (env steps), "merge_s" (folding the adapter into the weights, once per
    rollout: `Policy.merged_adapter`), and counts "steps" (agent decisions), "env_steps" (valid actions
    the env executed; invalid ones never reach it) and "tokens" (generated).
    """
    t_merge = time.perf_counter()
    with policy.merged_adapter(cfg.merge_adapter and cfg.engine == "custom"):
        t_merge = time.perf_counter() - t_merge
        return _rollout(policy, envs, task_ids, group_size, cfg, skill, seed, desc, stats, t_merge)


def _rollout(policy, envs, task_ids, group_size, cfg, skill, seed, desc, stats, merge_s) -> list[Trajectory]:
    """`rollout`'s body, run while the merged copy (if any) is open."""
    slot_tasks = [t for t in task_ids for _ in range(group_size)]
    n = len(slot_tasks)
    waves = rollout_waves(len(task_ids), group_size, cfg.waves)
    generators = [torch.Generator(device=policy.device).manual_seed(wave_seed(seed, w)) for w in range(len(waves))]
    overlap = len(waves) > 1 and cfg.overlap_env and getattr(getattr(envs, "cfg", None), "num_workers", 0) > 0
    timing = dict(reset_s=0.0, prompt_s=0.0, generate_s=0.0, env_s=0.0, merge_s=merge_s, steps=0, env_steps=0,
                  tokens=0)
    states: list = [None] * n  # a slot's EnvState once its reset is in
    skills: list[str | None] = [None] * n
    trajs: list = [None] * n
    history: list[list[tuple[str, str | None]]] = [[] for _ in range(n)]

    def start(part) -> None:  # wait for the reset of a part of the slots and open their Trajectories
        t0 = time.perf_counter()
        for i, s in envs.reset_end(part).items():
            states[i], skills[i] = s, (skill or {}).get(s.task_type)
            trajs[i] = Trajectory(task_id=s.task_id, task_type=s.task_type, group=f"{s.task_id}@seed{seed}",
                                  index=i % group_size, skill_id=mining.skill_id(s.task_type, skills[i]) if skills[i]
                                  else None, steps=[], won=False, task=s.task)
        timing["reset_s"] += time.perf_counter() - t0

    # With the overlap, every wave's games are loaded by a request of its own, so wave 0 decodes
    # while the workers still load the later waves' games; without, one reset of all the slots.
    t0 = time.perf_counter()
    resets = dict(enumerate(envs.reset_begin(slot_tasks, waves if overlap else [list(range(n))])))
    timing["reset_s"] += time.perf_counter() - t0
    if not overlap:
        start(resets.pop(0))
    pending: dict[int, tuple] = {}  # wave -> its env step in flight, and what its Steps need

    def finish(w: int) -> None:  # wait for wave w's env step and record its Steps
        t0 = time.perf_counter()
        handle, active, prompts, plain, gens, parsed = pending.pop(w)
        new_states = envs.step_end(handle)
        timing["env_s"] += time.perf_counter() - t0
        for i, p, pp, g, (action, valid) in zip(active, prompts, plain, gens, parsed):
            s, ns = states[i], new_states[i]
            trajs[i].steps.append(Step(
                prompt_ids=p, response_ids=g.ids, logprobs=g.logprobs, text=g.text, action=action,
                valid=valid, reward=ns.reward, done=ns.done, won=ns.won, anchor=s.anchor, obs=s.obs,
                plain_prompt_ids=pp))
            history[i].append((s.obs, action if valid else None))  # envs shows None as "(invalid)"
            states[i] = ns

    bar = tqdm(total=getattr(getattr(envs, "cfg", None), "max_steps", None), desc=desc, leave=False)
    try:
        while resets or pending or any(not s.done for s in states):
            decoded = False
            for w, slots in enumerate(waves):  # ping-pong: wave w decodes while wave w-1 steps
                if w in resets:
                    start(resets.pop(w))
                if w in pending:
                    finish(w)
                if not (active := [i for i in slots if not states[i].done]):
                    continue
                decoded = True
                t0 = time.perf_counter()
                prompts = [policy.chat_ids(envs.build_prompt(states[i], history[i], skills[i])) for i in active]
                plain = [policy.chat_ids(envs.build_prompt(states[i], history[i], None)) if skills[i] else None
                         for i in active]
                t1 = time.perf_counter()
                gens = policy.generate(prompts, cfg, generators[w])
                t2 = time.perf_counter()
                parsed = [envs.parse_action(g.text, states[i].admissible) for i, g in zip(active, gens)]
                handle = envs.step_begin({i: action if valid else None for i, (action, valid) in zip(active, parsed)})
                timing["env_s"] += time.perf_counter() - t2
                pending[w] = (handle, active, prompts, plain, gens, parsed)
                if not overlap:
                    finish(w)
                timing["prompt_s"] += t1 - t0
                timing["generate_s"] += t2 - t1
                timing["steps"] += len(active)
                timing["env_steps"] += sum(valid for _, valid in parsed)
                timing["tokens"] += sum(len(g.ids) for g in gens)
            bar.set_postfix(active=sum(not s.done for s in states))
            bar.update(int(decoded))  # the last pass of an overlapped rollout only collects
    finally:  # an error while a request is in flight: read its replies, so the workers' pipes stay in step
        for end, request in [*((envs.reset_end, r) for r in resets.values()),  # resets were sent first;
                             *((envs.step_end, p[0]) for p in pending.values())]:  # steps in the order begun
            with contextlib.suppress(Exception):
                end(request)
        bar.close()
    for traj, s in zip(trajs, states):
        traj.won = s.won
        traj.score = getattr(s, "score", None)  # WebShop's final reward; ALFWorld states have none
    if stats is not None:
        for k, v in timing.items():
            stats[k] = stats.get(k, 0) + v
    return trajs


def rollout_waves(n_tasks: int, group_size: int, waves: int) -> list[list[int]]:
    """The slots of `rollout` cut into up to `waves` consecutive parts of about equal size, at
    task-group boundaries where there are at least as many tasks as waves (a group's G copies
    then share one prefill), else inside the groups."""
    n = n_tasks * group_size
    unit = group_size if n_tasks >= waves else 1
    k = min(waves, n // unit) or 1
    cuts = [round(j * (n // unit) / k) * unit for j in range(k + 1)]
    return [list(range(a, b)) for a, b in zip(cuts, cuts[1:]) if b > a]


def wave_seed(seed: int, wave: int) -> int:
    """Seed of wave `wave`'s random stream: the rollout's seed for wave 0 (one wave samples exactly
    as before waves existed), others spread by the 64-bit golden ratio."""
    return seed if wave == 0 else (seed + wave * 0x9E3779B97F4A7C15) % 2**63
