"""Benchmarks. `python bench.py decode`: our KV-cached decoder against HF `generate`.
`python bench.py rollout`: the environment's share of rollout wall time (see `cmd_rollout`).

Both engines run the same tiny Qwen2 (2 layers, 128 wide, fp32, built on the fly in a temp dir) on
the same prompts, at temperature 1 (rollout sampling). Workloads:

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
The last two lines are the custom/HF ratios of this run: decode phase on (a), end to end on (b).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import random
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import policy as P


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def make_prompts(pol: P.Policy, n: int, length: int, seed: int) -> list[list[int]]:
    """n distinct chat prompts of length-40..length tokens, cut from ALFWorld-like text."""
    rng = random.Random(seed)
    corpus = P.default_tiny_corpus(200, seed=seed)
    prompts = []
    for i in range(n):
        text = " ".join(rng.sample(corpus, 60))
        ids = pol.chat_ids(text)
        assert len(ids) >= length, "corpus sample too short for --prompt-len"
        prompts.append(ids[-(length - (i * 7) % 40):])  # ragged lengths, ends with the assistant header
    return prompts


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, lm: torch.nn.Module, clock: str) -> dict:
    """Run fn once; split its time at the end of the first forward of `lm` (the prompt):
    prefill = call -> end of that forward, decode = the rest (every later token)."""
    now = CLOCKS[clock]
    marks: list[float] = []
    hook = lm.register_forward_hook(lambda *_: marks.append(now()))
    t0 = now()
    try:
        fn()
    finally:
        hook.remove()
    t1 = now()
    return dict(total_s=t1 - t0, prefill_s=marks[0] - t0, decode_s=t1 - marks[0])


@torch.inference_mode()
def raw_forward(pol: P.Policy, prompts: list[list[int]], n_tokens: int, ready_mask: bool,
                dynamic: bool = False) -> None:
    """Prefill + (n_tokens - 1) single-token forwards through the KV cache: no sampling, no stops.
    The cache is our decoder's (`Policy.new_cache`), or HF's DynamicCache with dynamic=True."""
    ids, mask = pol._left_pad(prompts)  # (B, P)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = P.DynamicCache(config=pol._lm_config) if dynamic else pol.new_cache(ids.shape[1] + n_tokens)
    pol.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
              logits_to_keep=1)
    B, L = ids.shape
    full_mask = torch.ones((B, L + n_tokens), dtype=torch.bool)
    full_mask[:, :L] = mask.bool()
    tok, pos = ids[:, -1:], positions[:, -1:]  # feed any token: (B, 1)
    for t in range(n_tokens - 1):
        step_mask = full_mask[:, :L + t + 1]
        attn = {"full_attention": step_mask[:, None, None, :]} if ready_mask else step_mask.long()
        pol.model(input_ids=tok, attention_mask=attn, position_ids=pos + 1 + t, cache=cache, use_cache=True)


def best_times(runs: dict, lm: torch.nn.Module, args) -> dict:
    """Run every named closure `repeats` times, interleaved; return name -> the fastest run's
    total_s, prefill_s, decode_s (each its own minimum). Our choice, as timeit's: on a shared machine
    the minimum is the run least disturbed by other processes; the median drifts with their load."""
    times: dict[str, list[dict]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up: first calls allocate and build caches
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, lm, args.clock))
    return {name: {k: min(x[k] for x in v) for k in v[0]} for name, v in times.items()}


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
def bench_model(pol: P.Policy, args) -> dict:
    """Workloads a, b, c on one policy; returns the numbers (seconds, tokens/s, ms)."""
    B, N = args.batch, args.new_tokens
    lm = pol.model.get_base_model() if hasattr(pol.model, "get_base_model") else pol.model  # HF calls this one
    sample = P.SamplingConfig(temperature=1.0, max_new_tokens=N, min_new_tokens=N, stop=())
    gen = torch.Generator().manual_seed(0)
    out: dict = {}

    # (a) distinct prompts: decode speed
    prompts = make_prompts(pol, B, args.prompt_len, seed=1)
    dyn = dataclasses.replace(sample, kv_cache="dynamic")
    t = best_times({
        "custom": lambda: pol.generate(prompts, sample, gen),
        "custom_dyn": lambda: pol.generate(prompts, dyn, gen),
        "hf": lambda: pol.hf_generate_ids(prompts, sample),
        "raw": lambda: raw_forward(pol, prompts, N, ready_mask=True),
        "raw_2d": lambda: raw_forward(pol, prompts, N, ready_mask=False),
        "raw_dyn": lambda: raw_forward(pol, prompts, N, ready_mask=True, dynamic=True),
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
    drop = ragged.generate(prompts, free, torch.Generator().manual_seed(3))
    keep = ragged.generate(prompts, keep_cfg, torch.Generator().manual_seed(3))
    assert [g.ids for g in keep] == [g.ids for g in drop], "dropping finished rows changed the outputs"
    t = best_times({
        "drop_finished": lambda: ragged.generate(prompts, free, torch.Generator().manual_seed(3)),
        "keep_finished": lambda: ragged.generate(prompts, keep_cfg, torch.Generator().manual_seed(3)),
    }, lm, args)
    lengths = [len(g.ids) for g in drop]
    out["c"] = dict(response_tokens=lengths, **{k: dict(**x, tok_s=sum(lengths) / x["total_s"]) for k, x in t.items()})
    return out


def cmd_decode(args) -> dict:
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the table's lines
    with tempfile.TemporaryDirectory() as tmp:
        path = P.build_tiny_model(os.path.join(tmp, "tiny"), P.default_tiny_corpus())
        base = AutoModelForCausalLM.from_pretrained(path).eval()  # the tiny model itself
        lora = P.load_policy(P.ModelConfig(name=path), device="cpu")  # + LoRA, as rollouts run it
        policies = {"base": P.Policy(base, lora.tokenizer, "cpu"), "lora": lora}
        cfg = base.config
        info = dict(model=f"tiny Qwen2: {cfg.num_hidden_layers} layers, {cfg.hidden_size} hidden, "
                          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}, fp32",
                    torch_threads=torch.get_num_threads(), repeats=args.repeats, clock=args.clock,
                    torch=torch.__version__)
        results = {name: bench_model(pol, args) for name, pol in policies.items() if name in args.models}

    print(f"bench decode | {info['model']} | torch threads {info['torch_threads']} | "
          f"best of {args.repeats} | {args.clock} clock | tokens/s = generated tokens per second")
    print(f"{'model':6} {'workload':34} {'engine':22} {'prefill s':>9} {'step ms':>8} {'decode tok/s':>12} {'e2e tok/s':>10}")
    for name, r in results.items():
        a, b, c = r["a"], r["b"], r["c"]
        wa = f"a: {a['batch']} x {min(a['prompt_tokens'])}-{max(a['prompt_tokens'])} tok, {a['new_tokens']} new"
        for eng, label in (("custom", "custom"), ("custom_dyn", "custom, DynamicCache"),
                           ("hf", "hf generate"), ("raw", "raw forward"),
                           ("raw_2d", "raw forward, 2D mask"), ("raw_dyn", "raw fwd, DynamicCache")):
            x = a[eng]
            print(f"{name:6} {wa:34} {label:22} {x['prefill_s']:9.3f} {x['step_ms']:8.2f} "
                  f"{x['decode_tok_s']:12.0f} {x['e2e_tok_s']:10.0f}")
        wb = f"b: {b['groups']} tasks x G={b['group_size']}, {b['new_tokens']} new"
        for eng, label in (("custom", "custom"), ("custom_no_share", "custom, no sharing"), ("hf", "hf generate")):
            print(f"{name:6} {wb:34} {label:22} {b[eng]['prefill_s']:9.3f} {'':8} {'':12} {b[eng]['e2e_tok_s']:10.0f}")
        wc = f"c: ragged stops, {sum(c['response_tokens'])} tok total"
        for eng in ("drop_finished", "keep_finished"):
            print(f"{name:6} {wc:34} {'custom, ' + eng.split('_')[0]:22} {c[eng]['prefill_s']:9.3f} {'':8} {'':12} {c[eng]['tok_s']:10.0f}")
        a_ratio = a["custom"]["decode_tok_s"] / a["hf"]["decode_tok_s"]
        print(f"{name:6} custom/hf decode {a_ratio:.2f}x | custom step / raw step "
              f"{a['custom']['step_ms'] / a['raw']['step_ms']:.2f} | group e2e "
              f"{b['custom']['e2e_tok_s'] / b['hf']['e2e_tok_s']:.2f}x | drop finished "
              f"{c['drop_finished']['tok_s'] / c['keep_finished']['tok_s']:.2f}x")
    first = results[args.models[0]]
    ratio_decode = first["a"]["custom"]["decode_tok_s"] / first["a"]["hf"]["decode_tok_s"]
    ratio_group = first["b"]["custom"]["e2e_tok_s"] / first["b"]["hf"]["e2e_tok_s"]
    report = dict(info=info, args=vars(args) | {"func": None}, results=results,
                  ratio_decode=ratio_decode, ratio_group=ratio_group, ratios_from=args.models[0])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"json: {args.out} | ratios below: model '{args.models[0]}'")
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
    """Environment share of rollout wall time: `policy.rollout` with the tiny model on the
    embedded ALFWorld env, N = tasks x G slots, env stepped in-process or in worker processes."""
    import envs as E

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    pol = P.load_policy(P.ModelConfig(name="tiny", dtype="float32"), device="cpu")
    sample = P.SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
    rows = []
    for n in args.slots:
        for w in args.workers:
            cfg = E.EnvConfig(max_steps=args.max_steps, num_workers=w)
            with E.EnvManager(cfg) as manager:  # worker start-up is not timed
                envs = manager if args.model_actions else AdmissibleActions(manager)
                tasks = manager.task_ids("train")[:n // args.group_size]
                stats: dict = {}
                t0 = time.perf_counter()
                trajs = P.rollout(pol, envs, tasks, args.group_size, sample, seed=0, stats=stats)
                wall = time.perf_counter() - t0
            rows.append(dict(slots=n, workers=w, wall_s=wall, **stats,
                             env_share=(stats["reset_s"] + stats["env_s"]) / wall,
                             env_steps_s=stats["env_steps"] / stats["env_s"], won=sum(t.won for t in trajs)))
    info = dict(model="tiny Qwen2 (ModelConfig name=tiny), fp32", torch_threads=torch.get_num_threads(),
                env=f"embedded ALFWorld, EnvConfig defaults, max_steps {args.max_steps}",
                actions="the model's own" if args.model_actions else "invalid responses mapped to admissible actions",
                sampling=f"temperature 1, max_new_tokens {args.new_tokens}, stop </action>", clock="wall",
                torch=torch.__version__)
    print(f"bench rollout | {info['model']} | torch threads {info['torch_threads']} | {info['env']} | "
          f"G={args.group_size} | actions: {info['actions']} | {info['sampling']} | wall clock")
    print("env s = reset + steps; env share = env s / wall s; env steps/s = executed actions / step seconds")
    print(f"{'N':>4} {'workers':>7} {'wall s':>7} {'generate s':>10} {'env s':>6} {'(reset':>7} {'steps)':>7} "
          f"{'env share':>9} {'env steps':>9} {'env steps/s':>11} {'tokens':>7}")
    for r in rows:
        print(f"{r['slots']:4d} {r['workers']:7d} {r['wall_s']:7.2f} {r['generate_s']:10.2f} "
              f"{r['reset_s'] + r['env_s']:6.2f} {r['reset_s']:7.2f} {r['env_s']:7.2f} {100 * r['env_share']:8.1f}% "
              f"{r['env_steps']:9d} {r['env_steps_s']:11.0f} {r['tokens']:7d}")
    report = dict(info=info, args=vars(args) | {"func": None}, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"json: {args.out}")
    return report


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
    d.add_argument("--models", nargs="+", default=["base", "lora"], choices=["base", "lora"],
                   help="tiny model bare and/or wrapped in LoRA (the ratio lines use the first)")
    d.add_argument("--out", default="runs/bench_decode.json", help="JSON report path")
    d.set_defaults(func=cmd_decode)
    r = sub.add_parser("rollout", help="environment share of rollout wall time (tiny model, embedded ALFWorld)")
    r.add_argument("--threads", type=int, default=1, help="torch threads")
    r.add_argument("--slots", type=int, nargs="+", default=[16, 64], help="N = tasks x G parallel episodes")
    r.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="EnvConfig.num_workers values")
    r.add_argument("--group-size", type=int, default=8, help="G rollouts per task")
    r.add_argument("--max-steps", type=int, default=20, help="episode cap (EnvConfig.max_steps)")
    r.add_argument("--new-tokens", type=int, default=64,
                   help="max_new_tokens per response (the random model rarely stops before it)")
    r.add_argument("--model-actions", action="store_true",
                   help="keep the model's own (invalid) actions: the env then only resets")
    r.add_argument("--out", default="runs/bench_rollout.json", help="JSON report path")
    r.set_defaults(func=cmd_rollout)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
