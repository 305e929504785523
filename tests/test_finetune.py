"""Fine-tuning: train.py SFT with LoRA on chat data and export.py, checked against transformers and peft.

The task: answer "reverse: abcd" with "dcba", in the plain chat template with characters as tokens
("User: reverse: abcd\\nAssistant: dcba\\n\\n"), for 4-letter words (one length keeps every position fixed,
so a two-layer model learns in a few hundred CPU steps). The base, pretrained here from scratch, has seen three
instructions that mean "copy the word" (restate, reprint, rewrite) and one that means "reverse it" (flipped),
never "reverse": asked to reverse, it copies (0% exact). LoRA SFT on "reverse" conversations teaches it to
follow that instruction, judged on held-out words. (A base that only ever copied needs a new attention pattern,
which a low-rank update found in at most half of the seeds tried: too fragile for a test.)
That the loss mask of a rendered conversation covers exactly the assistant tokens is checked in test_chat.py
against hand-built token sequences; here train.py's loss is checked to count exactly those tokens."""
import json
import random
import re
import string

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import checkpoint
import export
import hf
from conftest import run_script
from model import GPT, GPTConfig
from test_train import assert_one_line_error
from tokenizer import load_tokenizer, read_meta, render_prompt

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

EAGER = dict(attn_implementation="eager", experts_implementation="eager")
_rng = random.Random(0)
WORDS = list(dict.fromkeys("".join(_rng.choice(string.ascii_lowercase) for _ in range(4)) for _ in range(3000)))
HELD_OUT, TRAIN = WORDS[:200], WORDS[200:2000]  # held-out words never appear in training
VAL_WORD = HELD_OUT[0]  # val.bin holds this one conversation, so train.py's val loss is its loss
PRETRAIN_TASKS = ("restate", "reprint", "rewrite", "flipped")  # all 7 letters: the same positions as "reverse"
RUN = ["--device=cpu", "--compile=False", "--block_size=40", "--batch_size=64", "--gradient_accumulation_steps=1",
       "--warmup_iters=20", "--weight_decay=0.0", "--eval_iters=2", "--log_interval=50"]
LORA = "{'lora_rank': 8, 'lora_alpha': 16.0, 'lora_targets': 'attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj'}"
STEPS = 150  # of LoRA SFT (100 sufficed in the seeds tried)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models gain little from threads; one gives the same sums anywhere


