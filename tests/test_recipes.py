"""The Gemma 3 and GPT-OSS training recipes (config/train_gemma3.py, config/train_gpt_oss.py): their settings
are the original recipes', and scaled down to CPU size they learn and leave a complete out_dir behind.
(Preset parameter counts and the aux loss against transformers are in test_hf.py.)"""
import ast
import json
import math
import re

import numpy as np
import pytest
import tiktoken
import torch

import checkpoint
from conftest import SHAKESPEARE, run_script

STEP = re.compile(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})$", re.M)
EXPERT_LOAD = re.compile(r"^  (?:moe aux loss (\S+), )?expert load .*: ((?:\d+\.\d ?)+)$", re.M)
GPT2_VOCAB = 50257
CPU = ["--device=cpu", "--compile=False", "--dtype=float32", "--wandb_log=False"]


def settings(config_file):
    """The config keys train.py ends up with after reading `config_file` (its --help listing), and its stderr."""
    result = run_script("train.py", config_file, "--help")
    assert result.returncode == 0, result.stderr
    pairs = re.findall(r"^  (\w+) = (.*)$", result.stdout, re.M)
    return {key: ast.literal_eval(value) for key, value in pairs}, result.stderr  # printed with repr()


def val_losses(result):
    return [float(v) for _, _, v in STEP.findall(result.stdout)]


# the recipes as the original training scripts set them
GEMMA3_RECIPE = dict(model='gemma3-compact', dataset='wikipedia', learning_rate=1e-4, beta1=0.9, beta2=0.95,
                     weight_decay=0.1, warmup_iters=100, lr_decay_iters=10000, max_iters=10000, decay_lr=True,
                     gradient_accumulation_steps=4, batch_size=1, block_size=2048, eval_interval=200,
                     optimizer='adamw')
GPT_OSS_RECIPE = dict(model='gpt-oss-compact', learning_rate=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1,
                      warmup_iters=0, lr_decay_iters=1000, max_iters=1000, min_lr=1e-6, decay_lr=True,
                      gradient_accumulation_steps=1, batch_size=5, block_size=128, grad_clip=1.0, dtype='bfloat16',
                      optimizer='adamw')


@pytest.mark.parametrize("config_file, recipe", [("config/train_gemma3.py", GEMMA3_RECIPE),
                                                 ("config/train_gpt_oss.py", GPT_OSS_RECIPE)])
def test_config_is_the_original_recipe(config_file, recipe):
    got, stderr = settings(config_file)
    assert stderr == ""  # no "sets 'x', which is not a config key" warnings: every setting reaches train.py
    assert {key: got[key] for key in recipe} == recipe
    assert got['model_overrides'] == {}  # the preset as it is: aux weight 0.01 (GPTConfig's default) for gpt-oss


def wikipedia_style_jsonl(path, n_docs=60):
    """Articles as the hub gives them ({"text": ...} per line): here consecutive pieces of Shakespeare."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    size = len(text) // n_docs
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": text[i * size:(i + 1) * size]}) + "\n")
    return path


# Hugging Face datasets as data/wikipedia/prepare.py uses it, offline: English Wikipedia as a stream of articles
FAKE_DATASETS = """
import os
def load_dataset(path, name, split, streaming=False):
    # a sliced, non-streaming load would download all 6.4M articles first
    assert (path, name, split, streaming) == ("wikimedia/wikipedia", "20231101.en", "train", True)
    if os.environ.get("FAKE_OFFLINE"):
        raise ConnectionError("Couldn't reach 'wikimedia/wikipedia' on the Hub (LocalEntryNotFoundError)")
    return ({"id": str(i), "text": f"Article {i}."} for i in range(6_407_814))
