"""What a run writes, plain transformers + peft load, from another directory, in a fresh process,
and get the policy the run evaluated: the cold-started base (not the random one) under the adapter."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import siri
from model import load_policy
from test_siri import tiny_overrides

PLAIN_LOADER = '''
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
kind, path = sys.argv[1], sys.argv[2]
ids = json.loads(sys.stdin.read())
if kind == "merged":
    model = AutoModelForCausalLM.from_pretrained(path)
elif kind == "export":
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), path + "/adapter")
else:  # a checkpoint's adapter: adapter_config.json names its base
    base = json.load(open(path + "/adapter_config.json"))["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
model.eval()
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1]
    greedy = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
print(json.dumps({"logits": logits.tolist(), "greedy": greedy}))
'''


def plain_load(kind: str, path, ids: list[int], cwd) -> dict:
    """Run PLAIN_LOADER in a fresh interpreter from ``cwd``: no project module is importable there."""
    script = cwd / "load.py"
    script.write_text(PLAIN_LOADER)
    done = subprocess.run([sys.executable, str(script), kind, str(path)], input=json.dumps(ids), cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "", "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("export_cache")
    out = cache / "run"
    siri.main(tiny_overrides(out, cache, **{"coldstart.epochs": 6, "run.rounds": 0, "run.arms": "[gigpo]",
                                            "warmup.iterations": 1}))
    return out


def project_logits(run_dir, ids):
    """The run's final policy loaded the project's way, its last-position logits and greedy tokens."""
    cfg = config.load_config(str(run_dir / "config.yaml"), [])
    pol = load_policy(dataclasses.replace(cfg.model, name=str(run_dir / "coldstart_model")), device="cpu")
    params = dict(pol.model.named_parameters())
    with torch.no_grad():
        for n, t in torch.load(run_dir / "checkpoint" / "training.pt", weights_only=False)["trainable"].items():
            params[n].copy_(t)
        logits = pol.model(torch.tensor([ids])).logits[0, -1]
        greedy = pol.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    return pol, logits, greedy


def test_checkpoint_adapter_and_exports_load_with_plain_transformers_and_peft(finished_run, tmp_path):
    run_dir = finished_run
    pol, _, _ = project_logits(run_dir, [1, 2, 3])
    ids = pol.chat_ids("Your task is to: put some apple in fridge.")
    pol, logits, greedy = project_logits(run_dir, ids)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    adapter_cfg = json.loads((run_dir / "checkpoint" / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]).resolve() == (run_dir / "coldstart_model").resolve()
    results = {"checkpoint": plain_load("adapter", (run_dir / "checkpoint" / "adapter").resolve(), ids, elsewhere)}
    siri.main(["export", f"run.out_dir={run_dir}"])
    siri.main(["export", f"run.out_dir={run_dir}", "--merged", f"out={run_dir / 'merged'}"])
    results["export"] = plain_load("export", (run_dir / "export").resolve(), ids, elsewhere)
    results["merged"] = plain_load("merged", (run_dir / "merged").resolve(), ids, elsewhere)
    for kind, got in results.items():
        assert got["greedy"] == greedy, kind
        assert torch.allclose(torch.tensor(got["logits"]), logits, atol=1e-4), kind
    # the cold start moved the base: the run's random tiny base gives other logits (the test
    # above would fail if an adapter were loaded on it)
    (tiny,) = [p for p in Path(config.load_config(str(run_dir / "config.yaml"), []).model.tiny_dir).iterdir() if p.is_dir()]
    random_base = load_policy(dataclasses.replace(pol.cfg, name=str(tiny)), device="cpu")
    with torch.no_grad():
        assert (random_base.model(torch.tensor([ids])).logits[0, -1] - logits).abs().max() > 1.0


def test_export_of_a_run_without_cold_start_uses_the_runs_own_base(tmp_path_factory, tmp_path):
    """No cold start: the base is the run's tiny model (built from its own corpus), which the
    checkpoint's adapter names; a guard keeps export from deleting the run."""
    cache = tmp_path_factory.mktemp("export_nocs")
    run_dir = cache / "run"
    siri.main(tiny_overrides(run_dir, cache, **{"coldstart.enabled": "off", "run.rounds": 0, "run.arms": "[gigpo]",
                                                "warmup.iterations": 1}))
    assert not (run_dir / "coldstart_model").exists()
    cfg = config.load_config(str(run_dir / "config.yaml"), [])
    base = json.loads((run_dir / "checkpoint" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).parent.resolve() == Path(cfg.model.tiny_dir).resolve()
    pol = load_policy(dataclasses.replace(cfg.model, name=base), device="cpu")
    params = dict(pol.model.named_parameters())
    with torch.no_grad():
        for n, t in torch.load(run_dir / "checkpoint" / "training.pt", weights_only=False)["trainable"].items():
            params[n].copy_(t)
        ids = pol.chat_ids("Your task is to: put some apple in fridge.")
        logits = pol.model(torch.tensor([ids])).logits[0, -1]
    siri.main(["export", f"run.out_dir={run_dir}", "--merged"])
    got = plain_load("merged", (run_dir / "export").resolve(), ids, tmp_path)
    assert torch.allclose(torch.tensor(got["logits"]), logits, atol=1e-4)
    with pytest.raises(SystemExit, match="not an earlier export"):
        siri.main(["export", f"run.out_dir={run_dir}", f"out={run_dir}"])
    assert (run_dir / "checkpoint" / "COMPLETE").exists()
