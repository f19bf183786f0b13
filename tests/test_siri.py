"""The SIRI loop: config validation, one update, end-to-end runs, resume after a kill."""
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import config
import core
import gigpo
import mining
import siri
from envs import embedded_task_ids, make_envs
from model import ModelConfig, load_policy

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(out_dir, cache_dir, **extra) -> list[str]:
    """A whole SIRI run in seconds: few small games, short episodes, one iteration per phase."""
    o = {
        "run.out_dir": str(out_dir), "run.threads": 1,
        "env.alfworld.cache_dir": str(cache_dir), "env.alfworld.num_train_tasks": 6, "env.alfworld.eval_per_type": 1, "env.max_steps": 4,
        "env.alfworld.receptacles": 4, "env.alfworld.distractors": 1,
        "model.tiny_dir": str(cache_dir / "tiny"),
        "rollout.max_new_tokens": 20, "eval.max_tasks": 6,
        "coldstart.tasks": 3, "coldstart.epochs": 2,
        "warmup.iterations": 1, "warmup.tasks_per_iter": 2, "gigpo.group_size": 2, "gigpo.minibatches": 1,
        "mining.validation_tasks": 1, "mining.validation_group": 2, "mining.trajectories_per_skill": 1,
        "distill.iterations": 1, "distill.tasks_per_iter": 1,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("siri_cache")


# --- configuration ----------------------------------------------------------------------------

def test_unknown_key_names_the_key_and_suggests_the_fix():
    with pytest.raises(config.ConfigError, match=r"unknown config key 'gigpo.gama' — did you mean 'gigpo.gamma'"):
        config.load_config(None, ["gigpo.gama=0.9"])
    with pytest.raises(config.ConfigError, match="unknown config key 'warmpu'"):
        config.load_config(None, ["warmpu.iterations=3"])
    # a key of an earlier version says where it lives now, on the command line and in a file's section
    with pytest.raises(config.ConfigError, match=r"'env.receptacles' is now 'env.alfworld.receptacles'"):
        config.load_config(None, ["env.receptacles=6"])
    with pytest.raises(config.ConfigError, match=r"'env.webshop_path' is now 'env.webshop.path'"):
        config.load_config(None, ["env={webshop_path: /x}"])


def test_mistyped_values_are_clear_errors():
    with pytest.raises(config.ConfigError, match="config key 'warmup.iterations': expected int"):
        config.load_config(None, ["warmup.iterations=many"])
    with pytest.raises(config.ConfigError, match="expected true/false"):
        config.load_config(None, ["model.qlora=maybe"])
    with pytest.raises(config.ConfigError, match="is a section"):
        config.load_config(None, ["gigpo=3"])
    with pytest.raises(config.ConfigError, match="unknown preset"):
        config.load_config(None, ["preset=huge"])
    with pytest.raises(config.ConfigError, match="section 'mining'"):
        config.load_config(None, ["mining.summariser=oracle"])
    # enums and ranges are checked when the config loads, not at the first update
    for bad, key in [("gigpo.norm=zscore", "gigpo.norm"), ("gigpo.kl_estimator=k9", "gigpo.kl_estimator"),
                     ("gigpo.loss_agg=foo", "gigpo.loss_agg"), ("gigpo.group_size=0", "gigpo.group_size"),
                     ("distill.advantage_reference=plain", "distill.advantage_reference"),
                     ("gigpo_defaults=verl", "gigpo_defaults"),
                     ("env.alfworld.receptacles=0", "section 'env.alfworld'.*receptacles"),  # nested sections too
                     ("env.webshop.num_eval_goals=-1", "section 'env.webshop'.*num_eval_goals"),
                     ("coldstart.rename=2", "coldstart.rename")]:
        with pytest.raises(config.ConfigError, match=key):
            config.load_config(None, [bad])


def test_gigpo_defaults_switch_to_the_public_code_and_overrides_still_win():
    ours, verl = (config.load_config(None, [f"gigpo_defaults={d}"]) for d in ("ours", "verl-agent"))
    assert (ours.gigpo.invalid_penalty_mode, ours.gigpo.episode_stats, ours.gigpo.entropy_coef) == ("reward", "trajectory", 0.0)
    assert (verl.gigpo.invalid_penalty_mode, verl.gigpo.episode_stats, verl.gigpo.entropy_coef,
            verl.gigpo.old_logprobs, verl.gigpo.clip_ratio_c) == ("row", "step", 0.001, "recompute", 3.0)
    assert verl.gigpo.lr == ours.gigpo.lr  # the preset's other settings are untouched
    assert config.load_config(None, ["gigpo_defaults=verl-agent", "gigpo.entropy_coef=0"]).gigpo.entropy_coef == 0.0


def test_coldstart_games_after_the_pool_are_games_rl_never_plays():
    """cpu preset: the cold start's games follow the RL pool, so warmup, mining and validation
    play games it never showed; where that cannot hold, the preset falls back to the first games
    and an explicit setting is an error that names the fix."""
    cfg = config.load_config(None, [])
    assert cfg.coldstart.games == "after_pool"

    class Ids:  # the embedded games' ids, without generating 144 games
        def task_ids(self, split):
            return embedded_task_ids(cfg.env, split)

    pool, games = siri.training_pool(Ids(), cfg), siri.coldstart_games(Ids(), cfg)
    assert len(pool) == cfg.warmup.task_pool and len(games) == cfg.coldstart.tasks and not set(pool) & set(games)
    first = siri.coldstart_games(Ids(), dataclasses.replace(cfg, coldstart=dataclasses.replace(cfg.coldstart, games="pool")))
    assert first == pool[:cfg.coldstart.tasks]
    assert config.load_config(None, ["env.alfworld.num_train_tasks=6"]).coldstart.games == "pool"
    assert config.load_config(None, ["env=webshop"]).coldstart.games == "pool"
    with pytest.raises(config.ConfigError, match="env.alfworld.num_train_tasks >= .* = 144, not 100; set that, or coldstart.games=pool"):
        config.load_config(None, ["env.alfworld.num_train_tasks=100", "coldstart.games=after_pool"])
    with pytest.raises(config.ConfigError, match=r"warmup.task_pool > 0"):
        config.load_config(None, ["warmup.task_pool=0", "coldstart.games=after_pool"])


def test_overrides_presets_yaml_and_env_shorthand(tmp_path):
    cfg = config.load_config(None, ["gigpo.clip_eps=3e-1", "warmup.iterations=7"])
    assert cfg.gigpo.clip_eps == 0.3 and cfg.warmup.iterations == 7 and cfg.model.name == "tiny"
    assert config.load_config(None, ["preset=qwen1.5b"]).model.name == "Qwen/Qwen2.5-1.5B-Instruct"
    web = config.load_config(None, ["env=webshop"])
    assert web.env.name == "webshop" and web.env.max_steps == 15
    assert cfg.coldstart.rename == 0.5 and web.coldstart.rename == 0  # renamed rooms are ALFWorld's
    with pytest.raises(config.ConfigError, match="set coldstart.rename=0 for env.name=webshop"):
        config.load_config(None, ["env=webshop", "coldstart.rename=0.5"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"gigpo": {"omega": 0.5}, "run": {"seed": 3}}))
    cfg = config.load_config(str(path), ["run.seed=4"])
    assert cfg.gigpo.omega == 0.5 and cfg.run.seed == 4  # the command line wins over the file
    path.write_text(yaml.safe_dump({"gigpo": {"omgea": 0.5}}))
    with pytest.raises(config.ConfigError, match="gigpo.omgea"):
        config.load_config(str(path), [])


