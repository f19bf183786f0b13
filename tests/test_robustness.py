"""A run that a typo, a kill, a second launch or a NaN cannot break: each bullet of the
robustness checklist (README, "Robustness") fails at start-up or in seconds here."""
import dataclasses
import json
import os
import pickle
import signal
import time

import pytest
import torch

import config
import core
import siri
from envs import EnvWorkerDied, make_envs
from test_siri import ROOT, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("robust_cache")


def test_yaml_on_off_is_accepted_where_documented(tmp_path):
    assert config.load_config(None, ["coldstart.enabled=off"]).coldstart.enabled == "off"
    (tmp_path / "c.yaml").write_text("coldstart:\n  enabled: on\n")
    assert config.load_config(str(tmp_path / "c.yaml"), []).coldstart.enabled == "on"
    with pytest.raises(config.ConfigError, match="coldstart.enabled='maybe'"):
        config.load_config(None, ["coldstart.enabled=maybe"])


def test_constrained_actions_are_alfworld_only_and_need_our_engine():
    """The cpu preset constrains actions; WebShop (search[...] takes any query) turns it off unless
    asked for it by name, which is an error naming the key; so is the HF engine with it on."""
    assert config.load_config(None, []).rollout.constrain_actions
    assert not config.load_config(None, ["env=webshop"]).rollout.constrain_actions
    with pytest.raises(config.ConfigError, match="rollout.constrain_actions=false for env.name=webshop"):
        config.load_config(None, ["env=webshop", "rollout.constrain_actions=true"])
    with pytest.raises(config.ConfigError, match="rollout.engine=custom"):
        config.load_config(None, ["rollout.engine=hf"])
    assert not config.load_config(None, ["rollout.engine=hf", "rollout.constrain_actions=false"]).rollout.constrain_actions


def test_a_run_of_an_earlier_version_resumes_with_the_new_key_at_its_default():
    """A saved config without rollout.constrain_actions (written before the key existed) resumes
    when the key is given as false, what that version did, and not with the preset's true."""
    import dataclasses

    saved = dataclasses.asdict(config.load_config(None, []))
    del saved["rollout"]["constrain_actions"]
    assert siri.config_changes(saved, dataclasses.asdict(config.load_config(None, ["rollout.constrain_actions=false"]))) == []
    assert siri.config_changes(saved, dataclasses.asdict(config.load_config(None, []))) == \
        ["rollout.constrain_actions: False -> True"]


def test_expected_errors_are_one_line_and_leave_nothing_behind(cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # missing real ALFWorld data
        siri.main(tiny_overrides(out, cache, **{"env.source": "real", "env.alfworld.data_path": str(tmp_path / "nowhere")}))
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code).strip()
    assert not out.exists()  # no config.yaml, no lock, no folder
    with pytest.raises(SystemExit, match="^error: .*model"):  # a model that cannot load
        siri.main(tiny_overrides(out, cache, **{"model.name": str(tmp_path / "no_model")}))
    assert not out.exists()


