"""train.py and checkpoint.py: learning, exact resume, crash-safe saves, DDP equivalence, NaN stop, clear errors."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
from conftest import REPO, TINY, run_script
from model import GPT, GPTConfig

STEP = re.compile(r"^step (\d+): train loss (\d+\.\d{4}), val loss (\d+\.\d{4})$", re.M)


def history(out_dir):
    with open(out_dir / "history.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    """{iter: full-precision training loss} from history.jsonl."""
    return {r["iter"]: r["loss"] for r in history(out_dir) if "loss" in r}


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def copy_run(trained_char, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_char[0], out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# learning and what a run leaves behind


def test_loss_falls_and_out_dir_is_complete(trained_char):
    out, result = trained_char
    steps = [(int(i), float(t), float(v)) for i, t, v in STEP.findall(result.stdout)]
    assert [s[0] for s in steps] == [0, 100, 200]
    assert steps[0][2] > 4.0 and steps[-1][2] < 2.8, steps  # from ln(65) = 4.17 down
    assert re.search(r"^iter 190: loss \d+\.\d{4}, lr \S+, time \S+ms, \S+ tok/s, mfu \S+%$", result.stdout, re.M)
    for name in ("config.json", "model.safetensors", "meta.json", "history.jsonl", "loss.png",
                 "ckpt/config.json", "ckpt/model.safetensors", "ckpt/meta.json", "ckpt/train_state.pt"):
        assert (out / name).is_file(), name
    assert not (out / "ckpt.tmp").exists() and not (out / "ckpt.old").exists()
    info = checkpoint.read(out)
    assert info["iter_num"] == 200 and info["best_val_loss"] == pytest.approx(steps[-1][2], abs=1e-4)
    assert info["train_config"]["n_layer"] == 2 and info["model_config"]["vocab_size"] == 65
    evals = [r for r in history(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 100, 200]
    model, meta = checkpoint.load_model(out)
    assert meta["tokenizer"] == "char" and model.config.n_layer == 2
    model2, _ = checkpoint.load_model(out / "ckpt")  # the checkpoint directory itself works too
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)


def test_best_val_loss_only_improves(trained_char, shakespeare_char, tmp_path):
    """Resume with a learning rate so high that val loss worsens: the best stays, no checkpoint is written."""
    out = copy_run(trained_char, tmp_path)
    best = checkpoint.read(out)["best_val_loss"]
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--init_from=resume",
                        "--max_iters=210", "--eval_interval=5", "--decay_lr=False", "--learning_rate=0.5",
                        "--always_save_checkpoint=False", "--grad_clip=0.0")
    assert result.returncode == 0, result.stderr
    vals = [float(v) for _, _, v in STEP.findall(result.stdout)]
    assert vals[-1] > best  # it got worse...
    assert checkpoint.read(out)["best_val_loss"] == best  # ...and the best (and its checkpoint) stayed
    assert checkpoint.read(out)["iter_num"] == 200


# ----------------------------------------------------------------------------------------------------------------
# resume: a killed run continues exactly


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_kill_and_resume_matches_uninterrupted(shakespeare_char, tmp_path, signum):
    """kill -9: the run continues from its last checkpoint (iter 8). SIGTERM (preemption) and SIGINT (Ctrl-C): the
    run finishes its iteration, saves it and exits 128 + signal, losing nothing. Either way the resumed run's
    losses are the uninterrupted run's, bit for bit."""
    common = [*TINY, f"--dataset={shakespeare_char}", "--max_iters=24", "--lr_decay_iters=24", "--eval_interval=8",
              "--dropout=0.1", "--eval_iters=2"]  # dropout: the RNG must be restored too
    whole = tmp_path / "whole"
    result = run_script("train.py", *common, f"--out_dir={whole}")
    assert result.returncode == 0, result.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *common, f"--out_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("iter 13:"):
            proc.send_signal(signum)
            if signum == signal.SIGTERM:  # a scheduler's and torchrun's copies: still one graceful stop
                proc.send_signal(signum)
            break
    rest, errors = proc.communicate(timeout=60)
    start = checkpoint.read(out)["iter_num"]
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and start == 8
    else:  # the signal came after iteration 13 (a busy machine may run a few more before it arrives)
        assert proc.returncode == 128 + signum and 14 <= start < 24 and errors == "", errors
        name = signal.Signals(signum).name
        assert f"stopped by {name} after iter {start - 1}: --init_from=resume continues from iter {start}" in rest

    result = run_script("train.py", *common, f"--out_dir={out}", "--init_from=resume")
    assert result.returncode == 0, result.stderr
    expected, resumed = train_losses(whole), train_losses(out)
    assert sorted(resumed) == list(range(24))
    assert {i: resumed[i] for i in range(start, 24)} == {i: expected[i] for i in range(start, 24)}  # bit for bit
    printed = re.findall(r"^iter (\d+): loss (\S+),", result.stdout, re.M)
    assert printed[0][0] == str(start) and len(printed) == 24 - start


