"""The decoder and scorer: `Policy`, a KV-cached batched sampler and per-token log-probs.

1. `SamplingConfig`     how to sample (every default defined here, once)
2. decoding helpers     `sample_next`, `ActionConstraint` (actions kept admissible), the stop rule,
                        a preallocated KV cache, `merged_copy`
3. `Policy.generate`    our KV-cached decoder (default; it samples from a copy with the LoRA adapter
                        merged into the weights, `merged_copy`) or HF `generate` (the oracle)
4. `Policy.score`       per-token log-probs (+ entropy) of responses, with or without grad, in
                        length-sorted micro-batches (`Policy.pack_rows`); it and the sampler's
                        prefill run the last layer only where it is read (`hidden_at`)

`model.load_policy` builds a Policy; `agent.rollout` plays episodes with one.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
from dataclasses import dataclass

import torch

# peft imports bitsandbytes, which on some CPU-only machines logs a warning about an optional
# CPU kernel we never use (QLoRA runs on CUDA only here). Silence that one logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import peft  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Cache,
    DynamicCache,
    GenerationConfig,
)
from transformers.cache_utils import CacheLayerMixin  # noqa: E402

from core import atomic_dir, atomic_write  # noqa: E402


# ---------------------------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------------------------
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
    """`agent.rollout` decodes its slots in this many waves of whole task groups (cut inside the groups
    when there are fewer tasks than waves), one after another;
    with env workers (env.num_workers > 0) the env step of one wave runs while the next wave
    decodes (ping-pong), and at the start the later waves' games load while wave 0 decodes, so
    decoding and environments stop waiting for each other. Results
    depend on the number of waves (each wave samples from its own random stream), never on
    whether the overlap happens (tested). our choice: 1, see `python bench.py rollout`: on a
    CPU whose cores all decode, two half batches cost more decoding than the overlap saves"""
    constrain_actions: bool = False
    """custom engine: once a response's text holds the opening tag of its action ("<action"), every
    further token must keep the text a prefix of "<action>A</action>" for some admissible action A
    (`ActionConstraint`): the policy is the model's distribution renormalised over those tokens, at
    sampling and in every scoring pass (`Generation.allowed`, `Policy.score(allowed=...)`), so PPO's
    ratios and the KL stay those of one policy. Text before the tag (the thinking) is free.
    our choice: off for instruct models, which copy an admissible action; on in the cpu preset,
    where half the tiny model's actions named a receptacle the room does not have, so no episode
    got far enough for a skill to matter (measured, README)"""
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


@dataclass
class Generation:
    """One sampled response (`Policy.generate`)."""
    ids: list[int]          # response token ids (the EOS token is kept when the row ended on it)
    logprobs: list[float]   # log pi(token | context) of each sampled token, at `logprob_temperature`
    text: str               # decoded response, special tokens removed
    finish_reason: str      # "eos" | "stop" (a stop string) | "length" (max_new_tokens)
    # with an ActionConstraint: per response token, the token ids it was sampled among (None where
    # the token was free); None when the row had no constraint. Scoring renormalises over them.
    allowed: list[list[int] | None] | None = None


# ---------------------------------------------------------------------------------------------
# 2. Decoding helpers
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


class ActionConstraint:
    """Which tokens may come next in a response whose action must be one of a list (the
    `SamplingConfig.constrain_actions` rule), for one tokenizer.

    A response is free until its text holds `OPEN`; from there on its text must stay a prefix of
    "<action>A</action>" for one of the row's actions A. `allowed` gives the ids of the tokens whose
    text extends the response's text (from `OPEN` on) along some such string: the strings are
    matched character by character against every token's text, so any tokenization of an action
    is allowed, and a tokenizer that merges a tag into the next word (the tiny one has ">go") needs
    nothing special. A token that holds `OPEN` and runs on past it is sampled free (none of our
    tokenizers has one; the env's answer rule then judges the action as usual).
    """

    OPEN = "<action"
    FORMAT = "<action>{}</action>"

    def __init__(self, tokenizer):
        self.piece: list[str] = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.by_text: dict[str, list[int]] = {}
        for i, p in enumerate(self.piece):
            if p and "\ufffd" not in p:  # a token holding part of a multi-byte character: never allowed
                self.by_text.setdefault(p, []).append(i)
        self.longest = max(map(len, self.by_text))

    def allowed(self, targets: tuple[str, ...], text: str, cache: dict) -> list[int] | None:
        """Sorted ids of the tokens t with text + piece(t) a prefix of one of `targets` (the
        "<action>A</action>" strings); None when no target extends `text` (the row then samples
        free: it has left the rule, e.g. by a token that ran past `OPEN`). `cache` is shared by the
        rows of one generate call (a group's G rows ask the same questions)."""
        key = (targets, text)
        if key not in cache:
            ids: set[int] = set()
            for target in targets:
                if len(target) > len(text) and target.startswith(text):
                    rest = target[len(text):]
                    for k in range(1, min(len(rest), self.longest) + 1):
                        ids.update(self.by_text.get(rest[:k], ()))
            cache[key] = sorted(ids) or None
        return cache[key]


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

    def write_rows(self, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: int, length: int) -> None:
        """Prefill by parts (`Policy._prefill_causal`): write one part's keys and values
        (b, kv, m, hd) into batch rows `rows` at positions 0..m-1 of a cache of `batch` rows that
        holds `length` positions once every part is in. Positions no part writes stay zero (they are
        padding, masked out; zero, not garbage, because a masked NaN would still poison attention)."""
        if not self.is_initialized:
            self.k_buf = keys.new_empty((batch, keys.shape[1], self.max_len, keys.shape[-1]))
            self.v_buf = values.new_empty((batch, values.shape[1], self.max_len, values.shape[-1]))
            self.k_buf[:, :, :length] = 0
            self.v_buf[:, :, :length] = 0
            self.is_initialized = True
        m = keys.shape[-2]
        self.k_buf[rows, :, :m] = keys
        self.v_buf[rows, :, :m] = values
        self.length = length
        self.keys, self.values = self.k_buf[:, :, :length], self.v_buf[:, :, :length]

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


def transformers_model(model) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers included), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """name -> LoRA wrapper module of a peft model's inner transformers model ({} if none)."""
    if not isinstance(model, peft.PeftModel):
        return {}
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


def _renormalise(logp_all: torch.Tensor, tok_lp: torch.Tensor, ent: torch.Tensor | None,
                 allowed: list, entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`Policy.score`'s correction for constrained positions: with A the tokens a position was
    sampled among, log pi_A(y) = log pi(y) - log sum_{a in A} pi(a), and the entropy is pi_A's.
    logp_all (b, R, V), tok_lp and ent (b, R); allowed: per row of the batch, None or per
    position None / a list of ids. Returns new tensors (autograd-safe)."""
    where = [(j, t, a) for j, row in enumerate(allowed) if row for t, a in enumerate(row) if a is not None]
    if not where:
        return tok_lp, ent
    dev = logp_all.device
    K = max(len(a) for _, _, a in where)
    rows = torch.tensor([j for j, _, _ in where], device=dev)[:, None]  # (N, 1)
    cols = torch.tensor([t for _, t, _ in where], device=dev)[:, None]  # (N, 1)
    ids = torch.tensor([a + [a[0]] * (K - len(a)) for _, _, a in where], device=dev)  # (N, K), padded
    real = torch.tensor([[k < len(a) for k in range(K)] for _, _, a in where], device=dev)  # (N, K)
    sub = logp_all[rows, cols, ids].masked_fill(~real, float("-inf"))  # (N, K) log pi of A's tokens
    norm = sub.logsumexp(-1)  # (N,) log pi(A)
    r, c = rows[:, 0], cols[:, 0]
    tok_lp = tok_lp.index_put((r, c), tok_lp[r, c] - norm)
    if ent is not None:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            q = (sub - norm[:, None]).masked_fill(~real, 0.0)  # (N, K) log pi_A (0 on the padding)
            h = -(q.exp().masked_fill(~real, 0.0) * q).sum(-1)  # (N,); no 0 * -inf, whose gradient is nan
            ent = ent.index_put((r, c), h)
    return tok_lp, ent


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as Llama/Qwen apply it: x (b, heads, n, hd), cos/sin (b, n, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def hidden_at(lm, ids: torch.Tensor, cols: torch.Tensor, cache: Cache | None = None,
              trim: bool = True) -> torch.Tensor:
    """The final (normed) hidden states of right-padded rows `ids` (b, L), positions 0..L-1 and
    causal attention with no mask (SDPA ``is_causal``), at columns `cols` (b, R): (b, R, H).
    With `cache`, every layer's keys and values of all L positions are written into it (a prefill).

    trim=True (our choice): the last layer runs only where its output is read. A position's last
    layer output feeds nothing but its own logits, so the last layer needs the keys and values of
    all L positions (what the R reading positions attend to) but its query, attention, output
    projection and MLP at the R positions only: the same numbers as the full pass up to float
    rounding (tested), for (L - R) / L of one layer's work less. Scoring reads R ~ 30 response
    positions of 300-1000-token rows, and the sampler's prefill reads one position per prompt, so
    on the 2-layer tiny model this is ~45 % of the pass (and of its backward), on a 28-layer
    Qwen2.5-1.5B ~3 %. trim=False: the decoder's own forward over every position, then the gather.
    Layers are Llama/Qwen-shaped (`CAUSAL_LAYOUT_TYPES`: input_layernorm, self_attn with
    q/k/v/o_proj and optional q_norm/k_norm, post_attention_layernorm, mlp) under SDPA, full
    attention, on one device (the layers are called directly: hooks a dispatcher puts on the
    decoder-layer modules, e.g. accelerate's offload, would be skipped for the last one)."""
    dec, text = lm.get_decoder(), lm.config.get_text_config(decoder=True)
    b, L = ids.shape
    assert cache is None or cache.get_seq_length() == 0, "hidden_at prefills an empty cache (positions start at 0)"
    at = cols[:, :, None].expand(-1, -1, text.hidden_size)  # (b, R, H)
    if not trim:
        hidden = dec(input_ids=ids, cache=cache, use_cache=cache is not None).last_hidden_state  # (b, L, H)
        return hidden.gather(1, at)
    *trunk, last = dec.layers[:text.num_hidden_layers]
    hidden = dec.embed_tokens(ids)  # (b, L, H)
    positions = torch.arange(L, device=ids.device)[None].expand(b, L)  # (b, L)
    cos, sin = dec.rotary_emb(hidden, positions)  # (b, L, hd) each
    for layer in trunk:  # no mask: SDPA attends causally
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin),
                       cache=cache, use_cache=cache is not None)
    attn = last.self_attn
    x = last.input_layernorm(hidden)  # (b, L, H)
    hd, R = attn.head_dim, cols.shape[1]
    k = attn.k_proj(x).view(b, L, -1, hd)  # (b, L, kv, hd)
    q = attn.q_proj(x.gather(1, at)).view(b, R, -1, hd)  # (b, R, heads, hd): the reading positions only
    if hasattr(attn, "k_norm"):  # Qwen3: RMSNorm over each head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    k = _rotate(k.transpose(1, 2), cos, sin)  # (b, kv, L, hd)
    at_hd = cols[:, :, None].expand(-1, -1, hd)  # (b, R, hd)
    q = _rotate(q.transpose(1, 2), cos.gather(1, at_hd), sin.gather(1, at_hd))  # (b, heads, R, hd)
    v = attn.v_proj(x).view(b, L, -1, hd).transpose(1, 2)  # (b, kv, L, hd)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    sees = torch.arange(L, device=ids.device)[None, None, :] <= cols[:, :, None]  # (b, R, L) causal
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=sees[:, None], dropout_p=attn.attention_dropout if attn.training else 0.0,
        scale=attn.scaling, enable_gqa=True)  # (b, heads, R, hd)
    hidden = hidden.gather(1, at) + attn.o_proj(out.transpose(1, 2).reshape(b, R, -1))  # (b, R, H)
    hidden = hidden + last.mlp(last.post_attention_layernorm(hidden))
    return dec.norm(hidden)