def test_a_fresh_run_refuses_a_folder_with_a_previous_runs_artefacts(cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.old").mkdir()  # a kill between the checkpoint renames leaves only this
    with pytest.raises(SystemExit, match="holds a previous run \\(checkpoint.old\\).*--resume"):
        siri.main(tiny_overrides(out, cache))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.old"]  # untouched


def test_damaged_checkpoint_and_half_written_bank_are_one_line(cache, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint" / "adapter").mkdir(parents=True)
    (out / "checkpoint" / "COMPLETE").write_text("ok")
    (out / "checkpoint" / "training.pt").write_bytes(b"PK\x03\x04 truncated")
    (out / "checkpoint" / "state.pkl").write_bytes(b"\x80\x04garbled")
    with pytest.raises(SystemExit, match="^error: --resume: the checkpoint .* is damaged"):
        siri.main(["--resume", *tiny_overrides(out, cache)])
    # a checkpoint of the version that had policy.py (its pickled trajectories name that module)
    old = tmp_path / "old_version"
    (old / "checkpoint" / "adapter").mkdir(parents=True)
    (old / "checkpoint" / "COMPLETE").write_text("ok")
    (old / "checkpoint" / "state.pkl").write_bytes(b"cpolicy\nTrajectory\n.")
    with pytest.raises(SystemExit, match="^error: --resume: the checkpoint .* earlier version .*'policy'"):
        siri.main(["--resume", *tiny_overrides(old, cache)])
    bank = tmp_path / "skills_round_00.json"
    bank.write_text('{"round": 0, "skills": [{"id": "x", "name": ')  # cut mid-write
    with pytest.raises(SystemExit, match="config error: .*initial_bank.*not a readable skill bank"):
        siri.main(tiny_overrides(tmp_path / "other", cache, **{"mining.initial_bank": str(bank)}))


def test_atomic_writes_leave_the_old_content_and_no_temp_file_when_they_fail(tmp_path, monkeypatch):
    path, folder = tmp_path / "a.json", tmp_path / "folder"
    core.atomic_write(path, "old")
    with core.atomic_dir(folder) as tmp:
        (tmp_path / tmp / "x").write_text("1")

    def disk_full(*args):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(core.os, "replace", disk_full)
        with pytest.raises(OSError, match="disk full"):
            core.atomic_write(path, "new")
    with pytest.raises(RuntimeError, match="killed half-way"):
        with core.atomic_dir(folder) as tmp:
            (tmp_path / tmp / "x").write_text("2")
            raise RuntimeError("killed half-way")
    assert path.read_text() == "old" and (folder / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "folder"]  # no temp file or folder left


def test_a_second_run_on_a_locked_folder_stops(cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    held = siri.lock_run_dir(out)  # as a running siri.py holds it
    try:
        with pytest.raises(SystemExit, match="another run is using"):
            siri.main(tiny_overrides(out, cache))
    finally:
        held.close()
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_resume_refuses_changed_settings_and_metrics_without_checkpoint(tmp_path):
    cfg = config.load_config(None, [f"run.out_dir={tmp_path}"])
    state = siri.RunState(done=2, config=dataclasses.asdict(cfg))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"unit": u, "phase": "x"}) + "\n" for u in range(3)))
    siri.check_resume(tmp_path, state, cfg)  # same settings: fine
    siri.check_resume(tmp_path, state, dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=4)))
    changed = config.load_config(None, [f"run.out_dir={tmp_path}", "gigpo.group_size=4", "gigpo.lr=1000"])
    with pytest.raises(siri.RunError, match=r"Changed: gigpo.group_size: 8 -> 4; gigpo.lr: 0.003 -> 1000.0"):
        siri.check_resume(tmp_path, state, changed)
    with pytest.raises(siri.RunError, match="no complete checkpoint"):  # e.g. checkpoint/COMPLETE lost
        siri.check_resume(tmp_path, None, cfg)
    metrics.write_text(json.dumps({"unit": 0, "phase": "x"}) + "\n")  # killed before the first checkpoint
    siri.check_resume(tmp_path, None, cfg)
    metrics.write_text(json.dumps({"unit": 0, "phase": "x"}) + "\n")
    with pytest.raises(siri.RunError, match="disagree"):
        siri.check_resume(tmp_path, state, cfg)


def test_a_nonfinite_cold_start_stops_and_saves_nothing(cache, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="^error: cold start: non-finite"):
        siri.main(tiny_overrides(out, cache, **{"coldstart.lr": 1e3, "coldstart.epochs": 4}))
    assert not (out / "coldstart_model").exists()  # the last checkpoint is the one before the cold start
    assert pickle.loads((out / "checkpoint" / "state.pkl").read_bytes())["done"] == 1


def test_consecutive_skipped_updates_stop_the_run():
    cfg = config.load_config(None, ["run.max_skipped_updates=3"])
    state, unit = siri.RunState(config={}, done=5), siri.Unit("warmup", 0)
    skips = lambda n, steps=0: {"warmup/skipped_nonfinite": n, "warmup/optimizer_steps": steps,  # noqa: E731
                                "warmup/skipped_leading": n if not steps else 0, "warmup/skipped_trailing": n if not steps else 0}
    siri.check_skipped(state, skips(2), unit, cfg)
    siri.check_skipped(state, skips(0, steps=2), unit, cfg)
    assert state.skipped_streak == 0  # a good step resets the count
    siri.check_skipped(state, skips(2), unit, cfg)
    with pytest.raises(siri.RunError, match="3 consecutive updates skipped.*gigpo.lr"):
        siri.check_skipped(state, {"warmup/skipped_nonfinite": 1, "warmup/optimizer_steps": 0, "warmup/skipped_leading": 1,
                                   "warmup/skipped_trailing": 1}, unit, cfg)
    # [skip, step] then [skip, skip]: only 2 in a row (the step in between resets the count)
    state = siri.RunState(config={}, done=5)
    siri.check_skipped(state, {"warmup/skipped_nonfinite": 1, "warmup/optimizer_steps": 1, "warmup/skipped_leading": 1,
                               "warmup/skipped_trailing": 0}, unit, cfg)
    siri.check_skipped(state, {"warmup/skipped_nonfinite": 2, "warmup/optimizer_steps": 0, "warmup/skipped_leading": 2,
                               "warmup/skipped_trailing": 2}, unit, cfg)
    assert state.skipped_streak == 2