def conversation(word, task):
    answer = word[::-1] if task in ("reverse", "flipped") else word
    return [{"role": "user", "content": f"{task}: {word}"}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """Two char-level chat datasets, one row per conversation: 'pretrain' (the four instructions) and 'reverse'."""
    root = tmp_path_factory.mktemp("chat")
    out = {}
    for name, tasks in (("pretrain", PRETRAIN_TASKS), ("reverse", ["reverse"])):
        for split, words in (("train", TRAIN), ("val", [VAL_WORD])):
            lines = "".join(json.dumps({"messages": conversation(w, t)}) + "\n" for w in words for t in tasks)
            (root / f"{name}_{split}.jsonl").write_text(lines)
        result = run_script("data/chat/prepare.py", f"--input={root / f'{name}_train.jsonl'}",
                            f"--val_input={root / f'{name}_val.jsonl'}", "--tokenizer=char", "--pack=False",
                            "--block_size=40", f"--out_dir={root / name}")
        assert result.returncode == 0, result.stderr
        out[name] = root / name
    assert read_meta(out["pretrain"])["chars"] == read_meta(out["reverse"])["chars"]  # one vocabulary
    return out


@pytest.fixture(scope="module")
def base_run(chat_data, tmp_path_factory):
    """The base: a two-layer GPT-2-style model pretrained from scratch on the four instructions."""
    out = tmp_path_factory.mktemp("runs") / "base"
    result = run_script("train.py", *RUN, f"--dataset={chat_data['pretrain']}", f"--out_dir={out}", "--n_layer=2",
                        "--n_head=4", "--n_embd=64", "--dropout=0.0", "--learning_rate=3e-3", "--min_lr=3e-4",
                        "--max_iters=400", "--lr_decay_iters=400", "--eval_interval=400", env=ONE_THREAD,
                        timeout=900)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def lora_run(chat_data, base_run, tmp_path_factory):
    """LoRA SFT of the base on reversals: (out_dir, the run's CompletedProcess)."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    result = run_script("train.py", *RUN, f"--dataset={chat_data['reverse']}", f"--out_dir={out}",
                        f"--init_from={base_run}", f"--model_overrides={LORA}", "--learning_rate=1e-2",
                        "--min_lr=1e-3", f"--max_iters={STEPS}", f"--lr_decay_iters={STEPS}",
                        f"--eval_interval={STEPS}", env=ONE_THREAD, timeout=900)
    assert result.returncode == 0, result.stderr
    return out, result


@torch.no_grad()
def exact_match(next_logits, meta, words, task="reverse"):
    """Share of words whose greedy reply to '<task>: <word>' is exactly the answer and then the '\\n\\n' stop.
    next_logits(idx) -> logits (B, V) of the last position: ours or a transformers model."""
    tok = load_tokenizer(meta)
    idx = torch.tensor([render_prompt(tok, conversation(w, task)[:1], "plain") for w in words])
    n_new = len(words[0]) + 2
    for _ in range(n_new):
        idx = torch.cat([idx, next_logits(idx).argmax(-1, keepdim=True)], dim=1)
    replies = [tok.decode(row[-n_new:]) for row in idx.tolist()]
    return sum(r == conversation(w, task)[1]["content"] + "\n\n" for r, w in zip(replies, words)) / len(words)


def ours(model):
    return lambda idx: model(idx)[0][:, -1]


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# LoRA SFT with train.py


def test_lora_sft_teaches_reversal(base_run, lora_run):
    base, meta = checkpoint.load_model(base_run)
    tuned, tuned_meta = checkpoint.load_model(lora_run[0])
    assert tuned_meta["chat_format"] == "plain" and tuned.config.lora_rank == 8
    copies = exact_match(ours(base), meta, HELD_OUT, task="restate")
    before, after = exact_match(ours(base), meta, HELD_OUT), exact_match(ours(tuned), meta, HELD_OUT)
    assert copies >= 0.9 and before <= 0.05 and after >= 0.9, (copies, before, after)
    # only the adapters trained: every other weight is the base's, bit for bit
    base_state = base.state_dict()
    frozen = {k: v for k, v in tuned.state_dict().items() if "lora" not in k}
    assert frozen.keys() == base_state.keys() and all(torch.equal(v, base_state[k]) for k, v in frozen.items())
    # r * (in + out) per adapted Linear, C = 64: c_attn C->3C, attn.c_proj C->C, c_fc C->4C, mlp.c_proj 4C->C
    assert f"training {2 * 8 * 64 * (4 + 2 + 5 + 5):,} LoRA adapter parameters" in lora_run[1].stdout
    # the checkpoint holds the adapters alone and names the base, which it was loaded from
    with safe_open(str(lora_run[0] / "ckpt" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == {n for n, _ in tuned.named_parameters() if "lora" in n}
    assert checkpoint.read(lora_run[0])["base"]["init_from"] == str(base_run)
    # in a narrower dtype (the float32 base is checked and narrowed on the CPU): the same model, rounded
    narrow, _ = checkpoint.load_model(lora_run[0], dtype=torch.bfloat16)
    assert all(torch.equal(v, tuned.state_dict()[k].bfloat16()) for k, v in narrow.state_dict().items())


def test_sample_py_merges_the_adapters_and_answers_like_them(lora_run):
    """sample.py folds a LoRA run's adapters into the weights (base-model speed): its greedy text is the unmerged
    model's, token for token."""
    tuned, meta = checkpoint.load_model(lora_run[0])
    assert tuned.config.lora_rank == 8  # load_model keeps them: export and the tests above read them
    tok = load_tokenizer(meta)
    for word in HELD_OUT[:3]:
        prompt = render_prompt(tok, conversation(word, "reverse")[:1], "plain")
        expected = tok.decode(tuned.generate(torch.tensor([prompt]), 6, temperature=0)[0].tolist())
        result = run_script("sample.py", f"--out_dir={lora_run[0]}", "--device=cpu", "--chat_format=none",
                            f"--start={tok.decode(prompt)}", "--num_samples=1", "--max_new_tokens=6",
                            "--temperature=0")
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout, (expected, result.stdout)


def test_sft_loss_counts_only_the_assistant_tokens(base_run, lora_run, chat_data):
    """val.bin holds one conversation, so train.py's val loss is that row's loss: at step 0 (the adapters start
    at zero) the base's, at the end the tuned model's. Recomputed here over the reply and its stop only."""
    evals = {r["iter"]: r["val_loss"] for r in map(json.loads, open(lora_run[0] / "history.jsonl")) if "val_loss" in r}
    tok = load_tokenizer(read_meta(chat_data["reverse"]))
    prompt = render_prompt(tok, conversation(VAL_WORD, "reverse")[:1], "plain")
    ids = torch.tensor(prompt + tok.encode(VAL_WORD[::-1] + "\n\n"))
    for step, run in ((0, base_run), (STEPS, lora_run[0])):
        model, _ = checkpoint.load_model(run)
        with torch.no_grad():
            logits = model(ids[None, :-1])[0][0]
        expected = F.cross_entropy(logits[len(prompt) - 1:], ids[len(prompt):]).item()
        assert evals[step] == pytest.approx(expected, rel=1e-4, abs=1e-6), (step, evals[step], expected)


def test_lora_from_hugging_face_dir_with_bf16_base_resumes_exactly(chat_data, base_run, tmp_path):
    """LoRA on a Hugging Face directory (here the base, exported) with base_dtype=bfloat16. Checkpoints hold the
    float32 adapters and name their base, which loading rebuilds in bf16; a run stopped and resumed from such a
    checkpoint gives, bit for bit, the losses and the model of an uninterrupted run that saved the whole model."""
    hf_base = tmp_path / "hf-base"
    base, _, meta = export.load_run(base_run)
    export.export_merged(base, meta, "scratch", hf_base, torch.float32, 2**30)
    common = [*RUN, "--batch_size=16", "--log_interval=1", "--eval_interval=3", "--lr_decay_iters=6",
              "--warmup_iters=2", "--dtype=bfloat16", "--base_dtype=bfloat16", f"--dataset={chat_data['reverse']}",
              f"--model_overrides={{'lora_rank': 4, 'lora_targets': 'attn.c_attn,mlp.c_fc'}}"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    for out, args in ((whole, ["--max_iters=6", "--save_base_weights=True"]), (part, ["--max_iters=3"])):
        result = run_script("train.py", *common, f"--init_from={hf_base}", f"--out_dir={out}", *args, env=ONE_THREAD)
        assert result.returncode == 0, result.stderr
    result = run_script("train.py", *common, "--init_from=resume", f"--out_dir={part}", "--max_iters=6",
                        env=ONE_THREAD)
    assert result.returncode == 0, result.stderr

    def losses(out):
        return {r["iter"]: r["loss"] for r in map(json.loads, open(out / "history.jsonl")) if "loss" in r}
    assert losses(part) == losses(whole) and sorted(losses(whole)) == list(range(6))
    dtypes = {}
    for out in (whole, part):
        with safe_open(str(out / "ckpt" / "model.safetensors"), "pt") as f:
            dtypes[out] = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes[whole].items() if "lora" not in k} == {"BF16"}
    assert set(dtypes[part].values()) == {"F32"} and dtypes[part].keys() == {k for k in dtypes[whole] if "lora" in k}
    info = checkpoint.read(part)
    assert info["base"]["init_from"] == str(hf_base) and info["base"]["dtype"] == "bfloat16"
    tuned, _ = checkpoint.load_model(part)  # the base weights are the Hugging Face ones, rounded to bf16
    for name, p in base.named_parameters():
        assert torch.equal(tuned.get_parameter(name), p.detach().to(torch.bfloat16).float()), name
    reference, _ = checkpoint.load_model(whole)
    assert tuned.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in tuned.state_dict().items())
    # a LoRA run on this run starts from its adapters merged into the bf16 base in float32 (not rounded to bf16)
    merged = checkpoint.load_base({"init_from": str(part), "dtype": "float32"})
    tuned.merge_lora()
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in merged.state_dict().items())
    assert any(p.dtype == torch.float32 and not torch.equal(p, p.bfloat16().float()) for p in merged.parameters())

    # a base that changed since (here: retrained, one weight nudged) or moved away is a one-line error
    state = {k: v.clone() for k, v in base.state_dict().items()}
    state["transformer.h.1.mlp.c_fc.weight"][0, 0] += 0.5
    base.load_state_dict(state)
    export.export_merged(base, meta, "scratch", hf_base, torch.float32, 2**30)
    with pytest.raises(checkpoint.CheckpointError, match="not the model these adapters were trained on"):
        checkpoint.load_model(part)
    result = run_script("sample.py", f"--out_dir={part}", "--device=cpu", "--max_new_tokens=2")
    assert_one_line_error(result, "h.1.mlp.c_fc.weight differs", "base.init_from")
    hf_base.rename(tmp_path / "moved")
    result = run_script("train.py", *common, "--init_from=resume", f"--out_dir={part}", "--max_iters=7")
    assert_one_line_error(result, str(hf_base), "does not load", "base.init_from")


