"""model.py, decoder.py, agent.py: tiny model, loading errors, our decoder against HF `generate`, scoring, LoRA, rollouts.

Everything runs offline on CPU with the tiny random Qwen2 (fp32). A random model emits garbage,
which is fine: the tests compare engines and code paths with each other, never with "good" text.
"""
import copy
import math
import dataclasses
import os

import pytest
import torch

import agent
import decoder
import envs as envs_lib
import mining
import model
import peft
from decoder import SamplingConfig
from model import ModelConfig

TEXTS = [
    "You are in the middle of a room. Your task is to: put a mug in fridge.",
    "You arrive at cabinet 3. On the cabinet 3, you see a apple 1, a bowl 2, and a knife 1.",
    "Nothing happens.",
    "<think>I need the apple.</think><action>take apple 1 from cabinet 3</action> Your admissible actions "
    "of the current situation are: ['go to fridge 1', 'open cabinet 3', 'look', 'inventory'].",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny model's ops are too small to gain from more, and on a shared CPU
    a busy core stalls multi-threaded small ops (measured: 0.03 s -> 7 s for one generate call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return model.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), model.default_tiny_corpus())


@pytest.fixture(scope="module")
def pol(tiny_dir):
    torch.manual_seed(0)
    return model.load_policy(ModelConfig(name=tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def prompts(pol):
    """Ragged chat prompts (3..~60 tokens)."""
    return [pol.chat_ids(t) for t in TEXTS]


def greedy(**kw):
    return SamplingConfig(**{"temperature": 0.0, "max_new_tokens": 12, "stop": (), **kw})


def same(gens_a, gens_b):
    """Identical token ids / finish reasons / texts, and log-probs equal to 1e-4."""
    assert [g.ids for g in gens_a] == [g.ids for g in gens_b]
    assert [g.finish_reason for g in gens_a] == [g.finish_reason for g in gens_b]
    assert [g.text for g in gens_a] == [g.text for g in gens_b]
    for a, b in zip(gens_a, gens_b):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def with_extra_eos(pol, prompts, cfg):
    """A shallow copy of the policy whose EOS set also holds a token row 0 emits at step 4, so that
    (at least) row 0 ends early on "eos" in both engines."""
    pilot = pol.generate(prompts, dataclasses.replace(cfg, engine="custom"))
    early = copy.copy(pol)
    early.eos_ids = pol.eos_ids + [pilot[0].ids[4]]
    return early


# --- the tiny model ----------------------------------------------------------------------------

def test_tiny_tokenizer_and_chat_template(pol):
    tok = pol.tokenizer
    assert 256 < len(tok) <= 4000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.pad_token != tok.eos_token
    text = tok.decode(pol.chat_ids("put a mug in fridge."))
    assert text == "<|im_start|>user\nput a mug in fridge.<|im_end|>\n<|im_start|>assistant\n"
    for t in TEXTS + ["héllo wörld ✓"]:  # byte-level: any text survives encode -> decode
        assert tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t
    # a number and its space are one token (model.TINY_NUMBER_TOKENS), so "cabinet 12" copies as two
    assert [tok.decode([i]) for i in tok("go to cabinet 12", add_special_tokens=False)["input_ids"]][-1] == " 12"


def test_tiny_save_reload_same_logits(tmp_path):
    corpus = model.default_tiny_corpus(50)
    lm, tok = model.make_tiny_model(corpus, seed=3)
    path = model.build_tiny_model(str(tmp_path / "m"), corpus, seed=3)
    loaded = model.load_policy(ModelConfig(name=path), device="cpu")  # the hub-model loading path
    ids = loaded.chat_ids(TEXTS[1])
    assert ids == tok(tok.apply_chat_template([{"role": "user", "content": TEXTS[1]}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    numbers = "go to cabinet 12 | take apple 3 from fridge 1"  # the reloaded Qwen2Tokenizer keeps them whole
    assert loaded.tokenizer(numbers, add_special_tokens=False)["input_ids"] == tok(numbers, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad(), loaded.model.disable_adapter():
        assert torch.allclose(lm(x).logits, loaded.model(x).logits, atol=1e-6)
    assert loaded.model.get_base_model().dtype == torch.float32  # dtype from the saved config


def test_tiny_built_on_demand_and_cached(tmp_path):
    calls = []

    def corpus():
        calls.append(1)
        return model.default_tiny_corpus(30)

    cfg = ModelConfig(name="tiny", tiny_dir=str(tmp_path))
    a = model.load_policy(cfg, corpus=corpus, device="cpu")
    b = model.load_policy(cfg, corpus=lambda: model.default_tiny_corpus(30), device="cpu")
    assert len(calls) == 1 and len(os.listdir(tmp_path)) == 1  # one cached build, reused
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


# --- clear loading errors ----------------------------------------------------------------------

def test_qlora_without_cuda_is_a_clear_error(tiny_dir):
    with pytest.raises(model.ModelLoadError, match="CUDA"):
        model.load_policy(ModelConfig(name=tiny_dir, qlora=True), device="cpu")


def test_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(model.ModelLoadError, match="(?s)does not exist.*model.name=tiny"):
        model.load_policy(ModelConfig(name=str(tmp_path / "no_such_model")), device="cpu")
    with pytest.raises(model.ModelLoadError, match="(?s)could not load.*model.name=tiny"):
        model.load_policy(ModelConfig(name=str(tmp_path)), device="cpu")  # exists, holds no model


# --- decoding: our engine against the HF oracle ------------------------------------------------

@pytest.mark.parametrize("rows", [[0], [2, 0, 3], [3, 1, 1, 0, 2, 1]])
def test_greedy_custom_equals_hf(pol, prompts, rows):
    """Several batch sizes, ragged prompts, repeated prompts (shared prefill), a row that stops early."""
    batch = [prompts[i] for i in rows]
    cfg = greedy()
    early = with_extra_eos(pol, batch, cfg)
    custom = early.generate(batch, cfg)
    hf = early.generate(batch, dataclasses.replace(cfg, engine="hf"))
    same(custom, hf)
    assert custom[0].finish_reason == "eos" and len(custom[0].ids) <= 5
    assert any(g.finish_reason == "length" for g in custom) or len(rows) == 1


def test_greedy_custom_equals_hf_with_stop_string(pol, prompts):
    """Pick a stop string out of row 0's own greedy text, so that the stop fires mid-response."""
    cfg = greedy(max_new_tokens=16)
    pilot = pol.generate(prompts, cfg)
    stop = next(pilot[0].text[i:i + 3] for i in range(3, len(pilot[0].text) - 3)
                if pilot[0].text[i:i + 3].strip() and "\ufffd" not in pilot[0].text[i:i + 3])
    cfg = dataclasses.replace(cfg, stop=(stop,))
    custom = pol.generate(prompts, cfg)
    same(custom, pol.generate(prompts, dataclasses.replace(cfg, engine="hf")))
    g = custom[0]
    assert g.finish_reason == "stop" and stop in g.text and len(g.ids) < 16
    assert stop not in pol.tokenizer.decode(g.ids[:-1])  # the completing token is the last one kept


def test_stop_rule_on_action_tag(pol):
    """The default stop string ends the response at the token that completes `</action>`."""
    tok = pol.tokenizer
    ids = tok("<think>ok</think><action>go to fridge 1</action>\n<think>more", add_special_tokens=False)["input_ids"]
    rule = decoder._StopRule(tok, pol.eos_ids, ("</action>",))
    end = next(t for t in range(1, len(ids) + 1) if rule(ids[:t]) == "stop")  # response = ids[:end]
    assert "</action>" in tok.decode(ids[:end]) and "</action>" not in tok.decode(ids[:end - 1])
    assert "<think>more" not in tok.decode(ids[:end])
    assert rule(ids[:2] + [pol.eos_ids[0]]) == "eos"
    assert rule(ids[:2] + [pol.eos_ids[0]], eos_allowed=False) is None


def test_min_new_tokens_blocks_eos_in_both_engines(pol, prompts):
    cfg = greedy(min_new_tokens=12)
    early = with_extra_eos(pol, prompts, greedy())
    custom = early.generate(prompts, cfg)
    assert all(len(g.ids) == 12 and g.finish_reason == "length" for g in custom)
    same(custom, early.generate(prompts, dataclasses.replace(cfg, engine="hf")))


# --- decoding: our engine's own switches -------------------------------------------------------

def test_shared_prefix_equals_separate_prefills(pol, prompts):
    batch = [prompts[0]] * 4 + [prompts[3]] * 4
    for cfg in (greedy(), SamplingConfig(temperature=1.0, max_new_tokens=12, stop=())):
        shared = pol.generate(batch, cfg, torch.Generator().manual_seed(5))
        separate = pol.generate(batch, dataclasses.replace(cfg, share_prefix=False),
                                torch.Generator().manual_seed(5))
        same(shared, separate)
    assert len({tuple(g.ids) for g in shared}) > 1  # sampled rows of one prompt differ


def test_dropping_finished_rows_changes_nothing(pol, prompts):
    """Greedy and sampled: a row's random draws do not depend on which other rows are still running."""
    early = with_extra_eos(pol, prompts, greedy())
    for cfg in (greedy(), SamplingConfig(temperature=1.0, max_new_tokens=12, stop=())):
        dropped = early.generate(prompts, cfg, torch.Generator().manual_seed(4))
        kept = early.generate(prompts, dataclasses.replace(cfg, drop_finished=False), torch.Generator().manual_seed(4))
        same(dropped, kept)
        if cfg.temperature == 0:
            assert dropped[0].finish_reason == "eos" and len(dropped[0].ids) < 12


def test_preallocated_kv_cache_equals_dynamic_cache(pol, prompts):
    """Our preallocated cache against HF's DynamicCache, with rows copied (shared prefix) and rows
    dropped (finished early) along the way."""
    batch = [prompts[1]] * 3 + prompts
    early = with_extra_eos(pol, batch, greedy())
    for cfg in (greedy(), SamplingConfig(temperature=1.0, max_new_tokens=12, stop=())):
        ours = early.generate(batch, cfg, torch.Generator().manual_seed(6))
        hf_cache = early.generate(batch, dataclasses.replace(cfg, kv_cache="dynamic"), torch.Generator().manual_seed(6))
        same(ours, hf_cache)
        for a, b in zip(ours, hf_cache):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-6)
        if cfg.temperature == 0:  # some rows left the batch early, others ran to the end
            assert {g.finish_reason for g in ours} == {"eos", "length"}
    with pytest.raises(ValueError, match="kv_cache"):
        pol.generate(batch, greedy(kv_cache="static"))


def test_prefill_in_right_padded_parts_equals_the_left_padded_prefill(pol, prompts, monkeypatch):
    """`Policy._prefill_causal` (length-sorted parts, right-padded, no mask) gives the left-padded
    prefill's next-token logits and the same keys and values at every real token (its rows hold
    them at 0..n-1, the padded prefill's at P-n..P-1), zeros on the unwritten padding; it runs
    in several parts with no attention mask; and generation on top of either is the same."""
    batch = prompts + [prompts[2]] * 3  # ragged (3..~60 tokens) and repeated rows
    lengths = [len(p) for p in batch]
    P = max(lengths)
    masks = []
    hook = pol.model.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        with torch.inference_mode():
            causal, padded = pol.new_cache(P + 4), pol.new_cache(P + 4)
            lc, mc, nc = pol._prefill_causal(pol.model, batch, causal)
            parts = len(masks)
            assert parts >= 2 and all(m is None for m in masks)
            lp, mp, np_ = pol._prefill_padded(pol.model, batch, padded)
            assert masks[-1] is not None
    finally:
        hook.remove()
    assert torch.allclose(lc, lp, atol=1e-5) and lc.shape == (len(batch), lp.shape[-1])
    assert nc.tolist() == np_.tolist() == lengths
    assert mc.sum(-1).tolist() == mp.sum(-1).tolist() == lengths
    for a, b in zip(causal.layers, padded.layers):
        assert a.keys.shape == b.keys.shape and a.get_seq_length() == b.get_seq_length() == P
        for i, n in enumerate(lengths):
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                assert torch.allclose(x[i, :, :n], y[i, :, P - n:], atol=1e-5)
        short = lengths.index(min(lengths))
        assert (a.keys[short, :, P - 1] == 0).all()  # past every part's width: zero, not garbage
    for cfg in (greedy(), SamplingConfig(temperature=1.0, max_new_tokens=12, stop=())):
        ours = pol.generate(batch, cfg, torch.Generator().manual_seed(8))
        monkeypatch.setattr(pol, "causal_layout", False)
        theirs = pol.generate(batch, cfg, torch.Generator().manual_seed(8))
        monkeypatch.setattr(pol, "causal_layout", True)
        same(ours, theirs)
        for x, y in zip(ours, theirs):
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(pol, prompts):
    cfg = SamplingConfig(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=10, stop=())
    a = pol.generate(prompts, cfg, torch.Generator().manual_seed(1))
    b = pol.generate(prompts, cfg, torch.Generator().manual_seed(1))
    assert [g.ids for g in a] == [g.ids for g in b]
    top1 = pol.generate(prompts, dataclasses.replace(cfg, top_k=1), torch.Generator().manual_seed(2))
    assert [g.ids for g in top1] == [g.ids for g in pol.generate(prompts, greedy(max_new_tokens=10))]


# --- scoring -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9, top_k=40)])
def test_sampling_logprobs_equal_scoring_pass(pol, prompts, sampling):
    batch = prompts + prompts[:2]
    cfg = SamplingConfig(max_new_tokens=16, stop=(), **sampling)
    gens = pol.generate(batch, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        scored = pol.score(batch, [g.ids for g in gens], token_budget=10_000)
    for g, s in zip(gens, scored):
        assert len(g.logprobs) == len(g.ids) == s.shape[0]
        assert torch.allclose(torch.tensor(g.logprobs), s, atol=1e-4)


def test_score_micro_batches_entropy_and_grad(pol, prompts):
    responses = [p[:n] for p, n in zip(reversed(prompts), (5, 0, 9, 3))]  # ragged, one empty
    big, ents = pol.score(prompts, responses, token_budget=100_000, with_entropy=True)
    small = pol.score(prompts, responses, token_budget=1)  # one row per micro-batch
    for a, b, e, r in zip(big, small, ents, responses):
        assert a.shape == b.shape == e.shape == (len(r),)
        assert torch.allclose(a, b, atol=1e-5) and (e >= 0).all() and (a <= 0).all()
    loss = -torch.cat(big).sum()  # gradient reaches the LoRA parameters
    loss.backward()
    lora = [p for n, p in pol.model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    pol.model.zero_grad(set_to_none=True)


def test_right_padded_causal_scoring_equals_the_left_padded_masked_pass(tiny_dir, prompts, monkeypatch):
    """`Policy._score_batch` (rows right-padded, no mask: SDPA causal) and `_score_batch_padded` (left
    padding and its mask, the model's own forward) give the same log-probs, entropies, reference
    log-probs and gradients, of the LoRA weights (the update) and of the base weights with the
    adapter off (the cold start), on one micro-batch of ragged rows: an empty response, the
    longest row, a long prompt with a short response beside a short prompt with the longest
    response. The causal path passes no mask to attention, the padded one does."""
    torch.manual_seed(0)
    pol = model.load_policy(ModelConfig(name=tiny_dir), device="cpu")  # its own: the LoRA is changed below
    with torch.no_grad():  # a LoRA that changes the outputs, so policy and reference differ
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    rows = sorted(prompts, key=len)
    batch_prompts = [rows[-1], rows[0], rows[-2], rows[1]]
    responses = [rows[0][:2], [], rows[-1][:9], rows[2][:5]]  # the longest row is 2nd-longest prompt + 9
    monkeypatch.setattr(decoder.Policy, "pack_rows", staticmethod(lambda lengths, budget, max_pad=0: [list(range(len(lengths)))]))
    masks = []
    hook = pol.model.get_base_model().model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)

    def run(causal):
        monkeypatch.setattr(pol, "causal_layout", causal)
        masks.clear()
        lps, ents = pol.score(batch_prompts, responses, token_budget=100_000, with_entropy=True)
        seen = list(masks)
        (-torch.cat(lps).sum() - torch.cat(ents).sum()).backward()
        lora = {n: p.grad.clone() for n, p in pol.model.named_parameters() if p.grad is not None}
        pol.model.zero_grad(set_to_none=True)
        ref = pol.score(batch_prompts, responses, token_budget=100_000, reference=True)
        base = [p for n, p in pol.model.named_parameters() if "lora_" not in n]
        for p in base:
            p.requires_grad_(True)
        with pol.model.disable_adapter():  # the cold start's pass: base weights trained, adapter off
            (-torch.cat(pol.score(batch_prompts, responses, token_budget=100_000)).sum()).backward()
        base_grads = {n: p.grad.clone() for n, p in pol.model.named_parameters() if "lora_" not in n}
        for p in base:
            p.requires_grad_(False)
            p.grad = None
        return [x.detach() for x in lps], [x.detach() for x in ents], lora, ref, base_grads, seen

    fast = run(True)
    slow = run(False)
    hook.remove()
    assert fast[5] and all(m is None for m in fast[5])  # causal: no mask built
    assert slow[5] and all(m is not None for m in slow[5])  # the left-padded batch carries its padding mask
    assert [x.shape[0] for x in fast[0]] == [len(r) for r in responses]
    for a, b in zip(fast[0] + fast[1] + fast[3], slow[0] + slow[1] + slow[3]):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    for grads_a, grads_b in ((fast[2], slow[2]), (fast[4], slow[4])):
        assert grads_a.keys() == grads_b.keys() and grads_a
        assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4) for n in grads_a)
    assert any("lora_" in n for n in fast[2]) and any("lm_head" in n or "embed_tokens" in n for n in fast[4])
    assert not torch.allclose(torch.cat(fast[0]), torch.cat(fast[3]), atol=1e-3)  # the adapter mattered


def small_lora_model(pol, kind: str, **config):
    """A random 2-layer model of a `decoder.CAUSAL_LAYOUT_TYPES` type on the tiny tokenizer, in LoRA."""
    import transformers
    configs = dict(llama=transformers.LlamaConfig, qwen3=transformers.Qwen3Config, mistral=transformers.MistralConfig)
    shape = dict(vocab_size=len(pol.tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **config)
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(configs[kind](**shape), attn_implementation="sdpa")
    return peft.get_peft_model(lm, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "gate_proj", "up_proj", "down_proj"]))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # raised inside peft, not by us
@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3", "mistral"])
def test_last_layer_trimmed_to_the_read_positions_equals_the_full_pass(pol, prompts, kind):
    """`decoder.hidden_at` with trim (the last layer's query, attention, output projection and MLP
    only at the positions read) gives the full pass's log-probs, entropies and LoRA gradients when
    scoring, and its next-token logits and every layer's keys and values when prefilling, for the
    Llama-shaped types it serves (Qwen3: q_norm/k_norm; Llama: no q/k/v bias; Mistral without a
    sliding window); the last layer's MLP really sees only the read positions (one per row in
    the prefill); and our decoder on top greedily writes what HF `generate` writes."""
    lm = copy.deepcopy(pol.model) if kind == "qwen2" else small_lora_model(pol, kind, **(
        {"sliding_window": None} if kind == "mistral" else {}))
    with torch.no_grad():  # a LoRA that changes the outputs
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    policy = decoder.Policy(lm, pol.tokenizer, device="cpu")
    assert policy.trim_last_layer
    batch, responses = prompts + [prompts[0]], [prompts[3][:7], [], prompts[1][:3], prompts[2][:2], prompts[0][:5]]
    seen = []
    last = decoder.transformers_model(lm).get_decoder().layers[-1]
    hook = last.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))

    def run(trim):
        policy.trim_last_layer = trim
        seen.clear()
        lps, ents = policy.score(batch, responses, token_budget=100_000, with_entropy=True)
        (-torch.cat(lps).sum() - torch.cat(ents).sum()).backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
        lm.zero_grad(set_to_none=True)
        scored_widths = list(seen)
        with torch.inference_mode():
            cache = policy.new_cache(max(len(p) for p in batch))
            logits = policy._prefill_causal(lm, batch, cache)[0]
        return lps, ents, grads, logits, cache, scored_widths, seen[len(scored_widths):]

    trimmed, full = run(True), run(False)
    hook.remove()
    for a, b in zip(trimmed[0] + trimmed[1], full[0] + full[1]):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert trimmed[2].keys() == full[2].keys() and any("lora_" in n for n in trimmed[2])
    assert all(torch.allclose(trimmed[2][n], full[2][n], atol=1e-5, rtol=1e-4) for n in trimmed[2])
    assert torch.allclose(trimmed[3], full[3], atol=1e-5)
    for a, b in zip(trimmed[4].layers, full[4].layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    R = max(len(r) for r in responses)
    assert max(trimmed[5]) == R < min(full[5])  # scoring: the last MLP at the response positions only
    assert set(trimmed[6]) == {1} and min(full[6]) > 1  # prefill: at each prompt's last token only
    policy.trim_last_layer = True
    same(policy.generate(batch, greedy()), policy.generate(batch, greedy(engine="hf")))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # raised inside peft, not by us
def test_a_sliding_window_model_takes_the_models_own_forward(pol, prompts):
    """Mistral with a sliding window (no layer_types in its config): no preallocated cache, no
    mask-free layout, no trim; our decoder still writes what HF `generate` writes."""
    policy = decoder.Policy(small_lora_model(pol, "mistral", sliding_window=16), pol.tokenizer, device="cpu")
    assert not (policy.causal_layout or policy.trim_last_layer or policy._ready_mask)
    assert isinstance(policy.new_cache(64), decoder.DynamicCache)
    same(policy.generate(prompts, greedy()), policy.generate(prompts, greedy(engine="hf")))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, prompts):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # same LoRA init
        pol = model.load_policy(ModelConfig(name=tiny_dir, gradient_checkpointing=ckpt), device="cpu")
        pol.model.train()
        (-torch.cat(pol.score(prompts[:2], [prompts[3][:7], prompts[1][:4]], token_budget=4096)).sum()).backward()
        grads.append({n: p.grad for n, p in pol.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


# --- LoRA: the reference policy is the same model with the adapter disabled --------------------

@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # raised inside peft, not by us
def test_lora_disabled_equals_base_and_saves_for_plain_peft(tiny_dir, prompts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    pol = model.load_policy(ModelConfig(name=tiny_dir), device="cpu")
    with torch.no_grad():  # fresh LoRA has B = 0 (a no-op); make it change the outputs
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    x = torch.tensor([prompts[1]])
    with torch.no_grad():
        adapted = pol.model(x).logits
        with pol.model.disable_adapter():
            disabled = pol.model(x).logits
        plain = base(x).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert torch.allclose(disabled, plain, atol=1e-5)

    responses = [prompts[0][:6], prompts[2]]
    ref = pol.score(prompts[1:3], responses, token_budget=4096, reference=True)
    assert not any(r.requires_grad for r in ref)
    base_pol = decoder.Policy(base, pol.tokenizer, "cpu")
    with torch.no_grad():
        expect = base_pol.score(prompts[1:3], responses, token_budget=4096)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, expect))

    pol.save(str(tmp_path / "adapter"))  # a plain transformers + peft user loads it back
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, adapted, atol=1e-5)


# --- rollouts on the embedded environment ------------------------------------------------------

def test_rollout_on_embedded_env(pol):
    envs = envs_lib.EnvManager(envs_lib.EnvConfig(max_steps=3))
    try:
        tasks = envs.task_ids("train")[:2]
        cfg = SamplingConfig(max_new_tokens=12)
        stats = {}
        trajs = agent.rollout(pol, envs, tasks, 2, cfg, seed=7, stats=stats)
        assert [t.task_id for t in trajs] == [tasks[0], tasks[0], tasks[1], tasks[1]]  # group-contiguous
        assert [t.index for t in trajs] == [0, 1, 0, 1]
        assert trajs[0].group == trajs[1].group != trajs[2].group
        first = envs.reset(tasks)
        for t in trajs:
            assert t.task_type == envs.task_type(t.task_id) and t.skill_id is None
            assert t.task == first[tasks.index(t.task_id)].task and t.task  # the instruction text
            assert t.score is None  # ALFWorld states carry no `score`
            assert 1 <= len(t.steps) <= 3 and t.steps[-1].done and not any(s.done for s in t.steps[:-1])
            assert t.won == t.steps[-1].won and t.reward_sum == sum(s.reward for s in t.steps)
            for s in t.steps:
                assert len(s.logprobs) == len(s.response_ids) <= 12 and s.prompt_ids and s.plain_prompt_ids is None
                assert isinstance(s.text, str) and isinstance(s.anchor, str) and isinstance(s.obs, str)
        assert trajs[0].steps[0].prompt_ids == trajs[1].steps[0].prompt_ids  # same task, same state
        assert stats["steps"] == sum(len(t.steps) for t in trajs) and stats["generate_s"] > 0 and stats["env_s"] > 0

        again = agent.rollout(pol, envs, tasks, 2, cfg, seed=7)
        assert [[s.response_ids for s in t.steps] for t in again] == [[s.response_ids for s in t.steps] for t in trajs]

        ttype = trajs[0].task_type
        skill = "- go to the fridge first"
        guided = agent.rollout(pol, envs, tasks[:1], 2, cfg, skill={ttype: skill}, seed=7)
        for t in guided:
            assert t.skill_id == mining.skill_id(ttype, skill)  # the id a bank entry with this text has
            for s in t.steps:  # the plain prompt is the skill prompt minus the skill
                assert s.plain_prompt_ids and s.plain_prompt_ids != s.prompt_ids
                assert skill in pol.tokenizer.decode(s.prompt_ids)
                assert skill not in pol.tokenizer.decode(s.plain_prompt_ids)
        # the plain prompt of a guided rollout's first step is the plain rollout's own first prompt
        assert guided[0].steps[0].plain_prompt_ids == trajs[0].steps[0].prompt_ids
    finally:
        envs.close()


def test_env_overlap_changes_no_result_and_happens(pol):
    """rollout.waves=2: with env workers a wave's env step (and its first reset) runs while the
    other wave decodes. The trajectories equal those of the same waves stepped in-process (no
    overlap) and with the overlap switched off; and the overlap is real: two steps, and two
    resets, were in flight at once."""
    import zlib


    class Envs(envs_lib.EnvManager):  # every response becomes an admissible action, so envs work
        most_in_flight = 0

        def parse_action(self, text, admissible):
            return admissible[zlib.crc32(text.encode()) % len(admissible)], True

        def step_begin(self, actions):
            pending = super().step_begin(actions)
            self.most_in_flight = max(self.most_in_flight, len(self._in_flight))
            return pending

        def reset_begin(self, task_ids, parts):
            pending = super().reset_begin(task_ids, parts)
            self.resets_in_flight = len(self._in_flight)  # a wave's games load while wave 0 decodes
            return pending

    def play(workers, waves, overlap=True):
        with Envs(envs_lib.EnvConfig(max_steps=4, num_workers=workers)) as envs:
            trajs = agent.rollout(pol, envs, envs.task_ids("train")[:3], 2,
                              SamplingConfig(max_new_tokens=8, waves=waves, overlap_env=overlap), seed=3)
            return [[(s.response_ids, s.action, s.reward, s.anchor, s.obs) for s in t.steps] for t in trajs], \
                (envs.most_in_flight, envs.resets_in_flight)

    alone, _ = play(0, 2)
    overlapped, in_flight = play(2, 2)
    waiting, in_flight_off = play(2, 2, overlap=False)
    assert overlapped == alone == waiting
    assert in_flight == (2, 2) and in_flight_off == (1, 1)  # (steps, resets) in flight at once
    assert sum(len(t) for t in alone) > 6  # episodes went on past their first step
    assert agent.rollout_waves(3, 2, 2) == [[0, 1, 2, 3], [4, 5]]  # whole groups; round(1.5) = 2 groups first
    assert agent.rollout_waves(1, 4, 2) == [[0, 1], [2, 3]]  # one task: the group is cut


def test_an_error_during_an_overlapped_rollout_leaves_the_env_workers_in_step(pol, monkeypatch):
    """An exception while a wave's env step is in flight (here: the decoder fails on its 3rd call)
    must not leave unread replies in the workers' pipes: the next rollout on the same manager
    plays exactly as on a fresh one."""
    cfg = SamplingConfig(max_new_tokens=6, waves=2)
    env_cfg = envs_lib.EnvConfig(max_steps=3, num_workers=2)

    def play(envs):
        trajs = agent.rollout(pol, envs, envs.task_ids("train")[:2], 2, cfg, seed=5)
        return [[(s.response_ids, s.obs) for s in t.steps] for t in trajs]

    with envs_lib.EnvManager(env_cfg) as fresh:
        expected = play(fresh)
    with envs_lib.EnvManager(env_cfg) as envs:
        real, calls = pol.generate, []

        def failing(prompts, sampling, generator=None, actions=None):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("decoder failed")
            return real(prompts, sampling, generator)

        monkeypatch.setattr(pol, "generate", failing)
        with pytest.raises(RuntimeError, match="decoder failed"):
            play(envs)
        monkeypatch.setattr(pol, "generate", real)
        assert not envs._in_flight
        assert play(envs) == expected


def test_rollout_keeps_the_final_score_of_envs_that_have_one(pol):
    """WebShop-like envs put their final reward in `state.score`; the trajectory keeps it."""

    @dataclasses.dataclass
    class State:  # an EnvState plus `score`, as WebShop returns it
        task_id: str = "t0"
        task_type: str = "shop"
        task: str = "buy a red mug"
        obs: str = "search page"
        admissible: list = dataclasses.field(default_factory=lambda: ["search[mug]"])
        reward: float = 0.0
        done: bool = False
        won: bool = False
        anchor: str = "a0"
        steps: int = 0
        score: float = 0.0

    class OneStepEnv:  # every episode ends after one step with score 0.25
        def reset_begin(self, task_ids, parts):  # the rollout's side of EnvManager: reset in parts ...
            return [[(i, task_ids[i]) for i in part] for part in parts]

        def reset_end(self, part):
            return {i: State(task_id=t) for i, t in part}

        def step_begin(self, actions):  # ... and begin / end a step
            return {i: State(task_id="t0", done=True, reward=0.25, score=0.25, steps=1) for i in actions}

        def step_end(self, pending):
            return pending

        def build_prompt(self, state, history, skill=None):
            return f"{state.task}\n{skill or ''}{state.obs}"

        def parse_action(self, text, admissible):
            return None, False

    trajs = agent.rollout(pol, OneStepEnv(), ["t0"], 2, SamplingConfig(max_new_tokens=4))
    assert [(t.task, t.score, len(t.steps)) for t in trajs] == [("buy a red mug", 0.25, 1)] * 2


# --- bench.py decode runs (tiny sizes; no timing is checked) -----------------------------------

def test_bench_decode_smoke(tmp_path, capsys):
    import json

    import bench

    out = tmp_path / "bench.json"
    bench.main(["decode", "--threads", "1", "--repeats", "1", "--batch", "2", "--prompt-len", "40",
                "--new-tokens", "4", "--models", "base", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("ratio decode ") and lines[-1].startswith("ratio group ")
    float(lines[-2].split()[-1]), float(lines[-1].split()[-1])
    report = json.loads(out.read_text())
    assert set(report["results"]["base"]) == {"a", "b", "c", "merge_s"} and report["info"]["torch_threads"] == 1


# --- sampling from merged weights (SamplingConfig.merge_adapter) -------------------------------

def lora_policy(tiny_dir, dtype="float32", seed=0):
    """A LoRA policy whose adapter changes the outputs (a fresh LoRA has B = 0: merged, it is W)."""
    torch.manual_seed(seed)
    pol = model.load_policy(ModelConfig(name=tiny_dir, dtype=dtype), device="cpu")
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return pol


def test_merged_sampling_folds_the_adapter_and_leaves_the_model_untouched(tiny_dir, prompts):
    """While a rollout's merged copy is open its weights are W + (α/r)BA (not W), the wrapped model
    runs no forward, and the samples and their log-probs are the wrapped model's (float32);
    afterwards every parameter of the wrapped model is what it was, bit for bit."""
    pol = lora_policy(tiny_dir)
    before = {n: p.detach().clone() for n, p in pol.model.named_parameters()}
    lm = pol.model.get_base_model()
    calls = []
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, stop=())
    with pol.merged_adapter() as merged:
        hook = lm.register_forward_hook(lambda *_: calls.append(1))  # after the copy (which copies hooks)
        try:
            q, wrapped = merged.model.layers[1].self_attn.q_proj, lm.model.layers[1].self_attn.q_proj
            assert type(q) is torch.nn.Linear and "lora" not in str(merged).lower()
            assert not torch.equal(q.weight, wrapped.base_layer.weight)  # the adapter is in the weights ...
            assert torch.allclose(q.weight, wrapped.base_layer.weight + wrapped.get_delta_weight("default"), atol=1e-7)
            assert q.bias is wrapped.base_layer.bias  # ... and the rest is shared, not copied
            assert merged.model.embed_tokens.weight is lm.model.embed_tokens.weight
            merged_gens = pol.generate(prompts, cfg, torch.Generator().manual_seed(3))
            assert not calls  # the merged copy decoded
            wrapped_gens = pol.generate(prompts, dataclasses.replace(cfg, merge_adapter=False),
                                        torch.Generator().manual_seed(3))
            assert calls  # the wrapped model decoded
        finally:
            hook.remove()
    same(merged_gens, wrapped_gens)
    for a, b in zip(merged_gens, wrapped_gens):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    assert pol._merged is None  # dropped when the block closes
    assert all(torch.equal(before[n], p) for n, p in pol.model.named_parameters())


def test_merged_sampling_in_bf16_is_within_tolerance(tiny_dir, prompts):
    """bf16: W + ΔW is rounded once to bf16, so the merged sampler's log-probs differ from the
    wrapped model's scoring pass (what the update uses) by rounding: at most 0.02 per token here
    (measured <= 0.005; the wrapped bf16 sampler itself differs by up to 0.004)."""
    pol = lora_policy(tiny_dir, dtype="bfloat16")
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=16, stop=())
    gens = pol.generate(prompts, cfg, torch.Generator().manual_seed(1))
    with torch.no_grad():
        scored = pol.score(prompts, [g.ids for g in gens], token_budget=10_000)
    assert max((torch.tensor(g.logprobs) - s).abs().max().item() for g, s in zip(gens, scored)) < 0.02


def test_nothing_to_merge_samples_from_the_model_as_it_is(tiny_dir):
    """No copy where merging would be wrong or impossible: adapter disabled, no peft adapter.
    (QLoRA's 4-bit base takes the same path, `merged_copy` docstring; it needs CUDA to test.)"""
    from transformers import AutoModelForCausalLM

    pol = lora_policy(tiny_dir)
    with pol.model.disable_adapter():
        assert decoder.merged_copy(pol.model) is None
    assert decoder.merged_copy(AutoModelForCausalLM.from_pretrained(tiny_dir)) is None
    assert decoder.merged_copy(pol.model) is not None


def test_training_after_a_merged_rollout_is_unchanged(tiny_dir):
    """Same seed, rollouts sampled merged or wrapped, then the same update: identical trajectories
    and, in float32, the same adapter after the update (to 1e-6)."""
    import gigpo

    out = {}
    with envs_lib.EnvManager(envs_lib.EnvConfig(max_steps=2)) as envs:
        tasks = envs.task_ids("train")[:1]
        for merge in (True, False):
            pol = lora_policy(tiny_dir, seed=1)
            trajs = agent.rollout(pol, envs, tasks, 2, SamplingConfig(max_new_tokens=8, merge_adapter=merge), seed=3)
            samples = gigpo.samples_from(trajs, [[1.0 - 2 * (i % 2)] * len(t.steps) for i, t in enumerate(trajs)])
            opt = torch.optim.SGD([p for p in pol.model.parameters() if p.requires_grad], lr=0.1)
            stats = gigpo.update(pol, opt, samples, gigpo.GiGPOConfig(lr=0.1), seed=0)
            assert stats["optimizer_steps"] == 1
            out[merge] = (trajs, {n: p.detach().clone() for n, p in pol.model.named_parameters() if "lora_" in n})
    (t_m, w_m), (t_w, w_w) = out[True], out[False]
    assert [[s.response_ids for s in t.steps] for t in t_m] == [[s.response_ids for s in t.steps] for t in t_w]
    for a, b in zip(t_m, t_w):
        for s, u in zip(a.steps, b.steps):
            assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(u.logprobs), atol=1e-5)
    assert all(torch.allclose(w_m[n], w_w[n], atol=1e-6) for n in w_m)


