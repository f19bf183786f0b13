"""The model: its config, the tiny model the project builds offline, and `load_policy`.

1. `ModelConfig`        which model, dtype, LoRA / QLoRA settings (every default defined here, once)
2. tiny model           `build_tiny_model`: a random Qwen2 + a BPE tokenizer trained on env text, offline
3. `load_policy`        hub id / local path / "tiny" -> a `decoder.Policy` (LoRA via peft, QLoRA on CUDA)

The KL reference policy of GiGPO/SIRI is the same model with the LoRA adapter disabled
(`Policy.score(..., reference=True)`), so no second copy of the weights is kept in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from decoder import Policy, peft  # decoder imports peft once, with its bitsandbytes logger quietened
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)


# ---------------------------------------------------------------------------------------------
# 1. Config
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
    tiny_number_tokens: bool = True
    """tiny model: " 0" .. " 99" are tokens of their own (`TINY_NUMBER_TOKENS`); false = Qwen2's
    split alone (" " + "3"), as before them (the learning test and the skill controls keep it)"""

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if min(self.lora_r, self.lora_alpha, self.tiny_layers, self.tiny_hidden, self.tiny_heads,
               self.tiny_kv_heads, self.tiny_vocab) < 1 or not 0 <= self.lora_dropout < 1:
            raise ValueError("model.lora_r, lora_alpha and the tiny_* sizes must be >= 1, lora_dropout in [0, 1)")
        if self.tiny_hidden % self.tiny_heads or self.tiny_heads % self.tiny_kv_heads:
            raise ValueError(f"model.tiny_hidden ({self.tiny_hidden}) must divide by tiny_heads ({self.tiny_heads}) "
                             f"and tiny_heads by tiny_kv_heads ({self.tiny_kv_heads})")


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
# Whole numbers with their leading space, " 0" .. " 99", are tokens of their own (added tokens, so a
# saved model's Qwen2Tokenizer keeps them). Our choice, because the tiny model must copy "cabinet 3"
# from the admissible actions: with Qwen2's split, " 3" is " " + "3", the digit sits two tokens after
# its name, and the 2-layer model copied instance numbers poorly; measured on the preset's cold start
# (one seed, 120 eval games, eval success / invalid actions): 0.008 / 0.62 before, 0.033 / 0.62 with
# whole numbers, 0.067 / 0.42 with whole numbers and `coldstart.rename` (README). Qwen2.5 itself splits
# digits; an instruct model copies them anyway.
TINY_NUMBER_TOKENS = [f" {i}" for i in range(100)]


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


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 3000, number_tokens: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` (milliseconds) with Qwen2's pre-tokenization and
    wrap it like a Qwen tokenizer: Qwen chat template, eos = <|im_end|>, pad = <|endoftext|>; plus
    whole-number tokens (`TINY_NUMBER_TOKENS`) unless number_tokens=False.
    Byte-level means any text encodes; the vocabulary is smaller than vocab_size when the corpus
    has fewer distinct word pieces to merge."""
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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text
    )
    if number_tokens:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in TINY_NUMBER_TOKENS])
    return tokenizer


def make_tiny_model(corpus: list[str], layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                    vocab_size: int = 3000, seed: int = 0,
                    number_tokens: bool = True) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A random-weight Qwen2 causal LM (fp32, seeded) and its tokenizer trained on `corpus`."""
    tokenizer = build_tiny_tokenizer(corpus, vocab_size, number_tokens)
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
                     kv_heads: int = 2, vocab_size: int = 3000, seed: int = 0, number_tokens: bool = True) -> str:
    """Make the tiny model (`make_tiny_model`), save model + tokenizer to `out_dir`, return it.

    The directory then loads exactly like a downloaded hub model (`load_policy` with name=out_dir).
    """
    model, tokenizer = make_tiny_model(corpus, layers, hidden, heads, kv_heads, vocab_size, seed, number_tokens)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _tiny_model_dir(cfg: ModelConfig, corpus) -> str:
    """Build (once) and return the cached tiny model for this corpus + tiny config."""
    corpus = corpus() if callable(corpus) else corpus
    corpus = default_tiny_corpus() if corpus is None else list(corpus)
    spec = dict(layers=cfg.tiny_layers, hidden=cfg.tiny_hidden, heads=cfg.tiny_heads,
                kv_heads=cfg.tiny_kv_heads, vocab_size=cfg.tiny_vocab, seed=cfg.tiny_seed,
                number_tokens=cfg.tiny_number_tokens)
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