def test_memory_estimate_gpt_oss_20b_without_weights(tmp_path):
    """estimate_only: the README's estimate for gpt-oss-20b LoRA with the original settings, from config.json
    alone (no weights, no data). Parameter counts and the bytes they take are checked by hand."""
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config_from(GPTConfig.preset("gpt-oss-20b"))))
    result = run_script("train.py", "config/finetune_gpt_oss_lora.py", "--estimate_only=True",
                        f"--init_from={tmp_path}", f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out").exists()
    V, C, L, H, KV, D, E, I, r = 201088, 2880, 24, 64, 8, 64, 32, 2880, 8
    layer = (C * H * D + H * D) + 2 * (C * KV * D + KV * D) + (H * D * C + C) + H + 2 * C + (C * E + E) \
        + E * (C * 2 * I + 2 * I) + E * (I * C + C)  # q, k and v, o, sinks, norms, router, experts (with biases)
    base = 2 * V * C + L * layer + C  # untied embedding and head, final norm
    adapters = 3 * E * r * (I + C)  # down_proj [E, I, C] of layers 7, 15, 23
    assert f"training {adapters:,} LoRA adapter parameters, 0.021% of {base + adapters:,}" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("memory estimate"))
    gib = (base * 2 + adapters * 4) / 2**30  # bf16 base, float32 adapters
    assert f"weights {gib:.2f} GiB, gradients {adapters * 4 / 2**20:.1f} MiB, " \
           f"optimizer {adapters * 8 / 2**20:.1f} MiB" in line, line
    activations, total = map(float, re.search(r"activations (\S+) GiB; total (\S+) GiB", line).groups())
    assert total == pytest.approx(gib + adapters * 12 / 2**30 + activations, abs=0.01)
    assert activations > 1 and total < 80e9 / 2**30, line  # it fits one 80 GB GPU
    assert "micro-batch 4 x 2048 tokens, bfloat16, gradient checkpointing on" in line