# ----------------------------------------------------------------------------------------------------------------
# crash-safe saves: kill -9 in the middle of writing a checkpoint

SAVE_SCRIPT = """
import os, sys, time
import torch
sys.path.insert(0, {repo!r})
import checkpoint
from model import GPT, GPTConfig
out, stage = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16))
checkpoint.save(out, model, dict(iter_num=1), dict(tokenizer="char"), dict(step=torch.tensor(1)))
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)

def pause():
    print("PAUSED", flush=True)
    time.sleep(120)

if stage == "write":  # the new weights are on disk in ckpt.tmp, the rest not yet
    real_fsync = checkpoint._fsync
    checkpoint._fsync = lambda path: (real_fsync(path), pause())
else:  # "swap": ckpt/ was renamed to ckpt.old/, ckpt.tmp/ not yet to ckpt/
    real_rename = os.rename
    os.rename = lambda a, b: (real_rename(a, b), pause())
checkpoint.save(out, model, dict(iter_num=2), dict(tokenizer="char"), dict(step=torch.tensor(2)))
"""


@pytest.mark.parametrize("stage", ["write", "swap"])
def test_kill_during_save_leaves_previous_checkpoint(tmp_path, stage):
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT.format(repo=str(REPO)))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out), stage], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "PAUSED"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (out / ("ckpt.tmp" if stage == "write" else "ckpt.old")).is_dir()

    info = checkpoint.read(out)  # the first checkpoint, whole
    assert info["iter_num"] == 1
    model, meta = checkpoint.load_model(out)
    torch.manual_seed(0)
    reference = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert meta == {"tokenizer": "char"}
    assert checkpoint.load_train_state(info)["step"].item() == 1
    # and the next save recovers the usual layout
    checkpoint.save(out, reference, dict(iter_num=3), meta)
    assert checkpoint.read(out)["iter_num"] == 3
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ckpt"]


# ----------------------------------------------------------------------------------------------------------------
# DDP: two processes, the same global batch, the same losses


def test_torchrun_two_processes_match_single_process(shakespeare_char, tmp_path):
    common = [*TINY, f"--dataset={shakespeare_char}", "--max_iters=6", "--eval_interval=3", "--eval_iters=4",
              "--gradient_accumulation_steps=2", "--batch_size=4"]
    single = tmp_path / "single"
    result = run_script("train.py", *common, f"--out_dir={single}")
    assert result.returncode == 0, result.stderr
    ddp = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train.py"), *common, f"--out_dir={ddp}"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 3:") == 1  # only the master logs
    a, b = history(single), history(ddp)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "train_loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-4), (ra, rb)
    assert checkpoint.read(ddp)["iter_num"] == 6


