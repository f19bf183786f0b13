"""The real-model preset's code path on CPU: a Qwen2.5-1.5B-shaped model (the real layer shapes,
one layer deep, random weights, bf16) saved locally with a ChatML tokenizer, loaded through
`preset=qwen1.5b model.name=<dir>`, LoRA on the preset's target modules, rollout steps and one
GiGPO update. What this cannot exercise (QLoRA needs CUDA) is listed in the README."""
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import agent
import config
import gigpo
import model
from envs import make_envs

# Qwen2.5-1.5B-Instruct's config.json, depth scaled down from 28 layers to 1
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, hidden_act="silu")


def test_qwen15b_preset_path_runs_rollouts_and_an_update_in_bf16(tmp_path):
    tokenizer = model.build_tiny_tokenizer(model.default_tiny_corpus(), 2000)
    assert "<|im_start|>" in tokenizer.get_vocab() and tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    qwen_cfg = Qwen2Config(vocab_size=len(tokenizer), num_hidden_layers=1, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **QWEN25_15B)
    torch.manual_seed(0)
    Qwen2ForCausalLM(qwen_cfg).to(torch.bfloat16).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")

    cfg = config.load_config(None, ["preset=qwen1.5b", f"model.name={tmp_path / 'qwen'}", "rollout.max_new_tokens=8",
                                  "env.max_steps=1", "env.alfworld.num_train_tasks=6", "env.alfworld.eval_per_type=1",
                                  "env.alfworld.receptacles=4", "env.alfworld.distractors=1", f"env.alfworld.cache_dir={tmp_path / 'games'}"])
    assert (cfg.model.dtype, cfg.model.gradient_checkpointing, cfg.gigpo.lr) == ("bfloat16", True, 1e-5)
    pol = model.load_policy(cfg.model, device="cpu")
    assert next(pol.model.parameters()).dtype == torch.bfloat16
    lora = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in pol.model.named_parameters() if "lora_A" in n}
    assert lora == set(cfg.model.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in pol.eos_ids
    with make_envs(cfg.env) as envs:
        trajs = agent.rollout(pol, envs, envs.task_ids("train")[:1], 2, cfg.rollout, seed=0)
    assert len(trajs) == 2 and all(len(t.steps) == 1 for t in trajs)
    samples = gigpo.samples_from(trajs, [[1.0 - 2 * (i % 2)] * len(t.steps) for i, t in enumerate(trajs)])
    before = {n: p.detach().clone() for n, p in pol.model.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW([p for p in pol.model.parameters() if p.requires_grad], lr=1e-3)
    stats = gigpo.update(pol, opt, samples, cfg.gigpo, cfg.distill, seed=0)
    assert stats["optimizer_steps"] == 1 and stats["skipped_nonfinite"] == 0
    assert any(not torch.equal(before[n], p) for n, p in pol.model.named_parameters() if n in before)