# ----------------------------------------------------------------------------------------------------------------
# merging and PEFT, for the three families: tiny random models with random adapters (B = 0 would hide mistakes)

FAMILIES = {
    "gpt2": (GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, tie_embeddings=False),
             "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj,lm_head"),
    "gemma3": (GPTConfig.preset("gemma3-compact", vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                                n_embd=32, head_dim=8, mlp_hidden=48, sliding_window=8, attn_scale_dim=8,
                                attn_pattern="SF"),
               "attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"),  # q/k/v and gate/up split for Hugging Face
    "gpt-oss": (GPTConfig.preset("gpt-oss-compact", vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                                 n_embd=32, head_dim=8, mlp_hidden=16, sliding_window=8, n_expert=4,
                                 n_expert_active=2, tie_embeddings=False, qkv_bias=True, attn_out_bias=True,
                                 router_bias=True),
                "attn.c_attn,h.0.mlp.router,h.0.mlp.down,h.1.mlp.gate_up,h.1.mlp.down"),  # per-expert adapters
}


def tiny_with_adapters(family, tmp_path):
    """(our model with random adapters, the Hugging Face directory of its base, token ids of 20 > window)."""
    config, targets = FAMILIES[family]
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # our init leaves biases and sinks at zero
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    model.add_lora(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.normal_(0, 0.2)
    return model.eval(), base_dir, torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_logits_equal_adapter_logits(family, tmp_path):
    model, _, idx = tiny_with_adapters(family, tmp_path)
    with torch.no_grad():
        adapted = model(idx)[0]
        merged = model.merge_lora()(idx)[0]
    assert model.config.lora_rank == 0 and not model.lora_parameters()
    assert max_diff(merged, adapted) < 1e-5


def test_merged_trained_model_equals_adapters(lora_run):
    """The trained adapters are large and its logits reach ~30, where float32 rounding alone differs by ~3e-5
    between the two orders of summation: compared in float64, the merge must be exact to 1e-5 all the same."""
    model, meta = checkpoint.load_model(lora_run[0], dtype=torch.float64)
    tok = load_tokenizer(meta)
    idx = torch.tensor([render_prompt(tok, conversation(w, "reverse")[:1], "plain") for w in HELD_OUT[:16]])
    with torch.no_grad():
        adapted = model(idx)[0]
        merged = model.merge_lora()(idx)[0]
    assert max_diff(merged, adapted) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_applies_our_adapter(family, tmp_path):
    """export.py's PEFT layout: PeftModel on transformers' model of the same base gives our logits."""
    PeftModel = pytest.importorskip("peft").PeftModel
    model, base_dir, idx = tiny_with_adapters(family, tmp_path)
    export.export_adapter(model, str(base_dir), str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert ("target_parameters" in config) == (family == "gpt-oss")
    reference = AutoModelForCausalLM.from_pretrained(base_dir, **EAGER).eval()
    with torch.no_grad():
        plain = reference(idx).logits
        adapted = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()(idx).logits
        expected = model(idx)[0]
    assert max_diff(plain, expected) > 1e-2  # the adapters matter...
    assert max_diff(adapted, expected) < 1e-4  # ...and PEFT applies them as we do


# ----------------------------------------------------------------------------------------------------------------
# export.py end to end


def test_export_merged_and_adapter(base_run, lora_run, tmp_path):
    PeftModel = pytest.importorskip("peft").PeftModel
    tuned, meta = checkpoint.load_model(lora_run[0])
    # merged, bfloat16, sharded: transformers loads it and it still reverses the held-out words
    hf_dir = tmp_path / "hf"
    result = run_script("export.py", f"--out_dir={lora_run[0]}", f"--export_dir={hf_dir}", "--max_shard_gb=0.00005")
    assert result.returncode == 0, result.stderr
    shards = sorted(p.name for p in hf_dir.glob("model-*.safetensors"))
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    with safe_open(str(hf_dir / shards[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((hf_dir / "meta.json").read_text()) == meta  # sample.py / serve.py find the tokenizer
    merged = AutoModelForCausalLM.from_pretrained(hf_dir, **EAGER).eval()
    assert exact_match(lambda idx: merged(idx).logits[:, -1], meta, HELD_OUT) >= 0.9
    # the base in float32 (in-process: the same code as above) plus the adapter alone: PEFT reproduces the tuned model
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base, _, base_meta = export.load_run(base_run)
    export.export_merged(base, base_meta, "scratch", base_dir, torch.float32, 2**30)
    result = run_script("export.py", f"--out_dir={lora_run[0]}", f"--export_dir={adapter_dir}", "--adapter_only=True")
    assert result.returncode == 0, result.stderr
    assert "PEFT needs the base model in Hugging Face form" in result.stdout  # the run started from an out_dir
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tok = load_tokenizer(meta)
    idx = torch.tensor([render_prompt(tok, conversation(w, "reverse")[:1], "plain") for w in HELD_OUT[:16]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, **EAGER), adapter_dir)
    with torch.no_grad():
        assert max_diff(reference.eval()(idx).logits, tuned(idx)[0]) < 1e-4


def test_errors_are_one_line(chat_data, base_run, tmp_path):
    result = run_script("train.py", *RUN, f"--dataset={chat_data['reverse']}", f"--init_from={base_run}",
                        f"--out_dir={tmp_path / 'a'}", "--block_size=32")
    assert_one_line_error(result, "rows of 41 tokens", "block_size=40")
    result = run_script("train.py", *RUN, f"--dataset={chat_data['reverse']}", f"--init_from={base_run}",
                        f"--out_dir={tmp_path / 'b'}", "--dtype=bfloat16", "--base_dtype=bfloat16")
    assert_one_line_error(result, "base_dtype=bfloat16", "lora_rank")
    result = run_script("export.py", f"--out_dir={base_run}", f"--export_dir={tmp_path / 'c'}", "--adapter_only=True")
    assert_one_line_error(result, "no LoRA adapters", "without --adapter_only")
    result = run_script("export.py", f"--out_dir={tmp_path / 'nothing'}", f"--export_dir={tmp_path / 'd'}")
    assert_one_line_error(result, "no checkpoint")