# --- actions constrained to the admissible ones (SamplingConfig.constrain_actions) --------------

ACTIONS = ["go to cabinet 1", "go to countertop 2", "take mug 1 from cabinet 1", "look"]


@pytest.fixture
def open_at_once(monkeypatch):
    """A random model never writes "<action" by itself: open the rule at the response's first token
    (OPEN = "") and ask for the whole answer format, think block included."""
    monkeypatch.setattr(decoder.ActionConstraint, "OPEN", "")
    monkeypatch.setattr(decoder.ActionConstraint, "FORMAT", "<think>x</think><action>{}</action>")


def test_action_constraint_allows_exactly_the_tokens_that_stay_on_an_action(pol):
    """Every vocabulary token is checked: allowed iff its text keeps the response a prefix of some
    "<action>A</action>"; a response that left every action gets None (it samples free)."""
    rule = pol.action_constraint()
    targets = tuple(decoder.ActionConstraint.FORMAT.format(a) for a in ACTIONS)
    for text in ("<action", "<action>go to c", "<action>take mug 1 from cabinet 1</act"):
        allowed = rule.allowed(targets, text, {})
        expected = [i for i, p in enumerate(rule.piece)
                    if p and "\ufffd" not in p and any(t.startswith(text + p) for t in targets)]
        assert allowed == expected and expected
    assert rule.allowed(targets, "<action>open", {}) is None
    # the tiny tokenizer merges the tag's ">" into the next word: both ways in are allowed
    first = {rule.piece[i] for i in rule.allowed(targets, "<action", {})}
    assert ">" in first and any(p.startswith(">") and len(p) > 1 for p in first)