def test_config_yaml_is_generated_from_the_dataclass_defaults():
    assert (ROOT / "config.yaml").read_text() == config.config_reference(), "run: python siri.py --write-config"


def test_shipped_config_yaml_loads():
    cfg = config.load_config(str(ROOT / "config.yaml"), [])
    assert cfg.gigpo.gamma == 0.95 and cfg.gigpo.group_size >= 2


def test_main_reports_config_errors_without_traceback():
    with pytest.raises(SystemExit, match="config error: unknown config key 'run.sed'"):
        siri.main(["run.sed=1"])


# --- the cold start's learning-rate schedule -----------------------------------------------------

def test_cosine_schedule_warms_up_then_decays_to_zero():
    # 100 steps: warm-up over round(0.05 * 100) = 5 steps, then cos over the remaining 95 + 1
    assert siri.lr_factor(0, 100, "cosine") == pytest.approx(1 / 5)
    assert siri.lr_factor(4, 100, "cosine") == pytest.approx(1.0)
    assert siri.lr_factor(52, 100, "cosine") == pytest.approx(0.5)  # (52 - 5 + 1) / 96 = 1/2
    assert siri.lr_factor(99, 100, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi / 96)))
    assert siri.lr_factor(99, 100, "constant") == 1.0


def test_coldstart_applies_its_schedule(cache):
    """The last SFT step runs at the schedule's rate: near 0 for cosine, the full lr for constant."""
    last = {}
    for schedule in ("constant", "cosine"):
        torch.manual_seed(0)
        cfg = config.load_config(None, tiny_overrides(cache / "unused", cache, **{"coldstart.epochs": 8})
                                   + [f"coldstart.schedule={schedule}"])
        envs = make_envs(cfg.env)
        try:
            pol = load_policy(cfg.model, device="cpu", corpus=lambda: siri.corpus_for_tokenizer(envs))
            stats = siri.coldstart(pol, envs, cfg, seed=0)
        finally:
            envs.close()
        last[schedule] = stats["coldstart/lr_last"]
    steps = cfg.coldstart.epochs * -(-stats["coldstart/samples"] // cfg.coldstart.batch_size)
    assert last["constant"] == pytest.approx(cfg.coldstart.lr)
    assert last["cosine"] == pytest.approx(cfg.coldstart.lr * siri.lr_factor(steps - 1, steps, "cosine"))
    assert last["cosine"] < 0.5 * cfg.coldstart.lr, last


def test_coldstart_shows_renamed_rooms_consistently_at_its_rate(cache):
    """coldstart.rename: a renamed row's answer is still one of its own prompt's admissible actions
    (names and numbers renamed alike in both), every row is renamed at rate 1, about half at 0.5,
    none at 0 (the rows are then the plain samples themselves, in the shuffled order)."""
    cfg = config.load_config(None, tiny_overrides(cache / "unused", cache))
    envs = make_envs(cfg.env)
    try:
        pol = load_policy(cfg.model, device="cpu", corpus=lambda: siri.corpus_for_tokenizer(envs))
        texts, _ = siri.coldstart_texts(envs, envs.task_ids("train")[:3], cfg.coldstart, cfg.mining, seed=0)
    finally:
        envs.close()
    samples = [siri.sft_sample(pol, p, t) for p, t in texts]
    order = list(range(len(samples)))
    plain_rows = siri.epoch_samples(pol, texts, samples, order, 0.0, random.Random(0))
    assert plain_rows == [samples[i] for i in order] and order != sorted(order)  # shuffled, nothing renamed
    order = list(range(len(samples)))
    renamed = siri.epoch_samples(pol, texts, samples, order, 1.0, random.Random(0))
    for row, plain in zip(renamed, [samples[i] for i in order]):
        prompt, answer = pol.tokenizer.decode(row.prompt_ids), pol.tokenizer.decode(row.response_ids[:-1])
        assert prompt != pol.tokenizer.decode(plain.prompt_ids)
        assert core.extract_action(answer) in prompt.split("Admissible actions: ")[1].split("\n")[0].split(" | ")
    order = list(range(len(samples)))
    half = siri.epoch_samples(pol, texts, samples, order, 0.5, random.Random(0))
    assert 0.25 < sum(a != samples[i] for a, i in zip(half, order)) / len(samples) < 0.75, len(samples)


# --- one update: LoRA moves, the base does not ---------------------------------------------------

def test_update_moves_every_lora_parameter_and_no_base_weight(cache):
    torch.manual_seed(0)
    policy = load_policy(ModelConfig(name="tiny", dtype="float32", tiny_dir=str(cache / "tiny_u")), device="cpu")
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    prompt = policy.chat_ids("go to the fridge")
    samples = [core.Sample(prompt, [5, 6, 7], [-7.0, -7.0, -7.0], +1.0),
               core.Sample(prompt[:-2], [8, 9], [-7.0, -7.0], -1.0)]
    cfg = gigpo.GiGPOConfig(lr=1e-2, beta_kl=0.01)
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=cfg.lr)
    # Two updates: LoRA's B starts at zero, so A receives its first gradient on the second one.
    for seed in (0, 1):
        stats = gigpo.update(policy, opt, samples, cfg, seed=seed)
        assert stats["optimizer_steps"] == 1 and stats["skipped_nonfinite"] == 0
    changed = {n: not torch.equal(before[n], p) for n, p in policy.model.named_parameters()}
    lora = [n for n in changed if "lora_" in n]
    assert lora and all(changed[n] for n in lora), [n for n in lora if not changed[n]]
    assert not any(changed[n] for n in changed if "lora_" not in n)