# ----------------------------------------------------------------------------------------------------------------
# NaN: stop, exit non-zero, keep the last good checkpoint


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shakespeare_char, tmp_path):
    out = tmp_path / "out"
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--max_iters=20",
                        "--eval_interval=5", "--eval_iters=2", env={"NANOFORGE_TEST_NAN_AT": "7"})
    assert_one_line_error(result, "nan", "iter 7", "last good checkpoint")
    assert "iter 8:" not in result.stdout
    info = checkpoint.read(out)
    assert info["iter_num"] == 5
    model, _ = checkpoint.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_save_stops_and_keeps_previous_checkpoint(shakespeare_char, tmp_path):
    """A checkpoint that cannot be written stops the run with one line and leaves the previous one loadable. Where
    mounting is allowed (root), out_dir is a 2 MB tmpfs that one 1.3 MB checkpoint fits and a second fills up;
    elsewhere a file stands where the save's temporary directory goes."""
    out = tmp_path / "out"
    out.mkdir()
    try:
        full_disk = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(out)],
                                   capture_output=True).returncode == 0
    except OSError:  # no mount command
        full_disk = False
    try:
        common = [*TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--eval_interval=4", "--eval_iters=2"]
        result = run_script("train.py", *common, "--max_iters=4")
        assert result.returncode == 0, result.stderr
        if not full_disk:
            (out / "ckpt.tmp").write_text("in the way")
        result = run_script("train.py", *common, "--max_iters=8", "--init_from=resume")
        assert_one_line_error(result, "iter 8: could not write a checkpoint", f"last complete checkpoint is {out}")
        if full_disk:
            assert re.search(r"\(\d+\.\d MB free; ", result.stderr), result.stderr
            assert not (out / "ckpt.tmp").exists()  # the failed save's files are removed
        assert checkpoint.read(out)["iter_num"] == 4
        model, _ = checkpoint.load_model(out)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        if full_disk:
            subprocess.run(["umount", str(out)], check=True)


# ----------------------------------------------------------------------------------------------------------------
# clear errors


def test_missing_dataset_names_prepare_script(tmp_path):
    empty = tmp_path / "shakespeare_char"
    empty.mkdir()
    result = run_script("train.py", "--device=cpu", f"--dataset={empty}", f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "python data/shakespeare_char/prepare.py")
    result = run_script("train.py", "--device=cpu", "--dataset=no_such_data", f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(result, "no_such_data", "shakespeare_char")


def test_resume_with_other_architecture_says_which(trained_char, shakespeare_char, tmp_path):
    out = copy_run(trained_char, tmp_path)
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--init_from=resume",
                        "--n_layer=3", "--max_iters=201")
    assert_one_line_error(result, "architecture mismatch", "n_layer=2", "3")


def test_resume_with_other_vocab_says_which(trained_char, tmp_path):
    text = tmp_path / "abc.txt"
    text.write_text("abcdefg hij\n" * 500)
    data = tmp_path / "abc"
    assert run_script("data/shakespeare_char/prepare.py", f"--input={text}", f"--out_dir={data}").returncode == 0
    out = copy_run(trained_char, tmp_path)
    result = run_script("train.py", *TINY, f"--dataset={data}", f"--out_dir={out}", "--init_from=resume",
                        "--max_iters=201")
    assert_one_line_error(result, "vocab mismatch", "65", "12")


def test_truncated_checkpoint_names_the_file(trained_char, shakespeare_char, tmp_path):
    out = copy_run(trained_char, tmp_path)
    weights = out / "ckpt" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--init_from=resume",
                        "--max_iters=201")
    assert_one_line_error(result, str(weights), "truncated")
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
        checkpoint.load_model(out)
    (out / "ckpt" / "config.json").write_text('{"format": "nanofo')  # cut mid-write
    with pytest.raises(checkpoint.CheckpointError, match="config.json"):
        checkpoint.read(out)


def test_resume_without_checkpoint_and_bad_overrides(shakespeare_char, tmp_path):
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={tmp_path / 'none'}",
                        "--init_from=resume")
    assert_one_line_error(result, "no checkpoint")
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={tmp_path / 'x'}",
                        "--model_overrides={'n_layers': 3}")
    assert_one_line_error(result, "n_layers", "GPTConfig")
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={tmp_path / 'x'}",
                        "--wandb_log=True", "--max_iters=0")
    if result.returncode != 0:  # where wandb is not installed, or cannot start (no API key, no network)
        assert_one_line_error(result, "wandb")
        assert "pip install wandb" in result.stderr or "wandb.init failed" in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------------------------
# other architectures and inits: presets with overrides, Muon, Hugging Face weights


