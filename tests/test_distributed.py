"""Data-parallel SIRI (distributed.py) on two gloo processes, offline on CPU.

One spawn of two ranks runs every collective check and saves its results; the test functions
compare them with a single process doing the same work. A last test launches siri.py under
torchrun (2 ranks) end to end and checks that rank 1 never writes into the run folder.
"""
import json
import os
import pickle
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp_mp

import config
import core
import distributed
import gigpo
import mining
import siri
from distill import DistillConfig
from model import ModelConfig, load_policy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_siri import kill_after_first_warmup_row, run_cli, tiny_overrides  # noqa: E402

WORLD = 2
GCFG = gigpo.GiGPOConfig(lr=1e-2, beta_kl=0.01, grad_clip=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_policy(tiny_dir):
    torch.manual_seed(0)  # the same LoRA init in every process
    return load_policy(ModelConfig(name="tiny", dtype="float32", tiny_dir=str(tiny_dir)), device="cpu")


def make_samples(policy, n: int, seed: int) -> list[core.Sample]:
    """n synthetic rows of varied lengths: pg rows and a few distill rows."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = policy.chat_ids(f"go to the fridge {i}")[: rng.randint(10, 30)]
        resp = [rng.randrange(5, 200) for _ in range(rng.randint(2, 6))]
        out.append(core.Sample(prompt, resp, [-5.0 + rng.random()] * len(resp), rng.uniform(-1, 1),
                                "distill" if i % 4 == 3 else "pg"))
    return out


def lora_state(policy) -> dict:
    return {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_" in n}


def make_opt(policy, cfg, kind):
    """SGD for the comparison with one process: its step is proportional to the gradient, so the
    float noise of a different summation order stays float noise (Adam's first steps are
    ≈ lr·sign(g) and would amplify it for gradients near 0)."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr) if kind == "sgd" else torch.optim.AdamW(params, lr=cfg.lr)


def single_update(tiny_dir, batches, cfg=GCFG, kind="adamw"):
    """One process: the updates of `batches` (each a list of samples, one update per list)."""
    policy = tiny_policy(tiny_dir)
    opt = make_opt(policy, cfg, kind)
    stats = [gigpo.update(policy, opt, b, cfg, DistillConfig(), seed=k) for k, b in enumerate(batches)]
    return lora_state(policy), stats


# --- the two ranks ------------------------------------------------------------------------------

def _rank_main(rank: int, port: int, tiny_dir: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init("cpu") and distributed.world_size() == WORLD
    res = {"shard": distributed.shard(list(range(5))), "shard1": distributed.shard(["only"]),
           "gathered": distributed.gather_objects(distributed.shard(list(range(5)))),
           "sum": distributed.all_reduce_sum([1.0, float(rank)]),
           "seed": distributed.rank_seed(7)}

    # 1. two updates on split batches (both ranks non-empty, minibatches=1), with AdamW and SGD
    for kind in ("adamw", "sgd"):
        policy = tiny_policy(tiny_dir)
        opt = make_opt(policy, GCFG, kind)
        res[f"split_stats_{kind}"] = []
        for k in range(2):
            mine = distributed.shard(make_samples(policy, 8, seed=k))
            res[f"split_stats_{kind}"].append(gigpo.update(policy, opt, mine, GCFG, DistillConfig(), seed=k))
        res[f"split_{kind}"] = lora_state(policy)

    # 2. rank 1 has no samples, two mini-batches: the same number of steps on both ranks
    cfg2 = gigpo.GiGPOConfig(lr=1e-2, minibatches=2)
    policy = tiny_policy(tiny_dir)
    opt = make_opt(policy, cfg2, "adamw")
    mine = make_samples(policy, 3, seed=5) if rank == 0 else []
    res["uneven_stats"] = gigpo.update(policy, opt, mine, cfg2, DistillConfig(), seed=0)
    res["uneven"] = lora_state(policy)

    # 3. a non-finite loss on rank 1 only skips the step on both ranks
    mine = make_samples(policy, 2, seed=9)
    if rank == 1:
        mine[0].advantage = float("nan")
    res["nan_stats"] = gigpo.update(policy, opt, mine, gigpo.GiGPOConfig(lr=1e-2), DistillConfig(), seed=1)
    res["nan"] = lora_state(policy)

    # 4. paired validation: each rank holds its shard of the pairs; Δg on the pooled pairs
    keys = [(f"task{m}", i) for m in range(5) for i in range(4)]
    rng = random.Random(3)
    w = [float(rng.random() < 0.6) for _ in keys]
    wo = [float(rng.random() < 0.4) for _ in keys]
    part = distributed.shard(list(zip(keys, w, wo)))[::-1]  # any order inside a rank
    local = mining.PairedResult("s", [k for k, _, _ in part], [a for _, a, _ in part], [b for _, _, b in part])
    pooled = mining.pool_pairs(local)
    res["pairs"] = {"keys": pooled.keys, "delta_g": mining.delta_g(pooled.with_success, pooled.without_success),
                    "ci": mining.paired_bootstrap_ci(pooled.with_success, pooled.without_success, 0.9, 200, 0),
                    "full": (keys, w, wo)}
    torch.save(res, Path(out) / f"rank{rank}.pt")
    distributed.destroy()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn the two gloo ranks once; returns (tiny_dir, [results of rank 0, rank 1])."""
    root = tmp_path_factory.mktemp("dist")
    tiny_dir = root / "tiny"
    tiny_policy(tiny_dir)  # build the tiny model once, before the ranks load it
    tmp_mp.spawn(_rank_main, args=(free_port(), str(tiny_dir), str(root)), nprocs=WORLD, join=True)
    return tiny_dir, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_same(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=0, atol=atol), (n, (a[n] - b[n]).abs().max().item())


# --- tests ------------------------------------------------------------------------------------------

def test_shard_gather_and_reduce(ranks):
    _, (r0, r1) = ranks
    assert r0["shard"] == [0, 1, 2] and r1["shard"] == [3, 4]  # contiguous, sizes differ by at most one
    assert r0["shard1"] == ["only"] and r1["shard1"] == []
    assert r0["gathered"] == r1["gathered"] == [0, 1, 2, 3, 4]  # rank order = original order
    assert r0["sum"] == r1["sum"] == [2.0, 1.0]
    assert r0["seed"] == 7 and r1["seed"] != 7  # rank 0 keeps the seed: one process is unchanged


def test_two_ranks_hold_identical_weights_equal_to_one_process_on_the_union(ranks):
    tiny_dir, (r0, r1) = ranks
    policy = tiny_policy(tiny_dir)
    batches = [make_samples(policy, 8, seed=k) for k in range(2)]
    before = lora_state(policy)
    # SGD: the gradients agree to float precision; AdamW: its early steps ≈ lr·g/(|g| + eps)
    # magnify that noise for gradients near 0, so the bound is a small fraction of one lr step
    for kind, atol in (("sgd", 1e-7), ("adamw", 1e-2 * GCFG.lr)):
        assert_same(r0[f"split_{kind}"], r1[f"split_{kind}"])  # bit-identical on both ranks
        union, stats = single_update(tiny_dir, batches, kind=kind)
        assert all(not torch.equal(before[n], union[n]) for n in union)  # two updates move every LoRA weight
        assert_same(r0[f"split_{kind}"], union, atol=atol)
        for k in range(2):  # metrics are batch-wide too
            for key in ("loss", "pg_loss", "kl", "grad_norm", "distill_loss", "pg_tokens", "distill_tokens"):
                got = r0[f"split_stats_{kind}"][k][key]
                assert got == pytest.approx(stats[k][key], rel=1e-4, abs=1e-7), (kind, key)
                assert r1[f"split_stats_{kind}"][k][key] == got


def test_an_empty_rank_takes_the_same_steps_and_a_nan_on_one_rank_skips_all(ranks):
    tiny_dir, (r0, r1) = ranks
    cfg2 = gigpo.GiGPOConfig(lr=1e-2, minibatches=2)
    assert r0["uneven_stats"]["optimizer_steps"] == r1["uneven_stats"]["optimizer_steps"] == 2
    policy = tiny_policy(tiny_dir)
    alone, _ = single_update(tiny_dir, [make_samples(policy, 3, seed=5)], cfg2)
    assert_same(r0["uneven"], r1["uneven"])
    assert_same(r0["uneven"], alone, atol=1e-6)  # = one process on rank 0's samples alone
    for r in (r0, r1):
        assert r["nan_stats"]["skipped_nonfinite"] == 1 and r["nan_stats"]["optimizer_steps"] == 0
        assert_same(r["nan"], r["uneven"])  # nothing moved


def test_pooled_delta_g_equals_one_process_on_the_same_pairs(ranks):
    _, (r0, r1) = ranks
    keys, w, wo = r0["pairs"]["full"]
    assert r0["pairs"]["keys"] == r1["pairs"]["keys"] == keys
    assert r0["pairs"]["delta_g"] == r1["pairs"]["delta_g"] == mining.delta_g(w, wo)
    assert r0["pairs"]["ci"] == mining.paired_bootstrap_ci(w, wo, 0.9, 200, 0)


# --- siri.py under torchrun ---------------------------------------------------------------------------

AUDIT = r'''
import os, sys, json
out_dir = os.path.realpath(sys.argv[1]); log = sys.argv[2]; del sys.argv[1:3]
sys.path.insert(0, os.getcwd())
writes = []
def hook(event, args):  # rank != 0: record every write-like operation under the run folder
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1] or "r", args[2] or 0
        if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(out_dir):
                writes.append([event, path])
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
        path = os.path.realpath(os.fsdecode(args[0])) if isinstance(args[0], (str, bytes, os.PathLike)) else ""
        if path.startswith(out_dir):
            writes.append([event, path])
if os.environ["RANK"] != "0":
    sys.addaudithook(hook)
import siri
result = siri.main(sys.argv[1:])
with open(log + os.environ["RANK"], "w") as f:
    json.dump({"writes": writes, "done": result["done"], "units": result["units"]}, f)
'''


def test_siri_runs_end_to_end_on_two_ranks_and_only_rank_0_writes(tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    # a validated skill from an earlier round, so that mining re-measures it with paired rollouts
    # (M = 1 task: rank 1's shard is empty) and distillation plays skill-guided rollouts
    from envs import make_envs
    cfg = config.load_config(None, tiny_overrides(out, cache))
    with make_envs(cfg.env) as envs:
        task_type = envs.task_type(envs.task_ids("train")[0])
    skill = mining.Skill(name="demo", task_type=task_type, when_to_use="always",
                         steps=["go to <recep>", "take <obj> from <recep>"], pitfalls=[], status="validated")
    initial = mining.SkillBank(str(tmp_path / "bank"), [skill]).save(0)
    script = tmp_path / "audited_siri.py"
    script.write_text(AUDIT)
    # distill.tasks_per_iter = 6: every pool task (one per type), so the skill's type is played with it
    args = tiny_overrides(out, cache, **{"run.rounds": 1, "mining.margin": -1.0, "mining.initial_bank": initial,
                                         "distill.tasks_per_iter": 6})
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                           "--master_port", str(free_port()), str(script), str(out), str(tmp_path / "rank"),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    logs = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(WORLD)]
    assert all(log["done"] == log["units"] for log in logs)
    assert logs[1]["writes"] == [], logs[1]["writes"][:5]
    assert (out / "results.md").exists() and (out / "curves.png").exists()
    assert (out / "checkpoint" / "COMPLETE").exists() and (out / "coldstart_model" / "COMPLETE").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["unit"] for r in rows] == sorted(r["unit"] for r in rows)
    mined = next(r for r in rows if r["phase"] == "mining")
    assert f"mining/delta_g/{task_type}" in mined
    bank = mining.SkillBank.load(str(out / "skills" / "skills_round_00.json"))
    assert bank.skills[0].utility[-1]["n_pairs"] == 1 * 2  # M × G pairs, all on rank 0's shard
    dist_row = next(r for r in rows if r["phase"] == "distill" and r["arm"] == "siri")
    assert "distill/skill_success" in dist_row and dist_row["distill/optimizer_steps"] == 1
    warm = next(r for r in rows if r["phase"] == "warmup")
    assert warm["warmup/pg_tokens"] > 0 and warm["warmup/optimizer_steps"] == 1


def test_a_one_process_run_resumes_on_two_ranks(tmp_path):
    """SIGKILL a single-process run mid-warmup, then --resume it under torchrun with 2 ranks:
    a checkpoint holds no per-rank state, so the run continues at the next unit and finishes."""
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = tiny_overrides(out, cache, **{"warmup.iterations": 3, "run.rounds": 0, "coldstart.epochs": 2})
    kill_after_first_warmup_row(run_cli(args), out)
    state = out / "checkpoint" / "state.pkl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                           "--master_port", str(free_port()), str(ROOT / "siri.py"), "--resume", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = re.search(r"resumed at unit (\d+)/", proc.stdout)
    assert resumed, proc.stdout[-2000:]
    done_before = int(resumed.group(1))
    final = pickle.loads(state.read_bytes())
    assert final["done"] == len(siri.build_units(config.load_config(None, args))) > done_before
    assert (out / "checkpoint" / "COMPLETE").exists() and {"gigpo", "siri"} <= set(final["evals"])