def test_renormalised_logprob_and_entropy_by_hand():
    """log pi_A(y) = log pi(y) - log(pi(a) + pi(b)) and the entropy of pi over A only, hand-computed
    for V = 4, A = {0, 2}; free positions keep their values."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logp_all = p.log()[None, None].repeat(1, 2, 1)  # (b=1, R=2, V=4)
    tok_lp = torch.tensor([[p[2].log(), p[3].log()]])  # tokens 2 then 3
    ent = torch.tensor([[1.0, 1.0]])
    lp, h = decoder._renormalise(logp_all, tok_lp, ent, [[[0, 2], None]], entropy_grad=False)
    q0, q2 = 0.1 / 0.4, 0.3 / 0.4  # pi renormalised over {0, 2}
    assert torch.allclose(lp, torch.tensor([[math.log(q2), math.log(0.4)]]))
    assert torch.allclose(h, torch.tensor([[-(q0 * math.log(q0) + q2 * math.log(q2)), 1.0]]))


def test_constrained_sampling_gives_admissible_actions_scored_as_sampled(pol, prompts, open_at_once):
    """Every response is one of the actions in the answer format; its sampling log-probs equal
    `score` with `allowed` (the policy that sampled it), not the unconstrained scores; the same
    seed without the rule samples something else."""
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, constrain_actions=True)
    batch = [p for p in prompts for _ in range(4)]
    gens = pol.generate(batch, cfg, torch.Generator().manual_seed(0), actions=[ACTIONS] * len(batch))
    free = pol.generate(batch, dataclasses.replace(cfg, constrain_actions=False), torch.Generator().manual_seed(0))
    assert {g.text for g in gens} <= {decoder.ActionConstraint.FORMAT.format(a) for a in ACTIONS}
    assert len({g.text for g in gens}) > 1 and all(g.finish_reason == "stop" for g in gens)
    assert [g.text for g in free] != [g.text for g in gens] and all(g.allowed is None for g in free)
    with torch.no_grad():
        scored = pol.score(batch, [g.ids for g in gens], 10_000, allowed=[g.allowed for g in gens])
        unconstrained = pol.score(batch, [g.ids for g in gens], 10_000)
    for g, s, u in zip(gens, scored, unconstrained):
        assert len(g.allowed) == len(g.ids) and all(a is not None and k in a for k, a in zip(g.ids, g.allowed))
        assert torch.allclose(torch.tensor(g.logprobs), s, atol=1e-5)
    assert max((s - u).abs().max().item() for s, u in zip(scored, unconstrained)) > 0.5
    with pytest.raises(ValueError, match="engine=custom"):
        pol.generate(batch, dataclasses.replace(cfg, engine="hf"), actions=[ACTIONS] * len(batch))


def test_constrained_rollout_has_no_invalid_step_and_its_update_starts_at_ratio_one(pol, open_at_once):
    """With the rule a random model plays only admissible actions (without it: almost none); the
    steps carry `allowed` into `gigpo.samples_from`, so the update's first step, whose pi_old is the
    sampler's log-probs, sees ratio 1 (clip_frac 0); dropping `allowed` would score another policy."""
    import gigpo

    cfg = SamplingConfig(max_new_tokens=40, constrain_actions=True)
    with envs_lib.EnvManager(envs_lib.EnvConfig(max_steps=3)) as envs:
        tasks = envs.task_ids("train")[:2]
        trajs = agent.rollout(pol, envs, tasks, 2, cfg, seed=5)
        free = agent.rollout(pol, envs, tasks, 2, dataclasses.replace(cfg, constrain_actions=False), seed=5)
    steps = [s for t in trajs for s in t.steps]
    assert all(s.valid and s.allowed for s in steps)
    assert sum(not s.valid for t in free for s in t.steps) > len(steps) // 2
    adv = [[1.0 - 2 * (i % 2)] * len(t.steps) for i, t in enumerate(trajs)]
    samples = gigpo.samples_from(trajs, adv)
    assert [s.allowed for s in samples] == [s.allowed for s in steps]
    gcfg = gigpo.GiGPOConfig(lr=1e-3, clip_eps=0.01, beta_kl=0.0, old_logprobs="sampler")
    clip = {}
    for name, rows in (("with", samples), ("without", [dataclasses.replace(s, allowed=None) for s in samples])):
        pol_copy = copy.deepcopy(pol)
        opt = torch.optim.SGD([p for p in pol_copy.model.parameters() if p.requires_grad], lr=1e-3)
        clip[name] = gigpo.update(pol_copy, opt, rows, gcfg, seed=0)["clip_frac"]
    assert clip["with"] == 0 and clip["without"] > 0.1
