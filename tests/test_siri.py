"""The SIRI loop: config validation, one update, end-to-end runs, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import gigpo
import mining
import siri
from envs import EnvConfig, make_envs
from policy import ModelConfig, load_policy

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(out_dir, cache_dir, **extra) -> list[str]:
    """A whole SIRI run in seconds: few small games, short episodes, one iteration per phase."""
    o = {
        "run.out_dir": str(out_dir), "run.threads": 1,
        "env.cache_dir": str(cache_dir), "env.num_train_tasks": 6, "env.eval_per_type": 1, "env.max_steps": 4,
        "env.receptacles": 4, "env.distractors": 1,
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
    with pytest.raises(siri.ConfigError, match=r"unknown config key 'gigpo.gama' — did you mean 'gigpo.gamma'"):
        siri.load_config(None, ["gigpo.gama=0.9"])
    with pytest.raises(siri.ConfigError, match="unknown config key 'warmpu'"):
        siri.load_config(None, ["warmpu.iterations=3"])


def test_mistyped_values_are_clear_errors():
    with pytest.raises(siri.ConfigError, match="config key 'warmup.iterations': expected int"):
        siri.load_config(None, ["warmup.iterations=many"])
    with pytest.raises(siri.ConfigError, match="expected true/false"):
        siri.load_config(None, ["model.qlora=maybe"])
    with pytest.raises(siri.ConfigError, match="is a section"):
        siri.load_config(None, ["gigpo=3"])
    with pytest.raises(siri.ConfigError, match="unknown preset"):
        siri.load_config(None, ["preset=huge"])
    with pytest.raises(siri.ConfigError, match="section 'mining'"):
        siri.load_config(None, ["mining.summariser=oracle"])


def test_overrides_presets_yaml_and_env_shorthand(tmp_path):
    cfg = siri.load_config(None, ["gigpo.clip_eps=3e-1", "warmup.iterations=7"])
    assert cfg.gigpo.clip_eps == 0.3 and cfg.warmup.iterations == 7 and cfg.model.name == "tiny"
    assert siri.load_config(None, ["preset=qwen1.5b"]).model.name == "Qwen/Qwen2.5-1.5B-Instruct"
    web = siri.load_config(None, ["env=webshop"])
    assert web.env.name == "webshop" and web.env.max_steps == 15
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"gigpo": {"omega": 0.5}, "run": {"seed": 3}}))
    cfg = siri.load_config(str(path), ["run.seed=4"])
    assert cfg.gigpo.omega == 0.5 and cfg.run.seed == 4  # the command line wins over the file
    path.write_text(yaml.safe_dump({"gigpo": {"omgea": 0.5}}))
    with pytest.raises(siri.ConfigError, match="gigpo.omgea"):
        siri.load_config(str(path), [])


def test_config_yaml_is_generated_from_the_dataclass_defaults():
    assert (ROOT / "config.yaml").read_text() == siri.config_reference(), "run: python siri.py --write-config"


def test_shipped_config_yaml_loads():
    cfg = siri.load_config(str(ROOT / "config.yaml"), [])
    assert cfg.gigpo.gamma == 0.95 and cfg.gigpo.group_size >= 2


def test_main_reports_config_errors_without_traceback():
    with pytest.raises(SystemExit, match="config error: unknown config key 'run.sed'"):
        siri.main(["run.sed=1"])


# --- one update: LoRA moves, the base does not ---------------------------------------------------

def test_update_moves_every_lora_parameter_and_no_base_weight(cache):
    torch.manual_seed(0)
    policy = load_policy(ModelConfig(name="tiny", dtype="float32", tiny_dir=str(cache / "tiny_u")), device="cpu")
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    prompt = policy.chat_ids("go to the fridge")
    samples = [gigpo.Sample(prompt, [5, 6, 7], [-7.0, -7.0, -7.0], +1.0),
               gigpo.Sample(prompt[:-2], [8, 9], [-7.0, -7.0], -1.0)]
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
    stats = gigpo.update(policy, opt, [gigpo.Sample(prompt, [5, 6], [0.0, 0.0], float("nan"))],
                         gigpo.GiGPOConfig(), seed=0)
    assert stats["skipped_nonfinite"] == 1 and stats["optimizer_steps"] == 0
    assert all(torch.equal(before[n], p) for n, p in policy.model.named_parameters() if p.requires_grad)


# --- inference uses the plain prompt only ------------------------------------------------------

def test_evaluation_prompt_contains_no_skill_text(cache, monkeypatch):
    cfg = siri.load_config(None, tiny_overrides(cache / "unused", cache))
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


# --- whole runs ---------------------------------------------------------------------------------

def test_full_run_end_to_end_writes_table_bank_plot_and_metrics(cache, tmp_path):
    out = tmp_path / "run"
    result = siri.main(tiny_overrides(out, cache, **{"coldstart.epochs": 30}))
    assert result["done"] == result["units"]
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
    result = siri.main(tiny_overrides(out, cache, env="webshop", **{"env.max_steps": 4, "env.num_eval_goals": 6}))
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
    assert siri.load_config(None, ["run.ablation=random_skills"]).mining.summariser == "random"
    cfg = siri.load_config(None, ["run.ablation=no_selection"])
    assert not cfg.distill.utility_filter and not cfg.distill.advantage_filter
    cfg = siri.load_config(None, ["run.ablation=no_utility_filter"])
    assert not cfg.distill.utility_filter and cfg.distill.advantage_filter
    plain, ablated = (siri.build_units(siri.load_config(None, [f"run.ablation={a}", "run.rounds=2"]))
                      for a in ("none", "no_mining"))
    assert [u for u in plain if u[0] != "mining"] == ablated  # same update iterations, no mining
    assert sum(u[0] == "mining" for u in plain) == 2
    with pytest.raises(siri.ConfigError, match="run.ablation='no_skills': choose one of"):
        siri.load_config(None, ["run.ablation=no_skills"])