def test_nonfinite_loss_skips_the_update(cache):
    policy = load_policy(ModelConfig(name="tiny", dtype="float32", tiny_dir=str(cache / "tiny_u")), device="cpu")
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    prompt = policy.chat_ids("look")
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
    stats = gigpo.update(policy, opt, [core.Sample(prompt, [5, 6], [0.0, 0.0], float("nan"))],
                         gigpo.GiGPOConfig(), seed=0)
    assert stats["skipped_nonfinite"] == 1 and stats["optimizer_steps"] == 0
    assert all(torch.equal(before[n], p) for n, p in policy.model.named_parameters() if p.requires_grad)


def test_recomputed_old_logprobs_make_the_first_ratio_one(cache):
    """gigpo.old_logprobs: with wrong sampler log-probs (-1; the random model gives ~ -8), "sampler" starts the PPO ratio far
    from 1 (clipped tokens); "recompute" re-scores π_old first, so no token is clipped."""
    policy = load_policy(ModelConfig(name="tiny", dtype="float32", tiny_dir=str(cache / "tiny_u")), device="cpu")
    prompt = policy.chat_ids("go to the fridge")
    samples = [core.Sample(prompt, [5, 6, 7], [-1.0, -1.0, -1.0], 1.0), core.Sample(prompt, [8, 9], [-1.0, -1.0], -1.0)]
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    out = {}
    for mode in ("sampler", "recompute"):
        opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-3)
        out[mode] = gigpo.update(policy, opt, samples, gigpo.GiGPOConfig(old_logprobs=mode), seed=0)
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if n in before:
                    p.copy_(before[n])
    assert out["sampler"]["clip_frac"] == 1.0 and "old_prob_diff_max" not in out["sampler"]
    assert out["recompute"]["clip_frac"] == 0.0 and out["recompute"]["old_prob_diff_max"] > 0
    assert gigpo.old_logprobs_source(gigpo.GiGPOConfig(), torch.device("cpu")) == "sampler"
    assert gigpo.old_logprobs_source(gigpo.GiGPOConfig(), torch.device("cuda")) == "recompute"