# ---------------------------------------------------------------------------------------------
# 3-4. The policy: decoding and scoring
# ---------------------------------------------------------------------------------------------
CAUSAL_LAYOUT_TYPES = frozenset({"qwen2", "qwen3", "llama", "mistral"})
"""Model types `Policy._score_batch` scores, and `Policy._prefill_causal` prefills, through the decoder +
LM head directly, with the last layer trimmed by `hidden_at` (checked against the model's own forward
in tests/test_policy.py: the layouts for qwen2, the trim for all four); every other type takes the
model's forward."""


class Policy:
    """A causal LM (normally a `peft.PeftModel` with one LoRA adapter) + its tokenizer."""

    def __init__(self, model, tokenizer, device: torch.device | str | None = None,
                 cfg=None):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg  # the model.ModelConfig it was loaded with (None if built by hand)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        lm = transformers_model(model)
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
        # padding mask, and it skips transformers' per-step mask construction (measured by bench.py):
        # a 4D mask is taken as it is by every model type's mask functions.
        # (Mistral has no layer_types: a sliding_window set makes every layer a sliding one)
        layer_types = getattr(lm.config, "layer_types", None) or [
            "sliding_attention" if getattr(lm.config, "sliding_window", None) else "full_attention"]
        self._full_attention = all(t == "full_attention" for t in layer_types)
        self._ready_mask = lm.config._attn_implementation == "sdpa" and self._full_attention
        # the right-padded, mask-free layout of `_score_batch` and `_prefill_causal` (read by gigpo's
        # padding count, switched by bench.py score): for model types whose logits are exactly
        # lm_head(last hidden state) and whose positions are 0..n-1 (others scale the logits after
        # the head, e.g. Cohere, Granite, or build positions of their own, e.g. multimodal Qwen)
        self.causal_layout: bool = self._full_attention and lm.config.model_type in CAUSAL_LAYOUT_TYPES
        # `hidden_at`'s trim (the last layer only where it is read) in that layout, under SDPA: its
        # mask-free layers rely on SDPA's causal attention (switched off by bench.py to compare)
        self.trim_last_layer: bool = self.causal_layout and lm.config._attn_implementation == "sdpa"
        self._merged: torch.nn.Module | None = None  # the merged copy while `merged_adapter` is open
        self._action_constraint: ActionConstraint | None = None  # built on first use, `action_constraint`

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

    def _right_pad(self, rows: list[list[int]], width: int) -> torch.Tensor:
        """Right-pad token lists into input ids (B, width) on the policy's device."""
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids.to(self.device)

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
        nothing to merge. `agent.rollout` opens it once for all the steps of a rollout; `generate` opens
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
                 generator: torch.Generator | None = None,
                 actions: list[list[str] | None] | None = None) -> list[Generation]:
        """Sample one response per prompt (token-id lists). Runs the model in eval mode.

        generator: a torch.Generator on `self.device` for reproducible sampling (None = global RNG).
        actions: with cfg.constrain_actions, each prompt's admissible actions (None = free), which
        its action must be one of (`ActionConstraint`); ignored otherwise.
        """
        if not prompts:
            return []
        if not cfg.constrain_actions:
            actions = None
        elif cfg.engine != "custom":
            raise ValueError("rollout.constrain_actions needs rollout.engine=custom (HF generate has no such rule here)")
        was_training = self.model.training
        self.model.eval()
        try:
            if cfg.engine == "custom":
                with self.merged_adapter(cfg.merge_adapter):
                    return self._generate_custom(prompts, cfg, generator, actions)
            if cfg.engine == "hf":
                return self._generate_hf(prompts, cfg, generator)
            raise ValueError(f"sampling.engine must be 'custom' or 'hf', got {cfg.engine!r}")
        finally:
            self.model.train(was_training)

    @torch.inference_mode()
    def _generate_custom(self, prompts, cfg, generator, actions=None) -> list[Generation]:
        """Our decoder: a prefill of the distinct prompts (`_prefill_causal`, else `_prefill_padded`),
        then one token per step reusing the KV cache; finished rows leave the batch. actions: see
        `generate`."""
        B = len(prompts)
        rule = self.action_constraint() if actions is not None else None
        targets = [tuple(ActionConstraint.FORMAT.format(a) for a in acts) if acts else None
                   for acts in (actions or [None] * B)]
        texts_so_far = [""] * B  # a row's response text so far, and where OPEN starts in it:
        opened = [0 if ActionConstraint.OPEN == "" else None] * B  # (the empty text holds an empty OPEN)
        out_allowed: list[list] = [[] for _ in range(B)]
        rule_cache: dict = {}
        model = self.decoder(cfg)  # the merged copy, or the LoRA-wrapped model
        stop_rule = _StopRule(self.tokenizer, self.eos_ids, cfg.stop)
        eos = torch.tensor(self.eos_ids, device=self.device)

        # Prefill. Shared prefix: a group of G rollouts of one task has G identical prompts; prefill
        # each distinct prompt once, then copy its KV cache rows G times.
        uniq, inverse = _dedupe(prompts) if cfg.share_prefix else (prompts, list(range(B)))
        P = max(len(p) for p in uniq)
        cache = self.new_cache(P + cfg.max_new_tokens, cfg.kv_cache)
        causal = self.causal_layout and cfg.kv_cache == "preallocated"
        prefill = self._prefill_causal if causal else self._prefill_padded
        logits, mask, next_pos = prefill(model, uniq, cache)  # (U, V), (U, P), (U,)
        if len(uniq) < B:
            expand = torch.tensor(inverse, device=self.device)  # (B,) row -> its unique prompt
            cache.batch_select_indices(expand)  # every layer's K, V: (U, kv, P, hd) -> (B, kv, P, hd)
            logits, mask, next_pos = logits[expand], mask[expand], next_pos[expand]
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
            step_allowed = [None] * len(rows)
            if rule is not None:  # rows inside their <action> block: only tokens that stay admissible
                step_allowed = [rule.allowed(targets[r], texts_so_far[r][opened[r]:], rule_cache)
                                if targets[r] and opened[r] is not None else None for r in rows]
                if any(a is not None for a in step_allowed):
                    keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)  # (b, V)
                    for j, a in enumerate(step_allowed):
                        keep[j, a if a is not None else slice(None)] = True
                    logits = logits.masked_fill(~keep, float("-inf"))
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
            for r, k, lp, a in zip(rows, tok.tolist(), tok_lp.tolist(), step_allowed):
                if done[r]:  # only when drop_finished=False: a finished row still in the batch
                    continue
                out_ids[r].append(k)
                out_lp[r].append(lp)
                if rule is not None:
                    out_allowed[r].append(a)
                    start = max(0, len(texts_so_far[r]) - len(ActionConstraint.OPEN) + 1)  # OPEN may end in this token
                    texts_so_far[r] += rule.piece[k]
                    if opened[r] is None and (j := texts_so_far[r].find(ActionConstraint.OPEN, start)) >= 0:
                        opened[r] = j
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
            out = model(input_ids=tok[:, None], attention_mask=step_mask, position_ids=next_pos[:, None],
                        cache=cache, use_cache=True)
            logits = out.logits[:, -1].float()  # (b, V)
            next_pos = next_pos + 1
        texts = self.tokenizer.batch_decode(out_ids, skip_special_tokens=True)
        return [Generation(ids=out_ids[i], logprobs=out_lp[i], finish_reason=reasons[i], text=texts[i],
                           allowed=out_allowed[i] if targets[i] else None) for i in range(B)]

    def _prefill_padded(self, model, prompts, cache):
        """Prefill as HF does: one left-padded batch with its padding mask. Returns the next-token
        logits (U, V), the mask (U, P) and each row's next position (U,)."""
        ids, mask = self._left_pad(prompts)  # (U, P)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (U, P) position 0 = first real token
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), mask, positions[:, -1] + 1

    def _prefill_causal(self, model, prompts, cache):
        """`_prefill_padded`'s result from length-sorted parts, each right-padded and run with no mask.

        our choice: the prompts of a rollout step differ in length (history, room size: 250-1050
        tokens in `bench.py loop`'s rollout), so one left-padded batch was 40-63 % padding, and its mask makes SDPA
        attend over the whole square. Here the prompts are cut into parts with at most 1/8 padding
        (`pack_rows`), each part runs right-padded with no mask (SDPA ``is_causal``: a real token
        never sees the pads after it, as in `_score_batch`), and its keys and values are copied into
        the rows of the step's cache. Each row's cache then holds its tokens at positions 0..n-1
        and (masked) pads up to P, and its last real token's hidden state (the last layer runs at
        that token only, `hidden_at`) gives its next-token logits. Same logits and cache as the
        padded prefill to float rounding (tested); `python bench.py score` times both (`ratio
        prefill`, and `ratio prefill trim`). Only for `causal_layout` models and our preallocated
        cache."""
        lm = transformers_model(model)
        lengths = [len(p) for p in prompts]
        U, P = len(prompts), max(lengths)
        n = torch.tensor(lengths, device=self.device)  # (U,)
        mask = (torch.arange(P, device=self.device)[None, :] < n[:, None]).long()  # (U, P) real tokens first
        logits = None
        for part in self.pack_rows([(k, 0) for k in lengths], token_budget=sys.maxsize, max_pad=0.125):
            width = max(lengths[i] for i in part)
            ids = self._right_pad([prompts[i] for i in part], width)
            part_cache = self.new_cache(width)
            last = torch.tensor([[lengths[i] - 1] for i in part], device=self.device)  # (b, 1)
            picked = hidden_at(lm, ids, last, part_cache, self.trim_last_layer)[:, 0]  # (b, H)
            part_logits = lm.get_output_embeddings()(picked).float()  # (b, V)
            if logits is None:
                logits = part_logits.new_empty((U, part_logits.shape[-1]))
            rows = torch.tensor(part, device=self.device)
            logits[rows] = part_logits
            for layer, part_layer in zip(cache.layers, part_cache.layers):
                layer.write_rows(rows, part_layer.keys, part_layer.values, batch=U, length=P)
        return logits, mask, n

    def action_constraint(self) -> ActionConstraint:
        """The tokenizer's `ActionConstraint`, built on first use (one decode per vocabulary entry)."""
        if self._action_constraint is None:
            self._action_constraint = ActionConstraint(self.tokenizer)
        return self._action_constraint

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
              entropy_grad: bool = True, allowed: list | None = None):
        """Per-token log-probs log pi(y_t | x, y_<t) of each response under its prompt.

        Returns a list of 1-D tensors (one per row, length len(response)); with_entropy=True returns
        (logprobs, entropies), the entropy of the full next-token distribution at each position.
        Gradient flows when called under grad (the PPO update). reference=True scores with the LoRA
        adapter disabled (the base model = the KL reference policy) under no_grad.
        entropy_grad=False computes the entropy without grad: for logging, it then keeps no extra
        (b, R, V) tensor alive for the backward pass (log_softmax's own output is kept either way).
        allowed: per row, its `Generation.allowed` (or None): where a token was sampled among some
        tokens only (`SamplingConfig.constrain_actions`), its log-prob and the entropy are those of
        the distribution renormalised over them, the policy that sampled it.

        Micro-batching: `pack_rows` (sorted by length, within `token_budget`, little padding).
        Layout: `_score_batch` (rows right-padded, causal attention without a mask; only the
        positions that predict response tokens go through the LM head).
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
                self._score_batch(prompts, responses, batch, temperature, with_entropy, logps, ents, entropy_grad,
                                  allowed)
        return (logps, ents) if with_entropy else logps

    @staticmethod
    def pack_rows(lengths: list[tuple[int, int]], token_budget: int, max_pad: float = 0.125) -> list[list[int]]:
        """Micro-batches for `score`: lists of row indices, given each row's (prompt, response) token
        counts. A micro-batch becomes one tensor at most (b, P + R) wide (P, R: its longest prompt
        and response; `_score_batch`'s right-padded rows need only the longest prompt + response).

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

    def _score_batch(self, prompts, responses, batch, temperature, with_entropy, logps, ents, entropy_grad=True,
                     allowed=None):
        """One micro-batch of `score`; writes into logps[i] / ents[i] for i in batch.

        Layout (our choice): each row is its prompt and response back to back, right-padded, and
        no attention mask is passed, so SDPA runs with ``is_causal`` (a pad key sits after every
        real token: causality already hides it), which attends over the lower triangle only and
        builds no (b, 1, L, L) mask: measured on the tiny model, the pass with its backward is
        1.10-1.14x faster than a left-padded batch with its mask (`python bench.py score`).
        Only the R positions that predict a response
        token go through the LM head, gathered per row (logits (b, R, V), never (b, L, V)).
        Model types outside `CAUSAL_LAYOUT_TYPES` (logits scaled after the head, positions of their
        own) and models with sliding-window layers take the left-padded path, `_score_batch_padded`."""
        R = max(len(responses[i]) for i in batch)
        if R == 0:
            for i in batch:
                logps[i] = ents[i] = torch.zeros(0, device=self.device)
            return
        if not self.causal_layout:
            return self._score_batch_padded(prompts, responses, batch, temperature, with_entropy, logps, ents,
                                            entropy_grad, allowed)
        lm = transformers_model(self.model)
        L = max(len(prompts[i]) + len(responses[i]) for i in batch)
        ids = self._right_pad([prompts[i] + responses[i] for i in batch], L + 1)  # one pad column: see `cols`
        starts = torch.tensor([len(prompts[i]) for i in batch])  # (b,) column of each row's first response token
        # column starts[j] - 1 + t predicts response token t; past a row's end it reads pads (dropped below)
        cols = (starts[:, None] - 1 + torch.arange(R)[None, :]).clamp(max=L - 1).to(self.device)  # (b, R)
        picked = hidden_at(lm, ids[:, :L], cols, trim=self.trim_last_layer)  # (b, R, H)
        logits = lm.get_output_embeddings()(picked).float()  # (b, R, V)
        targets = ids.gather(1, cols + 1)  # (b, R): the token each column predicts
        self._score_tail(logits, targets, responses, batch, temperature, with_entropy, logps, ents, entropy_grad,
                         allowed)

    def _score_batch_padded(self, prompts, responses, batch, temperature, with_entropy, logps, ents,
                            entropy_grad=True, allowed=None):
        """`_score_batch` for models that need the model's own forward: prompts left-padded and
        responses right-padded, so every response starts at the same column P, with the padding
        mask, and ``logits_to_keep`` passes only the R response positions through the LM head
        (`_score_batch` has handled a batch of empty responses)."""
        P = max(len(prompts[i]) for i in batch)
        R = max(len(responses[i]) for i in batch)
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
        self._score_tail(logits, ids[:, P:], responses, batch, temperature, with_entropy, logps, ents,
                         entropy_grad, allowed)

    def _score_tail(self, logits, targets, responses, batch, temperature, with_entropy, logps, ents,
                    entropy_grad, allowed):
        """From the logits (b, R, V) of the positions that predict each row's response tokens
        `targets` (b, R): log-probs and entropies, renormalised where actions were constrained."""
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = logits.log_softmax(-1)  # (b, R, V)
        tok_lp = logp_all.gather(-1, targets[:, :, None]).squeeze(-1)  # (b, R)
        ent = None
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent = -(logp_all.exp() * logp_all).sum(-1)  # (b, R)
        if allowed is not None:
            tok_lp, ent = _renormalise(logp_all, tok_lp, ent, [allowed[i] for i in batch], entropy_grad)
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
        with atomic_dir(path) as tmp:
            self.model.get_base_model().save_pretrained(tmp, state_dict=self.base_state_dict())
            self.tokenizer.save_pretrained(tmp)
            atomic_write(os.path.join(tmp, "COMPLETE"), "ok")
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