def test_a_dead_env_worker_is_one_clear_error(cache):
    cfg = config.load_config(None, tiny_overrides(cache / "unused", cache, **{"env.num_workers": 2}))
    envs = make_envs(cfg.env)
    try:
        tasks = envs.task_ids("train")[:2]
        envs.reset(tasks)
        os.kill(envs._workers[1][0].pid, signal.SIGKILL)
        envs._workers[1][0].join()
        with pytest.raises(EnvWorkerDied, match="env worker 1 died"):
            envs.reset(tasks)
    finally:
        envs.close()


def test_env_workers_exit_when_the_main_process_is_killed(cache, tmp_path):
    """kill -9 of the main process leaves no env worker behind (they watch their parent)."""
    import subprocess
    import sys

    cfg_dir = cache / "games_workers"
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from envs import AlfworldConfig, EnvConfig, make_envs\n"
              f"m = make_envs(EnvConfig(num_workers=2, alfworld=AlfworldConfig(num_train_tasks=2, eval_per_type=1, "
              f"receptacles=4, distractors=1, cache_dir={str(cfg_dir)!r})))\n"
              "m.reset(m.task_ids('train')[:2]); print(*[p.pid for p, _ in m._workers], flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive, f"orphaned env workers {alive}"


def test_ctrl_c_with_env_workers_saves_exits_130_and_resumes(cache, tmp_path):
    """SIGINT to the whole process group (as a terminal sends it): the workers survive, the unit
    finishes, a checkpoint is saved, exit code 130, no report; --resume then finishes the run."""
    out = tmp_path / "run"
    args = tiny_overrides(out, cache, **{"env.num_workers": 2, "warmup.iterations": 3, "run.rounds": 0})
    proc = run_cli(args, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and '"phase": "warmup"' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=600) == 130, proc.stderr.read().decode()[-3000:]
    assert (out / "checkpoint" / "COMPLETE").exists() and not (out / "results.md").exists()
    resumed = run_cli(["--resume", *args])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-3000:]
    assert (out / "results.md").exists()
    units = [json.loads(line)["unit"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert units == list(range(len(units)))  # every unit exactly once
    assert torch.load(out / "checkpoint" / "training.pt", weights_only=False)["trainable"]


def comparable(rows: list[dict]) -> list[dict]:
    """metrics rows without wall times (they differ between any two runs)."""
    return [{k: v for k, v in r.items() if k != "time" and not k.endswith("_s")} for r in rows]


@pytest.mark.soak
def test_kill_at_random_soak(cache, tmp_path):
    """SIGKILL a small run at random moments (5 times, seeded), --resume after each; the final
    metrics (timings aside) and weights equal an uninterrupted run's. pytest -m soak"""
    import random

    extra = {"warmup.iterations": 3, "run.rounds": 1, "coldstart.epochs": 2}
    straight = run_cli(tiny_overrides(tmp_path / "a", cache, **extra))
    assert straight.wait(timeout=900) == 0, straight.stderr.read().decode()[-3000:]
    rng, out, kills = random.Random(0), tmp_path / "b", 0
    args = tiny_overrides(out, cache, **extra)
    proc = run_cli(args)
    while True:
        try:
            rc = proc.wait(timeout=rng.uniform(2.0, 12.0)) if kills < 5 else proc.wait(timeout=900)
        except Exception:  # still running: kill it now
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            proc = run_cli(["--resume", *args])
            continue
        assert rc == 0, proc.stderr.read().decode()[-3000:]
        break
    rows = [comparable([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]) for d in (tmp_path / "a", out)]
    assert rows[0] == rows[1] and kills > 0
    a, b = (torch.load(d / "checkpoint" / "training.pt", weights_only=False)["trainable"] for d in (tmp_path / "a", out))
    assert all(torch.equal(a[k], b[k]) for k in a)