def test_one_distillation_step_raises_its_action_and_moves_other_responses_less(cache):
    """One update on one distillation sample raises log π(a | plain prompt) of its tokens, and
    moves the log-probs of unrelated (prompt, response) pairs by less than it raised them."""
    torch.manual_seed(0)
    policy = load_policy(ModelConfig(name="tiny", dtype="float32", tiny_dir=str(cache / "tiny_u")), device="cpu")
    plain, action = policy.chat_ids("you see a fridge 1"), [11, 12, 13]
    with torch.no_grad():
        sampler = policy.score([plain], [action], 4096)[0].tolist()
    others = [(policy.chat_ids(f"task {k}: look around"), [20 + k, 30 + k]) for k in range(6)]

    def logps():
        with torch.no_grad():
            lp = policy.score([plain] + [p for p, _ in others], [action] + [r for _, r in others], 4096)
        return lp[0].sum().item(), torch.cat(lp[1:])

    # two steps: LoRA's B starts at zero, so the first step only moves B
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
    target0, others0 = logps()
    for seed in (0, 1):
        stats = gigpo.update(policy, opt, [core.Sample(plain, action, sampler, 1.0, "distill")],
                             gigpo.GiGPOConfig(), siri.distill.DistillConfig(), seed=seed)
        assert stats["distill_tokens"] == 3 and stats["optimizer_steps"] == 1
    target1, others1 = logps()
    rise = (target1 - target0) / len(action)
    assert rise > 0, (target0, target1)
    assert (others1 - others0).abs().mean().item() < rise
    with pytest.raises(ValueError, match="distill_cfg"):
        gigpo.update(policy, opt, [core.Sample(plain, action, sampler, 1.0, "distill")], gigpo.GiGPOConfig())