def test_preset_with_overrides_and_muon(shakespeare_char, tmp_path):
    """A tiny Gemma-3-style model (RoPE, sliding layers, MQA) trained with Muon, then resumed."""
    out = tmp_path / "out"
    overrides = ("{'n_layer': 2, 'n_head': 2, 'n_kv_head': 1, 'n_embd': 64, 'head_dim': 32, 'mlp_hidden': 128, "
                 "'sliding_window': 16, 'attn_pattern': 'SF', 'block_size': 64}")
    args = [*TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--model=gemma3-compact",
            f"--model_overrides={overrides}", "--optimizer=muon", "--eval_interval=10", "--eval_iters=2"]
    result = run_script("train.py", *args, "--max_iters=10")
    assert result.returncode == 0, result.stderr
    config = checkpoint.read(out)["model_config"]
    assert (config["attn_pattern"], config["n_kv_head"], config["vocab_size"]) == ("SF", 1, 65)
    result = run_script("train.py", *args, "--max_iters=12", "--init_from=resume")
    assert result.returncode == 0, result.stderr
    assert checkpoint.read(out)["iter_num"] == 12
    result = run_script("train.py", *args, "--max_iters=14", "--init_from=resume", "--optimizer=adamw")
    assert_one_line_error(result, "optimizer")


def test_moe_model_logs_expert_load(shakespeare_char, tmp_path):
    overrides = ("{'n_layer': 1, 'n_head': 2, 'n_kv_head': 1, 'n_embd': 32, 'head_dim': 16, 'mlp_hidden': 32, "
                 "'n_expert': 4, 'n_expert_active': 2, 'sliding_window': 8, 'block_size': 32, 'vocab_size': 65}")
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={tmp_path / 'out'}",
                        "--model=gpt-oss-compact", f"--model_overrides={overrides}", "--max_iters=4",
                        "--eval_interval=4", "--eval_iters=2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"moe aux loss \d+\.\d{4}, expert load .*: (\d+\.\d ){3}\d+\.\d$", result.stdout, re.M)


def test_finetune_from_hugging_face_directory(shakespeare_gpt2, shakespeare_char, tmp_path):
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf-gpt2"
    GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=32)).save_pretrained(str(hf_dir))
    out = tmp_path / "out"
    args = [*TINY, f"--init_from={hf_dir}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3",
            "--eval_iters=2", "--model_overrides={'dropout': 0.1}"]
    result = run_script("train.py", *args, f"--dataset={shakespeare_gpt2}")
    assert result.returncode == 0, result.stderr
    info = checkpoint.read(out)
    assert info["init_from"] == str(hf_dir) and info["model_config"]["dropout"] == 0.1
    assert checkpoint.load_meta(info)["tokenizer"] == "gpt2"
    result = run_script("train.py", *args, f"--dataset={shakespeare_char}")
    assert_one_line_error(result, "'gpt2'", "'char'")
    model, meta = checkpoint.load_model(hf_dir)  # a Hugging Face directory: GPT-2 means the gpt2 tokenizer
    assert meta["tokenizer"] == "gpt2" and not math.isnan(model.lm_head.weight.sum().item())


def test_compiled_training_matches_eager(shakespeare_char, tmp_path):
    common = [*TINY, f"--dataset={shakespeare_char}", "--max_iters=3", "--eval_interval=3", "--eval_iters=2"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_script("train.py", *common, f"--out_dir={eager}").returncode == 0
    result = run_script("train.py", *common, "--compile=True", f"--out_dir={compiled}")
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(history(eager), history(compiled), strict=True):
        for key in ("loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-3), (a, b)


def test_estimate_only_sizes_the_vocabulary_from_the_dataset(shakespeare_char):
    """--estimate_only reads no data and builds no weights, but a prepared dataset's meta.json still sets the
    vocabulary: the parameter count is the hand count of nanoGPT's model for the dataset's 65 characters."""
    meta = json.loads((shakespeare_char / "meta.json").read_text())
    result = run_script("train.py", f"--dataset={shakespeare_char}", "--estimate_only=True", "--device=cpu",
                        "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--bias=False")
    assert result.returncode == 0, result.stderr
    V, C, T, L = meta["vocab_size"], 32, 16, 2
    per_layer = 2 * C + 3 * C * C + C * C + 2 * 4 * C * C  # two LayerNorm weights, c_attn, c_proj, MLP
    expected = V * C + T * C + L * per_layer + C  # wte (the head is tied to it), wpe, blocks, ln_f
    assert f"training all {expected:,} parameters" in result.stdout, result.stdout
