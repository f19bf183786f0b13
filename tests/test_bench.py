"""bench.py: the update's scoring passes against the same update written by hand, and the device
script (cuda_bench.sh) at a tiny size on CPU. No timing is checked."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import core
import decoder
import gigpo
import model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_our_update_equals_the_by_hand_update_with_fewer_forwards(tmp_path):
    """`gigpo.update` (π_ref scored once per update, π_old of the first mini-batch taken from its
    grad forward, length-sorted micro-batches) against `bench.hf_update` (π_old and π_ref in
    passes of their own, every epoch): the same adapter after 2 epochs x 2 mini-batches (SGD,
    float32, to 1e-6), with the rows each pass scored counted by a forward hook."""
    path = model.build_tiny_model(str(tmp_path / "tiny"), model.default_tiny_corpus(50))
    torch.manual_seed(0)
    pol = model.load_policy(model.ModelConfig(name=path), device="cpu")
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    texts = ["go to the fridge 1", "You arrive at cabinet 3. On the cabinet 3, you see a mug 1 and a bowl 2.",
             "look", "open drawer 2", "Nothing happens.", "take apple 1 from countertop 1 and then go to the fridge"]
    samples = [core.Sample(pol.chat_ids(t), [5 + k, 9, 11 + k][:1 + k % 3], [-6.0] * (1 + k % 3), 1.0 - 2 * (k % 2))
               for k, t in enumerate(texts + texts[:2])]  # 8 rows of ragged lengths
    cfg = gigpo.GiGPOConfig(lr=0.5, ppo_epochs=2, minibatches=2, beta_kl=0.1, old_logprobs="recompute")
    start = bench.lora_state(pol)
    lora_layers = decoder._lora_layers(pol.model)
    rows = {}

    def count(_module, args, _out):
        ref = next(iter(lora_layers.values())).disable_adapters
        kind = "ref" if ref else ("grad" if torch.is_grad_enabled() else "old")
        rows[kind] = rows.get(kind, 0) + args[0].shape[0]  # input ids (b, L)

    hook = pol.model.get_base_model().get_decoder().embed_tokens.register_forward_hook(count)  # every pass
    try:
        results = {}
        for arm in ("ours", "hand"):
            rows.clear()
            bench.set_lora_state(pol, start)
            opt = torch.optim.SGD([p for p in pol.model.parameters() if p.requires_grad], lr=cfg.lr)
            if arm == "ours":
                stats = gigpo.update(pol, opt, samples, cfg, seed=0)
                assert stats["optimizer_steps"] == 4 and stats["clip_frac"] >= 0
            else:
                bench.hf_update(pol, opt, samples, cfg, seed=0, timing=dict.fromkeys(
                    ("old_s", "score_s", "ref_s", "backward_s"), 0.0))
            results[arm] = (dict(rows), bench.lora_state(pol))
    finally:
        hook.remove()
    (ours_rows, ours_w), (hand_rows, hand_w) = results["ours"], results["hand"]
    assert any(not torch.equal(start[n], ours_w[n]) for n in start)  # the adapter moved
    assert all(torch.allclose(ours_w[n], hand_w[n], atol=1e-6) for n in start)
    n = len(samples)
    assert ours_rows == {"ref": n, "old": n // 2, "grad": 2 * n}  # π_ref once, π_old for mini-batch 2 only
    assert hand_rows == {"ref": 2 * n, "old": n, "grad": 2 * n}


def test_cuda_bench_script_runs_on_cpu_at_a_tiny_size(tmp_path):
    """cuda_bench.sh end to end at SIZE=tiny on CPU: every step's report, the ratios, and the QLoRA
    step's one-line reason for not running (it needs CUDA)."""
    out = tmp_path / "out"
    env = dict(os.environ, SIZE="tiny", DEVICE="cpu", PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "cuda_bench.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + (out / "stderr.txt").read_text()[-2000:]
    summary = (out / "summary.txt").read_text()
    lines = summary.splitlines()
    for start in ("ratio decode ", "ratio group ", "ratio decode lora merged ", "ratio loop trim ",
                  "ratio loop untrimmed ", "qlora: skipped (", "loop ours: ", "loop ours_untrimmed: ", "loop hf: "):
        assert any(line.startswith(start) for line in lines), summary
    assert any(re.fullmatch(r"ratio loop [0-9.]+", line) for line in lines), summary
    loop = json.loads((out / "loop.json").read_text())
    assert loop["ratio_loop"] > 0 and loop["ratio_loop_untrimmed"] > 0
    assert loop["main"]["ours"]["steps"] == loop["main"]["ours_untrimmed"]["steps"] == loop["main"]["hf"]["steps"] > 0
    assert [r["vary"] for r in loop["scaling"]] == ["G"]
    assert json.loads((out / "qlora.json").read_text())["ok"] is False
    assert (out / "decode.txt").read_text().strip().splitlines()[-1].startswith("ratio group ")


def test_bench_rollout_rows(tmp_path, capsys):
    """`bench.py rollout` runs every (workers, waves, overlap) row; no timing is checked."""
    out = tmp_path / "rollout.json"
    report = bench.main(["rollout", "--slots", "4", "--workers", "0", "2", "--waves", "1", "2", "--group-size", "2",
                         "--max-steps", "2", "--new-tokens", "4", "--out", str(out)])
    rows = [(r["workers"], r["waves"], r["overlap"]) for r in report["rows"]]
    assert rows == [(0, 1, False), (0, 2, False), (2, 1, False), (2, 2, True), (2, 2, False)]
    assert json.loads(out.read_text())["rows"][3]["env_steps"] > 0  # admissible actions reached the env
    assert "waves" in capsys.readouterr().out


def test_bench_score_compares_the_scoring_layouts(tmp_path, capsys):
    """`bench.py score` times the layouts of `Policy.score` (and the last layer trimmed or not) on
    the same rows, and of the sampler's prefill on the same prompts, which agree; no timing is
    checked."""
    out = tmp_path / "score.json"
    report = bench.main(["score", "--rows", "6", "--batch", "3", "--prompt-len", "60", "--repeats", "1",
                         "--threads", "1", "--out", str(out)])
    assert set(report["best_s"]) == {"right-padded, causal, last layer trimmed (ours)",
                                     "right-padded, causal, full last layer", "left-padded, mask"}
    assert report["max_abs_diff"] < 1e-4 and report["tokens"] > 6 * 20
    assert json.loads(out.read_text())["ratio_score"] > 0 and report["ratio_trim"] > 0
    prefill = report["prefill"]
    assert set(prefill["best_s"]) == {"parts, right-padded, last layer trimmed (ours)",
                                      "parts, right-padded, full last layer", "one batch, left-padded"}
    assert prefill["max_abs_diff"] < 1e-4 and prefill["pad_frac"] > 0
    printed = capsys.readouterr().out
    assert all(f"ratio {name} " in printed for name in ("score", "trim", "prefill", "prefill trim"))
