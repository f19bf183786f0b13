"""Benchmarks.

  python bench.py decode    our KV-cached decoder against HF `generate` (below)
  python bench.py rollout   the environment's share of rollout wall time (`cmd_rollout`)
  python bench.py loop      one Phase 0 iteration, our engine against the same iteration written by
                            hand with HF, then a scaling table of ours (`cmd_loop`)
  python bench.py score     `Policy.score` + backward, right-padded causal (ours) against left-padded
                            with a mask (`cmd_score`)
  python bench.py device    decode + loop + a QLoRA update on one model, with a summary: what
                            `cuda_bench.sh` runs on a GPU (`cmd_device`); also `make-model`, `qlora`

decode: both engines run the same tiny Qwen2 (2 layers, 128 wide, fp32, built on the fly in a temp
dir; --shape/--dtype/--device for others) on the same prompts, at temperature 1 (rollout sampling),
as three models: "base" (the model alone), "lora" (wrapped in a LoRA adapter, sampled wrapped) and
"lora_merged" (our decoder samples the adapter merged into the weights, `Policy.merged_adapter`;
HF `generate` still runs the wrapped model, as a user would). Workloads:

  a  16 distinct ~600-token prompts, exactly 64 new tokens (EOS blocked via min_new_tokens)
  b  GiGPO-shaped: 2 tasks x G = 8 rollouts, the G rollouts of a task share its prompt
  c  rows that finish at different steps (extra EOS ids: each row stops with probability ~1/24 per
     step): our decoder with and without dropping finished rows from the batch / KV cache

Reported per engine (best of --repeats runs, engines interleaved; see `best_times`; by default on
the process's CPU clock, see --clock):
prefill time (call -> end of the prompt's forward, found with a forward hook on the model),
decode-phase tokens/s (B x (N-1) tokens / time after the prefill), end-to-end tokens/s (B x N /
total time). "raw forward" is the prefill plus N-1 single-token forwards through our decoder's KV
cache (`Policy.new_cache`, preallocated) with no sampling or bookkeeping: the limit a decoder can
approach. Our decoder passes a ready (B, 1, 1, L) boolean mask to its decode steps (see
`Policy.__init__`); "raw forward, 2D mask" is the same loop with the 2D padding mask that HF
`generate` passes, which transformers turns into a 4D mask at every step; "raw fwd, DynamicCache"
is the same loop over HF's default cache, which grows by concatenation (what `generate` uses).

The HF engine is timed on `Policy.hf_generate_ids` alone (no log-probs, no truncation), our decoder
on the full `Policy.generate` (ids, log-probs, text): the ratios favour HF, if anything.
The last two lines are the custom/HF ratios of this run on "base": decode phase on (a), end to end
on (b); the lines above them give the same ratios for "lora" and "lora_merged".
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import random
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

import agent
import config
import core
import decoder
import envs as envs_lib
import gigpo
import model


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def cpu_preset_env(**changes) -> envs_lib.EnvConfig:
    """The cpu preset's games (the ones `python siri.py` generates and caches), in one worker-less
    process, with `changes` to the env section."""
    return dataclasses.replace(config.load_config(None, []).env, num_workers=0, **changes)


def make_prompts(pol: decoder.Policy, n: int, length: int, seed: int) -> list[list[int]]:
    """n distinct chat prompts of length-40..length tokens, cut from ALFWorld-like text."""
    rng = random.Random(seed)
    corpus = model.default_tiny_corpus(200, seed=seed)
    prompts = []
    for i in range(n):
        text = " ".join(rng.sample(corpus, 60))
        ids = pol.chat_ids(text)
        assert len(ids) >= length, "corpus sample too short for --prompt-len"
        prompts.append(ids[-(length - (i * 7) % 40):])  # ragged lengths, ends with the assistant header
    return prompts


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, lms: list[torch.nn.Module], clock: str, device="cpu") -> dict:
    """Run fn once; split its time at the end of the first forward of any of `lms` (the prompt;
    the LoRA-wrapped model or its merged copy): prefill = call -> end of that forward, decode =
    the rest (every later token). On CUDA the GPU is synchronised at both marks."""
    now = CLOCKS[clock]
    marks: list[float] = []

    def mark(*_):
        if not marks:
            sync(device)
            marks.append(now())

    hooks = [lm.register_forward_hook(mark) for lm in lms]
    sync(device)
    t0 = now()
    try:
        fn()
    finally:
        for hook in hooks:
            hook.remove()
    sync(device)
    t1 = now()
    return dict(total_s=t1 - t0, prefill_s=marks[0] - t0, decode_s=t1 - marks[0])


@torch.inference_mode()
def raw_forward(pol: decoder.Policy, prompts: list[list[int]], n_tokens: int, ready_mask: bool,
                dynamic: bool = False, merge: bool = False) -> None:
    """Prefill + (n_tokens - 1) single-token forwards through the KV cache: no sampling, no stops.
    The cache is our decoder's (`Policy.new_cache`), or HF's DynamicCache with dynamic=True; the
    model is the one our decoder runs (`Policy.decoder`: with merge, the open merged copy)."""
    lm = pol.decoder(decoder.SamplingConfig(merge_adapter=merge))
    ids, mask = pol._left_pad(prompts)  # (B, P)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = decoder.DynamicCache(config=pol._lm_config) if dynamic else pol.new_cache(ids.shape[1] + n_tokens)
    lm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
       logits_to_keep=1)
    B, L = ids.shape
    full_mask = torch.ones((B, L + n_tokens), dtype=torch.bool, device=ids.device)
    full_mask[:, :L] = mask.bool()
    tok, pos = ids[:, -1:], positions[:, -1:]  # feed any token: (B, 1)
    for t in range(n_tokens - 1):
        step_mask = full_mask[:, :L + t + 1]
        attn = step_mask[:, None, None, :] if ready_mask else step_mask.long()  # as our decoder hands it
        lm(input_ids=tok, attention_mask=attn, position_ids=pos + 1 + t, cache=cache, use_cache=True)


def best_seconds(runs: dict, args) -> tuple[dict, dict]:
    """Run every named closure once (warm-up; its result kept for comparing), then `repeats` times
    interleaved; return (name -> first result, name -> fastest seconds), minimum as in `best_times`."""
    outs = {name: fn() for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync(args.device)
            t0 = CLOCKS[args.clock]()
            fn()
            sync(args.device)
            times[name].append(CLOCKS[args.clock]() - t0)
    return outs, {name: min(v) for name, v in times.items()}


def best_times(runs: dict, lms: list[torch.nn.Module], args) -> dict:
    """Run every named closure `repeats` times, interleaved; return name -> the fastest run's
    total_s, prefill_s, decode_s (each its own minimum). Our choice, as timeit's: on a shared machine
    the minimum is the run least disturbed by other processes; the median drifts with their load."""
    times: dict[str, list[dict]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up: first calls allocate and build caches
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, lms, args.clock, args.device))
    return {name: {k: min(x[k] for x in v) for k in v[0]} for name, v in times.items()}


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
def bench_model(pol: decoder.Policy, args, merge: bool = False) -> dict:
    """Workloads a, b, c on one policy; returns the numbers (seconds, tokens/s, ms). merge: our
    decoder (and "raw forward") run the merged copy (`Policy.merged_adapter`), built once here
    (its cost is `merge_s`), as a rollout builds it once for all its steps; HF `generate` runs
    the LoRA-wrapped model, as a user would."""
    t0 = time.perf_counter()
    with pol.merged_adapter(merge) as merged:
        merge_s = time.perf_counter() - t0
        out = _bench_model(pol, args, merge, [] if merged is None else [merged])
    return dict(out, merge_s=merge_s if merge else 0.0)


def _bench_model(pol: decoder.Policy, args, merge: bool, merged: list) -> dict:
    B, N = args.batch, args.new_tokens
    lm = decoder.transformers_model(pol.model)  # HF calls this one
    lm = [lm] + merged  # the modules whose first forward ends the prefill
    sample = decoder.SamplingConfig(temperature=1.0, max_new_tokens=N, min_new_tokens=N, stop=(), merge_adapter=merge)
    gen = torch.Generator(device=pol.device).manual_seed(0)
    out: dict = {}

    # (a) distinct prompts: decode speed
    prompts = make_prompts(pol, B, args.prompt_len, seed=1)
    dyn = dataclasses.replace(sample, kv_cache="dynamic")
    t = best_times({
        "custom": lambda: pol.generate(prompts, sample, gen),
        "custom_dyn": lambda: pol.generate(prompts, dyn, gen),
        "hf": lambda: pol.hf_generate_ids(prompts, sample),
        "raw": lambda: raw_forward(pol, prompts, N, ready_mask=True, merge=merge),
        "raw_2d": lambda: raw_forward(pol, prompts, N, ready_mask=False, merge=merge),
        "raw_dyn": lambda: raw_forward(pol, prompts, N, ready_mask=True, dynamic=True, merge=merge),
    }, lm, args)
    rows = {name: dict(**x, step_ms=1e3 * x["decode_s"] / (N - 1), decode_tok_s=B * (N - 1) / x["decode_s"],
                       e2e_tok_s=B * N / x["total_s"]) for name, x in t.items()}
    out["a"] = dict(batch=B, prompt_tokens=[len(p) for p in prompts], new_tokens=N, **rows)

    # (b) GiGPO-shaped: 2 tasks x G rollouts sharing each task's prompt
    tasks = make_prompts(pol, args.groups, args.prompt_len, seed=2)
    group = [p for p in tasks for _ in range(args.group_size)]
    unshared = dataclasses.replace(sample, share_prefix=False)
    t = best_times({
        "custom": lambda: pol.generate(group, sample, gen),
        "custom_no_share": lambda: pol.generate(group, unshared, gen),
        "hf": lambda: pol.hf_generate_ids(group, sample),
    }, lm, args)
    out["b"] = dict(groups=args.groups, group_size=args.group_size, new_tokens=N,
                    **{k: dict(**x, e2e_tok_s=len(group) * N / x["total_s"]) for k, x in t.items()})

    # (c) rows finishing at different steps: does dropping them from the batch/cache pay?
    # Every 24th token id also ends a row: at T=1 on this near-uniform random model a row stops with
    # probability ~1/24 per step. Samples do not depend on the batch (see Policy._generate_custom),
    # so both settings produce the same responses.
    ragged = copy.copy(pol)  # same model, more EOS ids
    ragged.eos_ids = pol.eos_ids + list(range(3, len(pol.tokenizer), 24))
    free = dataclasses.replace(sample, min_new_tokens=0)
    keep_cfg = dataclasses.replace(free, drop_finished=False)
    seeded = lambda: torch.Generator(device=pol.device).manual_seed(3)  # noqa: E731
    drop = ragged.generate(prompts, free, seeded())
    keep = ragged.generate(prompts, keep_cfg, seeded())
    assert [g.ids for g in keep] == [g.ids for g in drop], "dropping finished rows changed the outputs"
    t = best_times({
        "drop_finished": lambda: ragged.generate(prompts, free, seeded()),
        "keep_finished": lambda: ragged.generate(prompts, keep_cfg, seeded()),
    }, lm, args)
    lengths = [len(g.ids) for g in drop]
    out["c"] = dict(response_tokens=lengths, **{k: dict(**x, tok_s=sum(lengths) / x["total_s"]) for k, x in t.items()})
    return out


def cmd_decode(args) -> dict:
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the table's lines
    if torch.device(args.device).type == "cuda":
        args.clock = "wall"  # the CPU clock does not see the GPU's work
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir:
            path = args.model_dir
        elif args.shape == "tiny" and not args.layers and not args.vocab and args.dtype == "float32":
            path = model.build_tiny_model(os.path.join(tmp, "tiny"), model.default_tiny_corpus())  # the tiny model itself
        else:
            path = make_model(os.path.join(tmp, "model"), args.shape, args.dtype, args.layers, args.vocab)
        base = AutoModelForCausalLM.from_pretrained(path).to(args.device).eval()
        lora = model.load_policy(model.ModelConfig(name=path), device=args.device)  # + LoRA, as rollouts run it
        policies = {"base": decoder.Policy(base, lora.tokenizer, args.device), "lora": lora, "lora_merged": lora}
        cfg = base.config
        info = dict(model=f"{args.model_dir or args.shape} Qwen2: {cfg.num_hidden_layers} layers, {cfg.hidden_size} hidden, "
                          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}, "
                          f"{str(base.dtype).removeprefix('torch.')}, {args.device}",
                    torch_threads=torch.get_num_threads(), repeats=args.repeats, clock=args.clock,
                    torch=torch.__version__)
        results = {}
        cuda = torch.device(args.device).type == "cuda"
        for name in args.models:
            if cuda:  # peak memory of this model's runs (both models' weights stay loaded)
                torch.cuda.reset_peak_memory_stats()
            results[name] = bench_model(policies[name], args, merge=name == "lora_merged")
            if cuda:
                results[name]["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30

    print(f"bench decode | {info['model']} | torch threads {info['torch_threads']} | "
          f"best of {args.repeats} | {args.clock} clock | tokens/s = generated tokens per second")
    print(f"{'model':11} {'workload':34} {'engine':22} {'prefill s':>9} {'step ms':>8} {'decode tok/s':>12} {'e2e tok/s':>10}")
    for name, r in results.items():
        a, b, c = r["a"], r["b"], r["c"]
        wa = f"a: {a['batch']} x {min(a['prompt_tokens'])}-{max(a['prompt_tokens'])} tok, {a['new_tokens']} new"
        for eng, label in (("custom", "custom"), ("custom_dyn", "custom, DynamicCache"),
                           ("hf", "hf generate"), ("raw", "raw forward"),
                           ("raw_2d", "raw forward, 2D mask"), ("raw_dyn", "raw fwd, DynamicCache")):
            x = a[eng]
            print(f"{name:11} {wa:34} {label:22} {x['prefill_s']:9.3f} {x['step_ms']:8.2f} "
                  f"{x['decode_tok_s']:12.0f} {x['e2e_tok_s']:10.0f}")
        wb = f"b: {b['groups']} tasks x G={b['group_size']}, {b['new_tokens']} new"
        for eng, label in (("custom", "custom"), ("custom_no_share", "custom, no sharing"), ("hf", "hf generate")):
            print(f"{name:11} {wb:34} {label:22} {b[eng]['prefill_s']:9.3f} {'':8} {'':12} {b[eng]['e2e_tok_s']:10.0f}")
        wc = f"c: ragged stops, {sum(c['response_tokens'])} tok total"
        for eng in ("drop_finished", "keep_finished"):
            print(f"{name:11} {wc:34} {'custom, ' + eng.split('_')[0]:22} {c[eng]['prefill_s']:9.3f} {'':8} {'':12} {c[eng]['tok_s']:10.0f}")
        a_ratio = a["custom"]["decode_tok_s"] / a["hf"]["decode_tok_s"]
        base_raw = f" | custom step / base raw step {a['custom']['step_ms'] / results['base']['a']['raw']['step_ms']:.2f}" \
            if name != "base" and "base" in results else ""
        print(f"{name:11} custom/hf decode {a_ratio:.2f}x | custom step / raw step "
              f"{a['custom']['step_ms'] / a['raw']['step_ms']:.2f}{base_raw} | group e2e "
              f"{b['custom']['e2e_tok_s'] / b['hf']['e2e_tok_s']:.2f}x | drop finished "
              f"{c['drop_finished']['tok_s'] / c['keep_finished']['tok_s']:.2f}x"
              + (f" | merge {1e3 * r['merge_s']:.0f} ms" if r["merge_s"] else "")
              + (f" | max memory {r['max_mem_gb']:.2f} GiB" if "max_mem_gb" in r else ""))
    first = results[args.models[0]]
    ratio_decode = first["a"]["custom"]["decode_tok_s"] / first["a"]["hf"]["decode_tok_s"]
    ratio_group = first["b"]["custom"]["e2e_tok_s"] / first["b"]["hf"]["e2e_tok_s"]
    report = dict(info=info, args=vars(args) | {"func": None}, results=results,
                  ratio_decode=ratio_decode, ratio_group=ratio_group, ratios_from=args.models[0])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"json: {args.out} | ratios below: model '{args.models[0]}'; with LoRA, hf generate runs the "
          f"wrapped model")
    for name in args.models[1:]:  # the LoRA rows: our decoder wrapped / merged against HF on the wrapped model
        r = results[name]
        report[f"ratio_decode_{name}"] = r["a"]["custom"]["decode_tok_s"] / r["a"]["hf"]["decode_tok_s"]
        report[f"ratio_group_{name}"] = r["b"]["custom"]["e2e_tok_s"] / r["b"]["hf"]["e2e_tok_s"]
        print(f"ratio decode {name.replace('_', ' ')} {report[f'ratio_decode_{name}']:.2f} | "
              f"ratio group {name.replace('_', ' ')} {report[f'ratio_group_{name}']:.2f}")
    with open(args.out, "w") as f:  # again, with the LoRA ratios
        json.dump(report, f, indent=1)
    print(f"ratio decode {ratio_decode:.2f}")
    print(f"ratio group {ratio_group:.2f}")
    return report


# ---------------------------------------------------------------------------------------------
# rollout
# ---------------------------------------------------------------------------------------------
class AdmissibleActions:
    """The env manager, except that a response which is not a valid action is mapped to an
    admissible one (picked by a hash of the response text, so runs repeat).

    The random tiny model (almost) never writes a valid `<think>..</think><action>..</action>`;
    invalid actions never reach the env, which would then sit idle and its share look like zero.
    A trained policy's actions are valid and executed, which is the case measured here. The
    original `parse_action` still runs on every response, so its cost is counted."""

    def __init__(self, envs):
        self.envs, self.cfg = envs, envs.cfg

    def __getattr__(self, name):  # reset, step, build_prompt, ... of the wrapped manager
        return getattr(self.envs, name)

    def parse_action(self, text: str, admissible: list[str]) -> tuple[str | None, bool]:
        action, valid = self.envs.parse_action(text, admissible)
        if valid or not admissible:
            return action, valid
        pick = int(hashlib.sha1(text.encode()).hexdigest(), 16) % len(admissible)
        return admissible[pick], True


def cmd_rollout(args) -> dict:
    """Environment share of rollout wall time: `agent.rollout` with the tiny model on the
    embedded ALFWorld env, N = tasks x G slots, env stepped in-process or in worker processes."""
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    pol = model.load_policy(model.ModelConfig(name="tiny", dtype="float32"), device="cpu")
    rows = []
    for n, w, waves, overlap in [(n, w, waves, overlap) for n in args.slots for w in args.workers
                                 for waves in args.waves for overlap in ([True, False] if waves > 1 and w else [False])]:
        sample = decoder.SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens, waves=waves, overlap_env=overlap)
        cfg = envs_lib.EnvConfig(max_steps=args.max_steps, num_workers=w)
        with envs_lib.EnvManager(cfg) as manager:  # worker start-up is not timed
            envs = manager if args.model_actions else AdmissibleActions(manager)
            tasks = manager.task_ids("train")[:n // args.group_size]
            stats: dict = {}
            t0 = time.perf_counter()
            trajs = agent.rollout(pol, envs, tasks, args.group_size, sample, seed=0, stats=stats)
            wall = time.perf_counter() - t0
        rows.append(dict(slots=n, workers=w, waves=waves, overlap=overlap, wall_s=wall, **stats,
                         env_share=(stats["reset_s"] + stats["env_s"]) / wall,
                         env_steps_s=stats["env_steps"] / stats["env_s"], won=sum(t.won for t in trajs)))
    info = dict(model="tiny Qwen2 (ModelConfig name=tiny), fp32", torch_threads=torch.get_num_threads(),
                env=f"embedded ALFWorld, EnvConfig defaults, max_steps {args.max_steps}",
                actions="the model's own" if args.model_actions else "invalid responses mapped to admissible actions",
                sampling=f"temperature 1, max_new_tokens {args.new_tokens}, stop </action>", clock="wall",
                torch=torch.__version__)
    print(f"bench rollout | {info['model']} | torch threads {info['torch_threads']} | {info['env']} | "
          f"G={args.group_size} | actions: {info['actions']} | {info['sampling']} | wall clock")
    print("env s = reset + steps (time the decoding waits for the environments); env share = env s / wall s;\n"
          "env steps/s = executed actions / step seconds; waves: decoded in that many parts, overlap: a wave's env "
          "step runs while the next decodes")
    print(f"{'N':>4} {'workers':>7} {'waves':>5} {'overlap':>7} {'wall s':>7} {'generate s':>10} {'env s':>6} {'(reset':>7} {'steps)':>7} "
          f"{'env share':>9} {'env steps':>9} {'env steps/s':>11} {'tokens':>7}")
    for r in rows:
        print(f"{r['slots']:4d} {r['workers']:7d} {r['waves']:5d} {'on' if r['overlap'] else 'off':>7} {r['wall_s']:7.2f} {r['generate_s']:10.2f} "
              f"{r['reset_s'] + r['env_s']:6.2f} {r['reset_s']:7.2f} {r['env_s']:7.2f} {100 * r['env_share']:8.1f}% "
              f"{r['env_steps']:9d} {r['env_steps_s']:11.0f} {r['tokens']:7d}")
    report = dict(info=info, args=vars(args) | {"func": None}, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"json: {args.out}")
    return report


# ---------------------------------------------------------------------------------------------
# loop: one Phase 0 iteration, our engine against the same iteration written by hand with HF
# ---------------------------------------------------------------------------------------------
# Layer shapes (from the models' config.json; depth is a flag so that CPU runs stay short). Every
# model gets the project's tiny BPE tokenizer (ChatML, trained on ALFWorld-like text), so the
# vocabulary is the tokenizer's (~3000), not Qwen's 151,936, unless --vocab asks for more.
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, tie_word_embeddings=False),
    "4x256": dict(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
                  num_hidden_layers=4, tie_word_embeddings=False),
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                     num_hidden_layers=24, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen1.5b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                     num_hidden_layers=28, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


def cmd_score(args) -> dict:
    """`Policy.score` with grad + backward (the update's and the cold start's pass) in its two layouts,
    interleaved, best of --repeats, on the same rows: right-padded with no mask, so SDPA runs causal
    (ours, `Policy._score_batch`), and left-padded with the padding mask (`_score_batch_padded`).
    Rows: --rows chat prompts of --prompt-len-40..--prompt-len tokens (`make_prompts`) with
    responses of 8..--response-len tokens, in micro-batches of --batch rows. Prints `ratio score`.
    Also checks that the layouts give the same log-probs (max abs difference printed). Each layout
    also with the last layer run over every position (`decoder.hidden_at`, trim=False): prints
    `ratio trim`. Then the sampler's prefill the same ways (`prefill_layouts`); prints `ratio
    prefill` and `ratio prefill trim`."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_dir or make_model(os.path.join(tmp, args.shape), args.shape, args.dtype, args.layers,
                                            args.vocab)
        pol = model.load_policy(model.ModelConfig(name=path, dtype=args.dtype), device=args.device)
        rng = random.Random(args.seed)
        prompts = make_prompts(pol, args.rows, args.prompt_len, args.seed)
        responses = [[rng.randrange(len(pol.tokenizer)) for _ in range(rng.randint(8, args.response_len))]
                     for _ in prompts]
        layouts = {"right-padded, causal, last layer trimmed (ours)": (True, True),
                   "right-padded, causal, full last layer": (True, False), "left-padded, mask": (False, False)}

        flags = pol.causal_layout, pol.trim_last_layer  # what the model supports; restored below

        def one(causal: bool, trim: bool) -> list:
            pol.causal_layout, pol.trim_last_layer = causal and flags[0], trim and flags[1]
            out = []
            for i in range(0, len(prompts), args.batch):
                lps = pol.score(prompts[i:i + args.batch], responses[i:i + args.batch], 1 << 30)
                (-torch.cat(lps).mean()).backward()
                out += [lp.detach() for lp in lps]
            pol.model.zero_grad(set_to_none=True)
            return out

        try:
            outs, best = best_seconds({name: (lambda c=c: one(*c)) for name, c in layouts.items()}, args)
        finally:
            pol.causal_layout, pol.trim_last_layer = flags
        prefill = prefill_layouts(pol, prompts, args, rng)
    first, *others = outs.values()
    diff = max((a - b).abs().max().item() for out in others for a, b in zip(first, out))
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    width = max(map(len, best))
    for name, t in best.items():
        print(f"{name:{width}s} {t:7.3f} s  {tokens / t:8.0f} tokens/s (forward + backward, {args.clock} clock)")
    ours, untrimmed, padded = best.values()
    print(f"max |log-prob difference| {diff:.2e}")
    print(f"ratio score {padded / ours:.2f}")
    print(f"ratio trim {untrimmed / ours:.2f}")
    print(f"prefill of {args.batch} prompts of {prefill['lengths'][0]}-{prefill['lengths'][1]} tokens "
          f"({100 * prefill['pad_frac']:.0f} % padding in one left-padded batch), best of {args.repeats}:")
    for name, t in prefill["best_s"].items():
        print(f"{name:{width}s} {t:7.3f} s")
    print(f"max |next-token logit difference| {prefill['max_abs_diff']:.2e}")
    print(f"ratio prefill {prefill['ratio_prefill']:.2f}")
    print(f"ratio prefill trim {prefill['ratio_prefill_trim']:.2f}")
    report = {"best_s": best, "tokens": tokens, "max_abs_diff": diff, "ratio_score": padded / ours,
              "ratio_trim": untrimmed / ours,
              "prefill": prefill, "args": vars(args) | {"func": None}}
    core.atomic_write_json(args.out, report, indent=2)
    return report


def prefill_layouts(pol: decoder.Policy, prompts: list[list[int]], args, rng: random.Random) -> dict:
    """The sampler's prefill in its layouts, interleaved, best of --repeats, under inference
    mode: `Policy._prefill_causal` (length-sorted parts, right-padded, no mask, the last layer at
    each prompt's last token only: ours), the same with the full last layer, and
    `_prefill_padded` (one left-padded batch with its mask, as HF `generate` does), on --batch
    prompts cut to lengths drawn from prompt-len/4..prompt-len (a rollout step's prompts are that
    ragged: in `bench.py loop`'s rollout, 250-1050 tokens, 40-63 % of a one-batch prefill padding)."""
    lo = args.prompt_len // 4
    rows = [p[-rng.randint(min(lo, len(p)), len(p)):] for p in prompts[:args.batch]]
    P = max(len(r) for r in rows)
    lm = pol.model
    layouts = {"parts, right-padded, last layer trimmed (ours)": (pol._prefill_causal, True),
               "parts, right-padded, full last layer": (pol._prefill_causal, False),
               "one batch, left-padded": (pol._prefill_padded, False)}

    trim = pol.trim_last_layer  # what the model supports; restored below

    def one(fn, trimmed):
        pol.trim_last_layer = trimmed and trim
        return fn(lm, rows, pol.new_cache(P))[0]

    try:
        with torch.inference_mode():
            logits, best = best_seconds({name: (lambda how=how: one(*how)) for name, how in layouts.items()}, args)
    finally:
        pol.trim_last_layer = trim
    ours, untrimmed, padded = best.values()
    first, *others = logits.values()
    return {"best_s": best, "lengths": (min(len(r) for r in rows), P),
            "pad_frac": 1 - sum(len(r) for r in rows) / (len(rows) * P),
            "max_abs_diff": max((first - x).abs().max().item() for x in others),
            "ratio_prefill": padded / ours, "ratio_prefill_trim": untrimmed / ours}


def make_model(out_dir: str, shape: str, dtype: str = "float32", layers: int = 0, vocab: int = 0,
               seed: int = 0) -> str:
    """Save a random-weight Qwen2 of one of SHAPES (layers > 0 overrides the depth; vocab > 0 pads
    the embedding beyond the tokenizer's ids, which the model may then sample: they decode to
    nothing) with the tiny tokenizer to out_dir; returns out_dir (loads with ModelConfig name=out_dir)."""
    tokenizer = model.build_tiny_tokenizer(model.default_tiny_corpus(), 3000)
    spec = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    qwen_cfg = Qwen2Config(vocab_size=max(vocab, len(tokenizer)), max_position_embeddings=8192, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = Qwen2ForCausalLM(qwen_cfg).to(getattr(torch, dtype))
    lm.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def sync(device) -> None:
    """Wait for the GPU (timings on CUDA are otherwise the time to *queue* the work)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def lora_state(pol: decoder.Policy) -> dict:
    return {n: p.detach().clone() for n, p in pol.model.named_parameters() if p.requires_grad}


def set_lora_state(pol: decoder.Policy, state: dict) -> None:
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if n in state:
                p.copy_(state[n])


def make_opt(pol, gcfg):
    """AdamW over the adapter, as `siri.make_optimizer` builds it."""
    return torch.optim.AdamW([p for p in pol.model.parameters() if p.requires_grad], lr=gcfg.lr,
                             weight_decay=gcfg.weight_decay)


def ours_iteration(pol, envs, tasks, G, sample, gcfg, seed) -> dict:
    """Our Phase 0 iteration, as `siri.warmup_iteration` runs it: `agent.rollout` (KV-cached
    decoder, shared prefill, adapter merged, env workers), `gigpo.compute_advantages`,
    `gigpo.update` (reference scored once, rows sorted by length, sampler log-probs as π_old)."""
    opt = make_opt(pol, gcfg)
    stats: dict = {}
    t0 = time.perf_counter()
    trajs = agent.rollout(pol, envs, tasks, G, sample, seed=seed, stats=stats)
    sync(pol.device)
    t1 = time.perf_counter()
    samples = gigpo.samples_from(trajs, gigpo.compute_advantages(trajs, gcfg))  # Eq. 3, 6-9
    t2 = time.perf_counter()
    up = gigpo.update(pol, opt, samples, gcfg, seed=seed)
    sync(pol.device)
    t3 = time.perf_counter()
    return dict(total_s=t3 - t0, rollout_s=t1 - t0, generate_s=stats["generate_s"],
                env_s=stats["env_s"] + stats["reset_s"], prompt_s=stats["prompt_s"], merge_s=stats["merge_s"],
                advantages_s=t2 - t1, update_s=t3 - t2, old_s=up["old_score_s"], score_s=up["score_s"],
                ref_s=up["ref_score_s"], backward_s=up["backward_s"], pad_frac=up["pad_frac"],
                steps=stats["steps"], tokens=stats["tokens"], samples=len(samples), won=sum(t.won for t in trajs))


def hf_rollout(pol, envs, tasks, G, sample, seed, timing) -> list:
    """What a user writes by hand: per step, chat-template every slot's prompt, left-pad the batch,
    `generate` on the LoRA-wrapped model (every prompt prefilled, no shared prefix), cut each row
    at the pad token generate fills finished rows with, parse, step the envs in this process."""
    lm, tok = pol.model, pol.tokenizer
    gen_cfg = GenerationConfig(do_sample=True, temperature=sample.temperature, top_k=0, top_p=1.0,
                               max_new_tokens=sample.max_new_tokens, stop_strings=list(sample.stop) or None,
                               eos_token_id=pol.eos_ids, pad_token_id=pol.pad_id)
    torch.manual_seed(seed)
    slots = [t for t in tasks for _ in range(G)]
    t0 = time.perf_counter()
    states = envs.reset(slots)
    timing["env_s"] += time.perf_counter() - t0
    trajs = [core.Trajectory(task_id=t, task_type=s.task_type, group=f"{t}@seed{seed}", index=i % G, skill_id=None,
                          steps=[], won=False, task=s.task) for i, (t, s) in enumerate(zip(slots, states))]
    history: list[list] = [[] for _ in slots]
    lm.eval()
    while active := [i for i, s in enumerate(states) if not s.done]:
        t0 = time.perf_counter()
        texts = [tok.apply_chat_template([{"role": "user", "content": envs.build_prompt(states[i], history[i])}],
                                         tokenize=False, add_generation_prompt=True) for i in active]
        batch = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        batch = batch.to(pol.device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = lm.generate(**batch, generation_config=gen_cfg, tokenizer=tok)  # (b, P + T)
        sync(pol.device)
        t2 = time.perf_counter()
        prompts = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
        responses = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            responses.append(row[:row.index(pol.pad_id)] if pol.pad_id in row else row)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        parsed = [envs.parse_action(text, states[i].admissible) for i, text in zip(active, texts)]
        actions = [None] * len(slots)
        for i, (action, valid) in zip(active, parsed):
            actions[i] = action if valid else None
        new = envs.step(actions)
        t3 = time.perf_counter()
        for i, p, r, text, (action, valid) in zip(active, prompts, responses, texts, parsed):
            s, ns = states[i], new[i]
            trajs[i].steps.append(core.Step(prompt_ids=p, response_ids=r, logprobs=[0.0] * len(r), text=text,
                                         action=action, valid=valid, reward=ns.reward, done=ns.done, won=ns.won,
                                         anchor=s.anchor, obs=s.obs))
            history[i].append((s.obs, action if valid else None))
        states = new
        timing["prompt_s"] += t1 - t0
        timing["generate_s"] += t2 - t1
        timing["env_s"] += t3 - t2
        timing["steps"] += len(active)
        timing["tokens"] += sum(len(r) for r in responses)
    for traj, s in zip(trajs, states):
        traj.won = s.won
    return trajs


def hf_logprobs(pol, rows: list, grad: bool, entropy: bool = False):
    """By hand: right-pad prompt + response, one forward over the whole sequence, log-softmax of
    every position's logits (b, L - 1, V), gather the response tokens."""
    seqs = [s.prompt_ids + s.response_ids for s in rows]
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pol.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for j, x in enumerate(seqs):
        ids[j, :len(x)], mask[j, :len(x)] = torch.tensor(x), 1
    ids, mask = ids.to(pol.device), mask.to(pol.device)
    with torch.set_grad_enabled(grad):
        logp = pol.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)  # (b, L-1, V)
        tok_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, L - 1)
        ent = -(logp.exp() * logp).sum(-1) if entropy else None
    cut = [slice(len(s.prompt_ids) - 1, len(s.prompt_ids) - 1 + len(s.response_ids)) for s in rows]
    return [tok_lp[j, c] for j, c in enumerate(cut)], [ent[j, c] for j, c in enumerate(cut)] if entropy else None


def hf_update(pol, opt, samples: list, gcfg, seed: int, timing: dict) -> None:
    """The same objective (`gigpo.ppo_clip_loss`, `kl_penalty`, token-mean) in separate passes:
    π_old by a no-grad forward over every sample (generate gave no log-probs), then per
    micro-batch of a fixed row count, in shuffled order: the policy forward with grad, the
    reference forward with the adapter disabled, backward; one optimiser step per mini-batch."""
    longest = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    rows = max(1, gcfg.token_budget // longest)  # micro-batch size in rows
    t0 = time.perf_counter()
    old = []
    for i in range(0, len(samples), rows):
        old += hf_logprobs(pol, samples[i:i + rows], grad=False)[0]
    timing["old_s"] += time.perf_counter() - t0
    rng = random.Random(seed)
    pol.model.train()
    for _ in range(gcfg.ppo_epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        size = -(-len(order) // gcfg.minibatches)
        for start in range(0, len(order), size):
            mini = order[start:start + size]
            n_tok = sum(len(samples[k].response_ids) for k in mini)
            opt.zero_grad(set_to_none=True)
            for m in range(0, len(mini), rows):
                mb = mini[m:m + rows]
                t0 = time.perf_counter()
                logps, ents = hf_logprobs(pol, [samples[k] for k in mb], grad=True, entropy=True)
                t1 = time.perf_counter()
                with torch.no_grad(), pol.model.disable_adapter():
                    refs, _ = hf_logprobs(pol, [samples[k] for k in mb], grad=False)
                t2 = time.perf_counter()
                loss = 0.0
                for k, lp, ref in zip(mb, logps, refs):
                    adv = torch.full_like(lp, samples[k].advantage)
                    loss_t = gigpo.ppo_clip_loss(lp, old[k], adv, gcfg.clip_eps, gcfg.clip_ratio_c)
                    loss = loss + (loss_t + gcfg.beta_kl * gigpo.kl_penalty(lp, ref, gcfg.kl_estimator)).sum()
                (loss / n_tok).backward()
                sync(pol.device)
                timing["score_s"] += t1 - t0
                timing["ref_s"] += t2 - t1
                timing["backward_s"] += time.perf_counter() - t2
            torch.nn.utils.clip_grad_norm_([p for p in pol.model.parameters() if p.requires_grad], gcfg.grad_clip)
            opt.step()


def hf_iteration(pol, envs, tasks, G, sample, gcfg, seed) -> dict:
    """The same iteration written by hand with HF (`hf_rollout`, the same advantage equations, `hf_update`)."""
    timing = dict.fromkeys(("generate_s", "env_s", "prompt_s", "old_s", "score_s", "ref_s", "backward_s"), 0.0)
    timing.update(steps=0, tokens=0)
    t0 = time.perf_counter()
    trajs = hf_rollout(pol, envs, tasks, G, sample, seed, timing)
    t1 = time.perf_counter()
    samples = gigpo.samples_from(trajs, gigpo.compute_advantages(trajs, gcfg))
    t2 = time.perf_counter()
    hf_update(pol, make_opt(pol, gcfg), samples, gcfg, seed, timing)
    sync(pol.device)
    t3 = time.perf_counter()
    return dict(timing, total_s=t3 - t0, rollout_s=t1 - t0, advantages_s=t2 - t1, update_s=t3 - t2, merge_s=0.0,
                pad_frac=float("nan"), samples=len(samples), won=sum(t.won for t in trajs))


def loop_setup(args, shape: str, dtype: str, layers: int, tmp: str, model_dir: str = ""):
    """(policy, env config) for one model of the loop benchmark (model_dir: a saved one)."""
    path = model_dir or make_model(os.path.join(tmp, f"{shape}-{dtype}-{layers}"), shape, dtype, layers, args.vocab)
    pol = model.load_policy(model.ModelConfig(name=path, dtype=dtype), device=args.device)
    env_cfg = cpu_preset_env(max_steps=args.max_steps)
    return pol, env_cfg


def run_loop(pol, env_cfg, tasks_n: int, G: int, args, arms=("ours", "ours_untrimmed", "hf")) -> dict:
    """One iteration per arm from the same LoRA weights, tasks and seed; returns arm -> timings.
    "ours_untrimmed": ours with every layer run over every position (`decoder.hidden_at`, trim=False)."""
    cuda = torch.device(pol.device).type == "cuda"
    sample = decoder.SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
    gcfg = gigpo.GiGPOConfig(group_size=G, lr=3e-3, minibatches=2, token_budget=args.token_budget)  # cpu preset
    start, trim = lora_state(pol), pol.trim_last_layer
    out = {}
    for arm in arms:
        workers = 0 if arm == "hf" else args.workers  # by hand: environments in this process
        with envs_lib.EnvManager(dataclasses.replace(env_cfg, num_workers=workers)) as manager:  # start-up not timed
            envs = AdmissibleActions(manager)
            tasks = manager.task_ids("train")[:tasks_n]
            set_lora_state(pol, start)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fn = hf_iteration if arm == "hf" else ours_iteration
            arm_sample = sample if arm == "hf" else dataclasses.replace(sample, waves=args.waves)
            pol.trim_last_layer = trim and arm != "ours_untrimmed"
            try:
                out[arm] = fn(pol, envs, tasks, G, arm_sample, gcfg, seed=args.seed)
            finally:
                pol.trim_last_layer = trim
            if cuda:
                out[arm]["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    set_lora_state(pol, start)
    return out


SPLIT = (("rollout_s", "rollout"), ("generate_s", "generate"), ("env_s", "env"), ("prompt_s", "prompts"),
         ("merge_s", "merge"), ("update_s", "update"), ("old_s", "π_old"), ("score_s", "policy fwd"),
         ("ref_s", "ref fwd"), ("backward_s", "backward"))


def cmd_loop(args) -> dict:
    """`python bench.py loop`: one Phase 0 iteration (B tasks x G rollouts, GiGPO advantages, PPO
    update) two ways, in one process, from the same LoRA weights, tasks and seed:

      ours  `ours_iteration`: what `siri.warmup_iteration` runs (env workers, merged sampling,
            shared prefill, sampler log-probs as π_old on CPU, one reference pass, sorted rows,
            the last layer only where it is read: `decoder.hidden_at`);
      ours_untrimmed  the same with every layer over every position (what the trim buys: on a
            shallow model much, on a deep one ~1/layers);
      hf    `hf_iteration`: the same iteration as a user writes it by hand (`generate` per step on
            the LoRA-wrapped model, environments in-process, separate scoring passes).

    Both play the cpu preset's games (6 receptacles) with the tiny model's invalid actions mapped
    to admissible ones (`AdmissibleActions`: the env does the work a trained policy gives it),
    temperature 1, and update with the cpu preset's GiGPO settings (2 mini-batches, lr 3e-3).
    Wall clock, one run each (an iteration is long; a second run shows the noise). Then the
    scaling table: our iteration alone as G, then B, then the model grows (--scale-*). Prints
    the time split of every run and, last, `ratio loop trim` (untrimmed seconds / ours), `ratio
    loop untrimmed` and `ratio loop` (hf seconds / ours)."""
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    report: dict = dict(args=vars(args) | {"func": None}, torch=torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        pol, env_cfg = loop_setup(args, args.shape, args.dtype, args.layers, tmp, args.model_dir)
        run_loop(pol, env_cfg, 1, 2, args, arms=("ours", "hf")) if args.warmup else None  # first calls allocate
        main_runs = run_loop(pol, env_cfg, args.tasks, args.group_size, args)
        report["main"] = dict(shape=args.shape, dtype=args.dtype, tasks=args.tasks, group_size=args.group_size,
                              **main_runs)
        rows = []
        for kind, values in (("G", args.scale_g), ("tasks", args.scale_tasks), ("model", args.scale_models)):
            for v in values:
                if kind == "model":  # "shape:dtype:layers", layers 0 = the shape's own depth
                    shape, dtype, layers = v.split(":")
                    mpol, mcfg = loop_setup(args, shape, dtype, int(layers), tmp)
                    run = run_loop(mpol, mcfg, args.scale_model_tasks, args.scale_model_g, args, arms=("ours",))
                    rows.append(dict(vary="model", model=v, tasks=args.scale_model_tasks, G=args.scale_model_g,
                                     **run["ours"]))
                    del mpol
                else:
                    tasks_n = v if kind == "tasks" else args.scale_g_tasks
                    G = v if kind == "G" else args.scale_tasks_g
                    if any(r["vary"] != "model" and (r["tasks"], r["G"]) == (tasks_n, G) for r in rows):
                        continue  # measured already (G = 4 at 2 tasks is in both lists by default)
                    run = run_loop(pol, env_cfg, tasks_n, G, args, arms=("ours",))
                    rows.append(dict(vary=kind, model=f"{args.shape}:{args.dtype}", tasks=tasks_n, G=G, **run["ours"]))
        report["scaling"] = rows

    ours, untrimmed, hf = report["main"]["ours"], report["main"]["ours_untrimmed"], report["main"]["hf"]
    print(f"bench loop | {args.shape} {args.dtype}{f' {args.layers} layers' if args.layers else ''} on "
          f"{args.device} | torch threads {torch.get_num_threads()} | {args.tasks} tasks x G={args.group_size}, "
          f"{args.max_steps} steps, {args.new_tokens} new tokens, T=1 | env: cpu preset's games, actions made "
          f"admissible | ours: {args.workers} env workers, {args.waves} wave(s) | wall clock, one run each")
    print(f"{'arm':15} {'total s':>8} " + " ".join(f"{label:>10}" for _, label in SPLIT) + f" {'steps':>6} {'tokens':>7}")
    for name, r in (("ours", ours), ("ours, untrimmed", untrimmed), ("hf", hf)):
        print(f"{name:15} {r['total_s']:8.2f} " + " ".join(f"{r[k]:10.2f}" for k, _ in SPLIT)
              + f" {r['steps']:6d} {r['tokens']:7d}")
    print(f"rollout {hf['rollout_s'] / ours['rollout_s']:.2f}x | update {hf['update_s'] / ours['update_s']:.2f}x | "
          f"our grad forwards' padding {100 * ours['pad_frac']:.1f} %")
    print("scaling (ours): iteration seconds and where they go")
    print(f"{'vary':6} {'model':22} {'tasks':>5} {'G':>3} {'total s':>8} " + " ".join(f"{label:>10}" for _, label in SPLIT)
          + f" {'tokens':>7} {'tok/s':>7}")
    for r in report["scaling"]:
        print(f"{r['vary']:6} {r['model']:22} {r['tasks']:5d} {r['G']:3d} {r['total_s']:8.2f} "
              + " ".join(f"{r[k]:10.2f}" for k, _ in SPLIT) + f" {r['tokens']:7d} {r['tokens'] / r['generate_s']:7.0f}")
    report["ratio_loop"] = hf["total_s"] / ours["total_s"]
    report["ratio_loop_untrimmed"] = hf["total_s"] / untrimmed["total_s"]
    report["ratio_loop_trim"] = untrimmed["total_s"] / ours["total_s"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"json: {args.out}")
    print(f"ratio loop trim {report['ratio_loop_trim']:.2f}")
    print(f"ratio loop untrimmed {report['ratio_loop_untrimmed']:.2f}")
    print(f"ratio loop {report['ratio_loop']:.2f}")
    return report


def cmd_make_model(args) -> dict:
    """`python bench.py make-model`: save a random-weight model of a SHAPES entry (for --model-dir)."""
    path = make_model(args.out, args.shape, args.dtype, args.layers, args.vocab)
    print(f"saved {args.shape} ({args.dtype}, layers {args.layers or 'as the shape'}, vocab {args.vocab or 'tokenizer'}) "
          f"to {path}")
    return {"path": path}


def cmd_qlora(args) -> dict:
    """`python bench.py qlora`: load the model with a 4-bit NF4 base under LoRA (`model.qlora=true`),
    play 1 task x G=2 for 2 steps and take one GiGPO update step; records seconds, peak GPU
    memory, whether the rollout sampled merged (it cannot: `merged_copy` is None for a 4-bit base)
    and whether the adapter moved. Without CUDA it records the one-line error and stops."""
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    report: dict = dict(args=vars(args) | {"func": None})
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model_dir or make_model(os.path.join(tmp, "model"), args.shape, args.dtype, args.layers, args.vocab)
        t0 = time.perf_counter()
        try:
            pol = model.load_policy(model.ModelConfig(name=path, dtype="bfloat16", qlora=True, gradient_checkpointing=True),
                                device=args.device)
        except model.ModelLoadError as e:
            report.update(ok=False, skipped=str(e).splitlines()[0])
            pol = None
        if pol is not None:
            sync(pol.device)
            report["load_s"] = time.perf_counter() - t0
            report["merged_for_sampling"] = decoder.merged_copy(pol.model) is not None
            gcfg = gigpo.GiGPOConfig(group_size=2, lr=1e-4)
            before = lora_state(pol)
            with envs_lib.EnvManager(cpu_preset_env(max_steps=2)) as manager:
                envs = AdmissibleActions(manager)
                it = ours_iteration(pol, envs, manager.task_ids("train")[:1], 2,
                                    decoder.SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens), gcfg, seed=0)
            report.update(ok=True, iteration=it, adapter_moved=any(
                not torch.equal(before[n], p) for n, p in pol.model.named_parameters() if n in before))
            if torch.device(pol.device).type == "cuda":
                report["max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if report["ok"]:
        it = report["iteration"]
        print(f"qlora | load {report['load_s']:.1f} s | rollout {it['rollout_s']:.2f} s ({it['tokens']} tokens, "
              f"{it['tokens'] / it['generate_s']:.0f} tok/s) | update {it['update_s']:.2f} s | sampled "
              f"{'merged' if report['merged_for_sampling'] else 'unmerged (4-bit base)'} | adapter moved "
              f"{report['adapter_moved']}" + (f" | max memory {report['max_mem_gb']:.2f} GiB" if "max_mem_gb" in report else ""))
    else:
        print(f"qlora | skipped: {report['skipped']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


DEVICE_RUNS = {  # bench.py device --size: the arguments of each step (model, decode, loop)
    "full": dict(model=["--shape", "qwen1.5b", "--dtype", "bfloat16", "--vocab", "151936"],
                 decode=["--batch", "16", "--prompt-len", "600", "--new-tokens", "64", "--repeats", "2"],
                 loop=["--tasks", "4", "--group-size", "8", "--max-steps", "8", "--new-tokens", "64", "--workers", "8",
                       "--warmup", "--scale-g", "16", "--scale-g-tasks", "4", "--scale-tasks", "--scale-models"]),
    "tiny": dict(model=["--shape", "tiny", "--dtype", "float32"],
                 decode=["--batch", "2", "--prompt-len", "40", "--new-tokens", "4", "--repeats", "1", "--groups", "1",
                         "--group-size", "2", "--models", "base", "lora_merged"],
                 loop=["--tasks", "1", "--group-size", "2", "--max-steps", "2", "--new-tokens", "4", "--workers", "1",
                       "--scale-g", "2", "--scale-g-tasks", "1", "--scale-tasks", "--scale-models"]),
}


def cmd_device(args) -> dict:
    """`python bench.py device` (what `cuda_bench.sh` runs): save the random model once, then
    `decode`, `loop` and `qlora` on it in this process, each writing OUT/<step>.json and .txt;
    OUT/summary.txt gathers tokens/s, peak memory and every ratio."""
    run = DEVICE_RUNS[args.size]
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or os.path.join(tmp, "model")
        if not args.model_dir:
            main(["make-model", *run["model"], "--out", model_dir])
        reports = {}
        for step, extra in (("decode", run["decode"]), ("loop", run["model"] + run["loop"]), ("qlora", [])):
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                reports[step] = main([step, "--device", args.device, "--model-dir", model_dir, *extra,
                                      "--out", os.path.join(args.out, f"{step}.json")])
            print(text.getvalue(), end="")
            with open(os.path.join(args.out, f"{step}.txt"), "w") as f:
                f.write(text.getvalue())
    d, lo, q = reports["decode"], reports["loop"], reports["qlora"]
    lines = [f"model: {d['info']['model']}"]
    for name, r in d["results"].items():
        a, b = r["a"], r["b"]
        lines.append(f"decode {name}: ours {a['custom']['decode_tok_s']:.0f} tok/s (step {a['custom']['step_ms']:.2f} ms, "
                     f"raw {a['raw']['step_ms']:.2f} ms) | hf {a['hf']['decode_tok_s']:.0f} tok/s | group e2e ours "
                     f"{b['custom']['e2e_tok_s']:.0f} / hf {b['hf']['e2e_tok_s']:.0f} tok/s"
                     + (f" | max memory {r['max_mem_gb']:.2f} GiB" if "max_mem_gb" in r else ""))
    lines += [f"{k.replace('_', ' ')} {v:.2f}" for k, v in d.items() if k.startswith("ratio_")]
    for arm in ("ours", "ours_untrimmed", "hf"):
        r = lo["main"][arm]
        lines.append(f"loop {arm}: {r['total_s']:.2f} s (rollout {r['rollout_s']:.2f}, generate {r['generate_s']:.2f}, "
                     f"env {r['env_s']:.2f}, update {r['update_s']:.2f}) | {r['tokens'] / r['generate_s']:.0f} tok/s"
                     + (f" | max memory {r['max_mem_gb']:.2f} GiB" if "max_mem_gb" in r else ""))
    lines.append(f"ratio loop trim {lo['ratio_loop_trim']:.2f}")
    lines.append(f"ratio loop untrimmed {lo['ratio_loop_untrimmed']:.2f}")
    lines.append(f"ratio loop {lo['ratio_loop']:.2f}")
    if q.get("ok"):
        it = q["iteration"]
        lines.append(f"qlora: load {q['load_s']:.1f} s | {it['tokens'] / it['generate_s']:.0f} tok/s | update "
                     f"{it['update_s']:.2f} s | sampled {'merged' if q['merged_for_sampling'] else 'unmerged'} | "
                     f"adapter moved {q['adapter_moved']}" + (f" | max memory {q['max_mem_gb']:.2f} GiB" if "max_mem_gb" in q else ""))
    else:
        lines.append(f"qlora: skipped ({q['skipped']})")
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(["summary:"] + lines))
    return reports


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode", help="custom KV-cached decoder vs HF generate (tiny model, CPU)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the tiny model's ops are too small to gain from more, "
                        "and one busy core on a shared machine stalls multi-threaded small ops)")
    d.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (the best counts)")
    d.add_argument("--clock", default="cpu", choices=list(CLOCKS),
                   help="cpu (default): this process's CPU time, which other jobs on a shared machine do "
                        "not inflate (exact with --threads 1: the work runs on one thread); wall: wall time")
    d.add_argument("--batch", type=int, default=16, help="workload a: distinct prompts")
    d.add_argument("--prompt-len", type=int, default=600, help="longest prompt, tokens (others up to 39 fewer)")
    d.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    d.add_argument("--groups", type=int, default=2, help="workload b: tasks")
    d.add_argument("--group-size", type=int, default=8, help="workload b: rollouts per task (G)")
    d.add_argument("--models", nargs="+", default=["base", "lora", "lora_merged"],
                   choices=["base", "lora", "lora_merged"],
                   help="the model bare, wrapped in LoRA, and LoRA merged for sampling (the last two ratio lines "
                        "use the first)")
    d.add_argument("--device", default="cpu", help="cpu | cuda (on cuda the clock is wall, GPU synchronised)")
    d.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model shape (random weights)")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    d.add_argument("--layers", type=int, default=0, help="override the shape's depth (0 = its own)")
    d.add_argument("--vocab", type=int, default=0, help="embedding rows (0 = the tokenizer's; Qwen: 151936)")
    d.add_argument("--out", default="runs/bench_decode.json", help="JSON report path")
    d.set_defaults(func=cmd_decode)
    r = sub.add_parser("rollout", help="environment share of rollout wall time (tiny model, embedded ALFWorld)")
    r.add_argument("--threads", type=int, default=1, help="torch threads")
    r.add_argument("--slots", type=int, nargs="+", default=[16, 64], help="N = tasks x G parallel episodes")
    r.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="EnvConfig.num_workers values")
    r.add_argument("--waves", type=int, nargs="+", default=[1, 2],
                   help="SamplingConfig.waves values (with workers and waves > 1: overlap on and off)")
    r.add_argument("--group-size", type=int, default=8, help="G rollouts per task")
    r.add_argument("--max-steps", type=int, default=20, help="episode cap (EnvConfig.max_steps)")
    r.add_argument("--new-tokens", type=int, default=64,
                   help="max_new_tokens per response (the random model rarely stops before it)")
    r.add_argument("--model-actions", action="store_true",
                   help="keep the model's own (invalid) actions: the env then only resets")
    r.add_argument("--out", default="runs/bench_rollout.json", help="JSON report path")
    r.set_defaults(func=cmd_rollout)
    lp = sub.add_parser("loop", help="one Phase 0 iteration: our engine vs the same written by hand with HF, "
                                     "then a scaling table of ours")
    lp.add_argument("--threads", type=int, default=1, help="torch threads (env workers are processes of their own)")
    lp.add_argument("--device", default="cpu", help="cpu | cuda")
    lp.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model of the main comparison")
    lp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    lp.add_argument("--layers", type=int, default=0, help="override the shape's depth (0 = its own)")
    lp.add_argument("--vocab", type=int, default=0, help="embedding rows (0 = the tokenizer's ~3000; Qwen: 151936)")
    lp.add_argument("--tasks", type=int, default=2, help="B: tasks per iteration")
    lp.add_argument("--group-size", type=int, default=8, help="G: rollouts per task")
    lp.add_argument("--max-steps", type=int, default=6, help="episode cap (the cpu preset: 14)")
    lp.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens per response (the cpu preset: 32)")
    lp.add_argument("--workers", type=int, default=2, help="our env worker processes (by hand: 0, in-process)")
    lp.add_argument("--waves", type=int, default=1,
                    help="ours: rollout.waves (2: a wave's env step overlaps the other's decoding)")
    lp.add_argument("--token-budget", type=int, default=8192, help="gigpo.token_budget of both updates")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--warmup", action="store_true", help="run a small iteration of each arm first (untimed)")
    lp.add_argument("--scale-g", type=int, nargs="*", default=[4, 8, 16], help="scaling rows: G values ...")
    lp.add_argument("--scale-g-tasks", type=int, default=2, help="... at this many tasks")
    lp.add_argument("--scale-tasks", type=int, nargs="*", default=[2, 4, 8], help="scaling rows: B values ...")
    lp.add_argument("--scale-tasks-g", type=int, default=4, help="... at this G")
    lp.add_argument("--scale-models", nargs="*", default=["tiny:float32:0", "4x256:float32:0", "qwen0.5b:float32:2"],
                    help="scaling rows: models as shape:dtype:layers (layers 0 = the shape's own depth) ... "
                         "(default Qwen row in float32 and 2 layers deep: on a CPU without bf16 instructions a "
                         "bf16 backward is ~50x slower, e.g. 1515 s for qwen0.5b:bfloat16:4 at 1 task x G=4)")
    lp.add_argument("--scale-model-tasks", type=int, default=1, help="... at this many tasks")
    lp.add_argument("--scale-model-g", type=int, default=4, help="... and this G")
    lp.add_argument("--out", default="runs/bench_loop.json", help="JSON report path")
    lp.set_defaults(func=cmd_loop)
    sc = sub.add_parser("score", help="Policy.score + backward, and the sampler's prefill: right-padded causal "
                                      "vs left-padded with a mask")
    sc.add_argument("--threads", type=int, default=2, help="torch threads (the cold start and updates use all cores)")
    sc.add_argument("--repeats", type=int, default=5, help="timed runs per layout (the best counts)")
    sc.add_argument("--clock", default="wall", choices=list(CLOCKS))
    sc.add_argument("--rows", type=int, default=64)
    sc.add_argument("--batch", type=int, default=16, help="rows per micro-batch (the cold start's batch_size)")
    sc.add_argument("--prompt-len", type=int, default=300, help="longest prompt (the cpu preset's: 150-400)")
    sc.add_argument("--response-len", type=int, default=24)
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--shape", default="tiny", choices=list(SHAPES))
    sc.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sc.add_argument("--layers", type=int, default=0)
    sc.add_argument("--vocab", type=int, default=0)
    sc.add_argument("--model-dir", default="")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--out", default="runs/bench_score.json", help="JSON report path")
    sc.set_defaults(func=cmd_score)
    dv = sub.add_parser("device", help="decode + loop + qlora on one saved model, with a summary (cuda_bench.sh)")
    dv.add_argument("--device", default="cuda")
    dv.add_argument("--size", default="full", choices=list(DEVICE_RUNS),
                    help="full: Qwen2.5-1.5B-shaped, bf16, the real vocabulary; tiny: the tiny model (CPU, tests)")
    dv.add_argument("--model-dir", default="", help="a model saved by `bench.py make-model` (else built in a temp dir)")
    dv.add_argument("--out", default="runs/cuda_bench", help="folder for the reports")
    dv.set_defaults(func=cmd_device)
    mm = sub.add_parser("make-model", help="save a random-weight model of one of SHAPES (for --model-dir)")
    q = sub.add_parser("qlora", help="4-bit base + LoRA: load, one rollout and one update step (CUDA)")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--device", default="cuda")
    q.add_argument("--new-tokens", type=int, default=16)
    q.add_argument("--out", default="runs/bench_qlora.json", help="JSON report path")
    q.set_defaults(func=cmd_qlora)
    for cmd in (d, lp, q, mm):
        if cmd is not mm:
            cmd.add_argument("--model-dir", default="", help="a model saved by `bench.py make-model` (else built here)")
    for cmd in (q, mm):
        cmd.add_argument("--shape", default="tiny", choices=list(SHAPES))
        cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        cmd.add_argument("--layers", type=int, default=0, help="override the shape's depth (0 = its own)")
        cmd.add_argument("--vocab", type=int, default=0, help="embedding rows (0 = the tokenizer's; Qwen: 151936)")
    mm.add_argument("--out", required=True, help="folder to save the model to")
    mm.set_defaults(func=cmd_make_model)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