"""


def test_wikipedia_hub_slices_are_the_recipes(tmp_path):
    """train[:n_train], val the next n_val articles, test from article 81,000 on, streamed."""
    (tmp_path / "datasets.py").write_text(FAKE_DATASETS)
    out = tmp_path / "wikipedia"
    args = [f"--out_dir={out}", "--n_train=3", "--n_val=2", "--n_test=2"]
    result = run_script("data/wikipedia/prepare.py", *args, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    enc = tiktoken.get_encoding("gpt2")
    for split, articles in [("train", [0, 1, 2]), ("val", [3, 4]), ("test", [81000, 81001])]:
        expected = [t for i in articles for t in enc.encode_ordinary(f"Article {i}.") + [enc.eot_token]]
        assert np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist() == expected, split
    result = run_script("data/wikipedia/prepare.py", *args, env={"PYTHONPATH": str(tmp_path), "FAKE_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: could not read wikimedia/wikipedia") and "--input=PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_gemma3_recipe_learns_on_wikipedia_jsonl(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is missing")
    data = tmp_path / "wikipedia"
    result = run_script("data/wikipedia/prepare.py", f"--input={wikipedia_style_jsonl(tmp_path / 'docs.jsonl')}",
                        f"--out_dir={data}")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out-gemma3"
    tiny = ("{'n_layer': 6, 'n_embd': 64, 'n_head': 4, 'head_dim': 16, 'mlp_hidden': 128, 'sliding_window': 8, "
            "'attn_scale_dim': 16}")  # five sliding layers and one full, as in the preset's pattern
    result = run_script("train.py", "config/train_gemma3.py", *CPU, f"--dataset={data}", f"--out_dir={out}",
                        f"--model_overrides={tiny}", "--block_size=32", "--learning_rate=1e-2", "--warmup_iters=5",
                        "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=15", "--eval_iters=4",
                        "--log_interval=5")
    assert result.returncode == 0, result.stderr
    vals = val_losses(result)
    assert len(vals) == 3
    assert vals[0] == pytest.approx(math.log(GPT2_VOCAB), abs=0.1)  # a fresh model guesses uniformly
    assert vals[-1] < vals[0] - 2.0, vals

    # what users of the recipe find in out_dir
    for name in ("config.json", "model.safetensors", "meta.json", "history.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 15, 30]
    assert [r["iter"] for r in records if "loss" in r] == [0, 5, 10, 15, 20, 25]
    assert [round(r["val_loss"], 4) for r in records if "val_loss" in r] == vals
    model, meta = checkpoint.load_model(out)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("gpt2", GPT2_VOCAB, GPT2_VOCAB - 1)
    c = model.config
    assert (c.n_layer, c.n_embd, c.sliding_window, c.vocab_size) == (6, 64, 8, GPT2_VOCAB)
    assert (c.sandwich_norm, c.qk_norm, c.mlp, c.n_kv_head, c.tie_embeddings) == (True, True, "geglu", 1, False)
    assert [c.layer_kind(i) for i in range(6)] == list("SSSSSF")
    info = checkpoint.read(out)
    assert info["iter_num"] == 30 and info["train_config"]["gradient_accumulation_steps"] == 4


def test_gpt_oss_recipe_moe_learns_on_shakespeare(shakespeare_gpt2, tmp_path):
    out = tmp_path / "out-gpt-oss"
    n_layer, n_expert, top_k = 2, 4, 2
    tiny = (f"{{'n_layer': {n_layer}, 'n_embd': 64, 'n_head': 4, 'n_kv_head': 2, 'head_dim': 16, "
            f"'mlp_hidden': 64, 'n_expert': {n_expert}, 'n_expert_active': {top_k}, 'sliding_window': 16}}")
    result = run_script("train.py", "config/train_gpt_oss.py", *CPU, f"--dataset={shakespeare_gpt2}",
                        f"--out_dir={out}", f"--model_overrides={tiny}", "--block_size=32", "--batch_size=4",
                        "--learning_rate=1e-2", "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=15",
                        "--eval_iters=4", "--log_interval=5")
    assert result.returncode == 0, result.stderr
    vals = val_losses(result)
    assert len(vals) == 3
    assert vals[0] == pytest.approx(math.log(GPT2_VOCAB), abs=0.1)
    assert vals[-1] < vals[0] - 2.0, vals
    # each eval reports the load-balancing loss and every expert's share of the routed tokens
    reports = EXPERT_LOAD.findall(result.stdout)
    assert [aux for aux, _ in reports][0] == ""  # at step 0 no training step has computed it yet: not printed
    # E * sum_e f_e * P_e with sum_e f_e = top_k: top_k when balanced, at most n_expert (all tokens on top_k experts)
    assert len(reports) == 3 and all(0.9 * top_k < float(aux) <= n_expert for aux, _ in reports[1:]), reports
    for _, shares in reports:
        assert len(shares.split()) == n_expert and all(float(s) > 0 for s in shares.split()), shares

    # routing from the trained checkpoint: each layer sends every token to top_k experts, and every expert
    # gets tokens. Summed over layers: transformers' load-balancing loss (the one trained here) balances the
    # load of all layers together, so one layer may still leave an expert idle
    model, meta = checkpoint.load_model(out)
    assert (model.config.n_expert, model.config.attn_sinks, model.config.moe_aux_loss_weight) == (n_expert, True, 0.01)
    val = np.memmap(shakespeare_gpt2 / "val.bin", dtype=meta["dtype"], mode="r")
    idx = torch.from_numpy(val[:64 * 32].astype(np.int64)).view(64, 32)  # 2,048 tokens, 4,096 routings per layer
    with torch.no_grad():
        model(idx)
    load = model.expert_load()
    assert load.shape == (n_layer, n_expert)
    assert load.sum(dim=1).tolist() == [idx.numel() * top_k] * n_layer
    assert (load.sum(dim=0) > 0).all(), load  # a router collapsed in every layer would leave an expert with none