# --- inference uses the plain prompt only ------------------------------------------------------

def test_evaluation_prompt_contains_no_skill_text(cache, monkeypatch):
    cfg = config.load_config(None, tiny_overrides(cache / "unused", cache))
    envs = make_envs(cfg.env)
    policy = load_policy(cfg.model, device="cpu", corpus=lambda: siri.corpus_for_tokenizer(envs, n_tasks=3))
    skill = mining.Skill(name="fridge-first", task_type="pick_and_place_simple", when_to_use="always",
                         steps=["SKILLMARKER open the fridge"], pitfalls=["none"], status="validated")
    seen = []
    original = envs.build_prompt

    def spy(state, history, skill=None):
        text = original(state, history, skill)
        seen.append((skill, text))
        return text

    monkeypatch.setattr(envs, "build_prompt", spy)
    siri.evaluate(policy, envs, cfg, seed=0)
    assert seen and all(s is None and "SKILLMARKER" not in text for s, text in seen)
    assert "SKILLMARKER" in original(envs.reset(envs.task_ids("eval")[:1])[0], [], skill.text())
    envs.close()


def test_results_table_names_a_base_model_that_is_not_the_tiny_one():
    e = {"eval/success": 0.5, "eval/steps": 3.0, "eval/invalid_rate": 0.25, "eval/success/pick": 0.5}
    assert "| base model | 0.500 | 0.500 | 3.0 | 0.250 |" in siri.results_table({"base": e})
    assert "| base model (runs/s/seed_0/coldstart_model) | 0.500 |" in siri.results_table(
        {"base": e, "warmup": e}, "runs/s/seed_0/coldstart_model")


# --- whole runs ---------------------------------------------------------------------------------

def test_full_run_end_to_end_writes_table_bank_plot_and_metrics(cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    used = []  # the advantages each update trained on, in call order
    real_update = gigpo.update

    def spy(policy, optimizer, samples, *a, **kw):
        used.append(sorted(round(s.advantage, 6) for s in samples if s.kind == "pg"))
        return real_update(policy, optimizer, samples, *a, **kw)

    monkeypatch.setattr(gigpo, "update", spy)
    result = siri.main(tiny_overrides(out, cache, **{"coldstart.epochs": 30}))
    assert result["done"] == result["units"]
    # trajectories.jsonl: run.log_groups groups per training iteration, with the advantages the update used
    rows = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    train_units = sorted({r["unit"] for r in rows if r["phase"] in ("warmup", "distill")})
    assert len(train_units) == len(used) and all(r["steps"] for r in rows)
    for unit, advantages in zip(train_units, used):
        plain = [r for r in rows if r["unit"] == unit and r["skill_id"] is None]
        assert 1 <= len({r["group"] for r in plain}) <= 2  # run.log_groups = 2
        for s in (s for r in plain for s in r["steps"]):
            assert s["A"] == pytest.approx(s["A_E"] + s["A_S"])  # Eq. 9, ω = 1
            assert round(s["A"], 6) in advantages
    shown = siri.main(["show", f"run.out_dir={out}", f"unit={train_units[0]}"])
    assert shown == {} and (out / f"group_u{train_units[0]:03d}_g0.png").stat().st_size > 5000
    assert set(result["evals"]) == {"base", "coldstart", "warmup", "gigpo", "siri"}
    report = (out / "results.md").read_text()
    for label in ("base model", "after GiGPO warmup", "GiGPO-continued (control)", "SIRI (Phases 1-2)"):
        assert f"| {label} |" in report
    assert "| siri (all) |" in report  # the paired SIRI − GiGPO difference
    assert (out / "curves.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "skills").glob("skills_round_*.json")) == ["skills_round_00.json"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"warmup/success", "eval/success", "distill/success", "mining/candidates"} <= keys
    assert [r["unit"] for r in rows] == sorted(r["unit"] for r in rows)
    assert (out / "checkpoint" / "COMPLETE").exists() and (out / "config.yaml").exists()
    with pytest.raises(SystemExit, match="--resume"):  # never silently overwrite a finished run
        siri.main(tiny_overrides(out, cache))


def test_webshop_runs_end_to_end(cache, tmp_path):
    out = tmp_path / "web"
    result = siri.main(tiny_overrides(out, cache, env="webshop", **{"env.max_steps": 4, "env.webshop.num_eval_goals": 6}))
    assert result["done"] == result["units"]
    assert "eval/score" in result["evals"]["siri"]


def run_cli(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "siri.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def kill_after_first_warmup_row(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL a siri.py run once a checkpoint exists and a warmup row is logged (mid-warmup)."""
    state = out / "checkpoint" / "state.pkl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        rows = (out / "metrics.jsonl").read_text().splitlines() if state.exists() else []
        if any('"phase": "warmup"' in r for r in rows):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_matches_an_uninterrupted_run(cache, tmp_path):
    """SIGKILL mid-warmup, --resume, and the final weights equal those of a run never killed."""
    extra = {"warmup.iterations": 3, "run.rounds": 0, "coldstart.epochs": 2}
    straight = run_cli(tiny_overrides(tmp_path / "a", cache, **extra))
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()[-3000:]

    kill_after_first_warmup_row(run_cli(tiny_overrides(tmp_path / "b", cache, **extra)), tmp_path / "b")
    resumed = run_cli(["--resume", *tiny_overrides(tmp_path / "b", cache, **extra)])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-3000:]

    a = torch.load(tmp_path / "a" / "checkpoint" / "training.pt", weights_only=False)["trainable"]
    b = torch.load(tmp_path / "b" / "checkpoint" / "training.pt", weights_only=False)["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def units(run):
        return [(r["unit"], r["phase"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert units("b") == units("a")  # the rows of the unit cut short were dropped on resume, none doubled


def test_ablation_switches():
    assert config.load_config(None, ["run.ablation=random_skills"]).mining.summariser == "random"
    # the selection ablations change what is distilled: a guided group with one winner and one
    # loser against a plain group that wins half the time
    from test_distill import make_traj
    skill = [make_traj("t@0", 0, [0.0, 10.0], ["o0", "o1"]), make_traj("t@0", 1, [0.0, 0.0], ["o0", "o2"])]
    plain = [make_traj("t@0", 0, [0.0, 10.0], ["o0", "o1"], skill=False), make_traj("t@0", 1, [0.0, 0.0], ["o0", "o3"], skill=False)]
    kept = {}
    for ablation in ("none", "no_utility_filter", "no_selection"):
        cfg = config.load_config(None, [f"run.ablation={ablation}"])
        kept[ablation] = siri.distill.distill_samples(skill, plain, cfg.gigpo, cfg.distill)[1]["distill/tokens_kept"]
    assert kept == {"none": 4, "no_utility_filter": 4, "no_selection": 8}
    plain, ablated = (siri.build_units(config.load_config(None, [f"run.ablation={a}", "run.rounds=2"]))
                      for a in ("none", "no_mining"))
    assert [u for u in plain if u[0] != "mining"] == ablated  # same update iterations, no mining
    assert sum(u[0] == "mining" for u in plain) == 2
    with pytest.raises(config.ConfigError, match="run.ablation='no_skills': choose one of"):
        config.load_config(None, ["run.ablation=no_skills"])
