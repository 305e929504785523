"""train.py with --parallel=fsdp (fsdp.py) and sharded checkpoints (checkpoint.save_sharded), on CPU: two gloo
processes under torchrun. The same losses as one process with the same global batch (a dense GPT-2-style model, a
Gemma-3-style one, a small MoE), half of the parameters and optimizer state on each process, kill -9 during and
between saves with an exact resume, resume on another number of processes and across DDP/FSDP, LoRA with
adapter-only checkpoints exported like a single process's, the per-process memory estimate, one-line errors."""
import os
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import checkpoint
from conftest import REPO, TINY, run_script
from model import GPT, GPTConfig
from test_train import assert_one_line_error, history, train_losses

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # two processes on two cores
SHARE = re.compile(r"^rank (\d): holds \S+ MiB of parameters and optimizer state, (\d+\.\d)% of the whole", re.M)
GEMMA = ("{'n_layer': 2, 'n_head': 2, 'n_kv_head': 1, 'n_embd': 64, 'head_dim': 32, 'mlp_hidden': 128, "
         "'sliding_window': 16, 'attn_pattern': 'SF', 'block_size': 64}")
MOE = ("{'n_layer': 2, 'n_head': 2, 'n_kv_head': 1, 'n_embd': 32, 'head_dim': 16, 'mlp_hidden': 32, 'n_expert': 4, "
       "'n_expert_active': 2, 'sliding_window': 8, 'block_size': 32, 'vocab_size': 65}")
MODELS = {"dense": [],
          "gemma3": ["--model=gemma3-compact", f"--model_overrides={GEMMA}", "--gradient_checkpointing=True"],
          "moe": ["--model=gpt-oss-compact", f"--model_overrides={MOE}"]}


def torchrun(nproc, *args, script="train.py", parallel="fsdp"):
    """train.py (or another script) under torchrun on nproc CPU processes; the CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / script) if script == "train.py" else script, f"--parallel={parallel}", *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def single(*args):
    result = run_script("train.py", *args, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_histories_close(a, b, tol):
    a, b = history(a), history(b)
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "train_loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=tol), (ra, rb)


# ----------------------------------------------------------------------------------------------------------------
# the same run as one process, and half of the state on each process


@pytest.mark.parametrize("kind", MODELS)
def test_fsdp_matches_single_process(shakespeare_char, tmp_path, kind):
    """20 iterations, 4 micro-batches per step: one process runs all 4, each of two FSDP processes accumulates
    2 (no reduce-scatter until its last one). Gemma-3-style: with gradient checkpointing."""
    common = [*TINY, f"--dataset={shakespeare_char}", "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10",
              "--eval_iters=4", "--gradient_accumulation_steps=4", "--batch_size=4", *MODELS[kind]]
    one, two = tmp_path / "single", tmp_path / "fsdp"
    single(*common, f"--out_dir={one}")
    result = torchrun(2, *common, f"--out_dir={two}")
    assert_histories_close(one, two, 1e-4)
    assert sorted(train_losses(two)) == list(range(20))
    shares = {int(r): float(p) for r, p in SHARE.findall(result.stdout)}
    print(f"{kind}: local share of parameters + optimizer state per rank (%): {shares}")
    assert shares.keys() == {0, 1} and all(45.0 <= p <= 55.0 for p in shares.values()), result.stdout
    assert abs(shares[0] + shares[1] - 100.0) < 0.5  # the shards add up to the whole, nothing replicated but steps
    # the checkpoint: sharded, and read whole by one process without a process group
    info = checkpoint.read(two)
    assert info["iter_num"] == 20 and info["sharded"]["processes"] == 2
    files = sorted(os.listdir(two / "ckpt" / "state"))
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files), files  # no pickled .metadata
    assert not (two / "model.safetensors").exists() and (two / "config.json").is_file()
    (a, _), (b, _) = checkpoint.load_model(two), checkpoint.load_model(one)
    x = torch.tensor([list(range(1, 33))])
    with torch.no_grad():  # the same model up to float rounding (AdamW turns 1e-7 into 1e-4 on small weights)
        assert a(x, x)[1].item() == pytest.approx(b(x, x)[1].item(), abs=1e-3)


def test_loading_a_sharded_checkpoint_unpickles_nothing(shakespeare_char, tmp_path, monkeypatch):
    """The weights and the optimizer state of a sharded checkpoint read back (here whole, on one process) without
    pickle; sample.py reads the out_dir as any other."""
    out = tmp_path / "out"
    torchrun(2, *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
             "--eval_iters=2", "--gradient_accumulation_steps=2")
    result = run_script("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=20")
    assert result.returncode == 0 and "20 new tokens" in result.stdout, result.stderr

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling")
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    info = checkpoint.read(out)
    model = checkpoint.build_model(info)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    checkpoint.load_optimizers(info, out, "adamw", [optimizer], torch.amp.GradScaler("cpu", enabled=False),
                               model=model)
    assert all(s["step"].item() == 2 for s in optimizer.state.values()) and len(optimizer.state) == \
        sum(1 for _ in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# kill -9 between and during sharded saves: the resumed run continues exactly

PAUSE_IN_SAVE = """
import os, runpy, sys, time
sys.path.insert(0, {repo!r})
import checkpoint

def pause():
    print("PAUSED", flush=True)
    time.sleep(120)

if os.environ["STAGE"] == "write":  # every process wrote its shards into ckpt.tmp/state/: rank 0 is to commit
    commit, commits = checkpoint._commit, []
    checkpoint._commit = lambda *a: (commits.append(1), len(commits) == 2 and pause(), commit(*a))[-1]
else:  # "swap": the second save renamed ckpt/ to ckpt.old/, ckpt.tmp/ is not ckpt/ yet
    rename = os.rename
    os.rename = lambda a, b: (rename(a, b), str(b).endswith("ckpt.old") and pause())[0]
sys.argv = [{train!r}, *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def kill_run(shakespeare_char, tmp_path_factory):
    """The arguments of the kill tests' run and its uninterrupted out_dir: 24 iterations, a checkpoint every 8,
    dropout on (its RNG must be restored too)."""
    common = [*TINY, f"--dataset={shakespeare_char}", "--max_iters=24", "--lr_decay_iters=24", "--eval_interval=8",
              "--eval_iters=2", "--dropout=0.1", "--gradient_accumulation_steps=4", "--batch_size=4"]
    whole = tmp_path_factory.mktemp("fsdp") / "whole"
    torchrun(2, *common, f"--out_dir={whole}")
    return common, whole


@pytest.mark.parametrize("stage", ["between", "write", "swap"])
def test_kill_during_and_between_sharded_saves_resumes_exactly(kill_run, tmp_path, stage):
    """kill -9 of every process (torchrun and its workers) after iteration 13 ("between" saves: the checkpoint of
    iter 8 stays), or in the save of iter 16 after every process wrote its shards ("write") or between the two
    renames ("swap"): the resume continues from iter 8 with the uninterrupted run's losses, bit for bit."""
    common, whole = kill_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if stage == "between":
        cmd.append(str(REPO / "train.py"))
    else:
        wrapper = tmp_path / "pause_in_save.py"
        wrapper.write_text(PAUSE_IN_SAVE.format(repo=str(REPO), train=str(REPO / "train.py")))
        cmd.append(str(wrapper))
    proc = subprocess.Popen([*cmd, "--parallel=fsdp", *common, f"--out_dir={out}"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**ENV, "STAGE": stage},
                            start_new_session=True)  # its own process group: torchrun and the workers
    try:
        for line in proc.stdout:
            if line.startswith("iter 13:" if stage == "between" else "PAUSED"):
                break
        else:
            pytest.fail(f"the run ended before the kill (exit {proc.wait()})")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    if stage != "between":
        assert (out / ("ckpt.tmp" if stage == "write" else "ckpt.old")).is_dir()
    assert checkpoint.read(out)["iter_num"] == 8

    torchrun(2, *common, f"--out_dir={out}", "--init_from=resume")
    expected, resumed = train_losses(whole), train_losses(out)
    assert sorted(resumed) == list(range(24))
    assert {i: resumed[i] for i in range(8, 24)} == {i: expected[i] for i in range(8, 24)}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["ckpt"]


# ----------------------------------------------------------------------------------------------------------------
# resume on another number of processes, and across DDP and FSDP


@pytest.fixture(scope="module")
def reshard_run(shakespeare_char, tmp_path_factory):
    """The arguments of the resume tests and a 2-process FSDP run of 12 iterations without a stop."""
    common = [*TINY, f"--dataset={shakespeare_char}", "--eval_interval=6", "--eval_iters=4",
              "--gradient_accumulation_steps=4", "--batch_size=4", "--lr_decay_iters=12"]
    whole = tmp_path_factory.mktemp("fsdp") / "whole"
    torchrun(2, *common, f"--out_dir={whole}", "--max_iters=12")
    return common, whole


@pytest.mark.parametrize("first, then", [("fsdp2", "fsdp1"), ("fsdp1", "fsdp2"), ("ddp2", "fsdp2"),
                                         ("fsdp2", "ddp2"), ("fsdp2", "single")])
def test_resume_on_other_process_counts_and_across_ddp(reshard_run, tmp_path, first, then):
    """6 iterations one way, 6 more another: DCP reshards a sharded checkpoint onto 1 process or 2 (and reads it
    whole for DDP or a single process); an FSDP run shards a DDP checkpoint. The next losses are the
    uninterrupted run's within 1e-5."""
    common, whole = reshard_run
    out = tmp_path / "out"

    def train(how, *args):
        if how == "single":
            return single(*common, f"--out_dir={out}", *args)
        return torchrun(int(how[-1]), *common, f"--out_dir={out}", *args, parallel=how[:-1])
    train(first, "--max_iters=6")
    assert checkpoint.is_sharded(checkpoint.read(out)) == first.startswith("fsdp")
    train(then, "--max_iters=12", "--init_from=resume")
    expected, resumed = train_losses(whole), train_losses(out)
    assert sorted(resumed) == list(range(12))
    for i in range(6, 12):
        assert resumed[i] == pytest.approx(expected[i], abs=1e-5), (i, resumed[i], expected[i])
    assert checkpoint.is_sharded(checkpoint.read(out)) == then.startswith("fsdp")


# ----------------------------------------------------------------------------------------------------------------
# LoRA: the frozen base sharded, the adapters trained and checkpointed alone, exported like one process's

LORA = "{'lora_rank': 4, 'lora_targets': 'attn.c_attn,attn.c_proj,mlp.c_fc'}"


def test_lora_adapter_only_checkpoint_exports_like_single_process(shakespeare_char, tmp_path):
    base = tmp_path / "base"
    single(*TINY, f"--dataset={shakespeare_char}", f"--out_dir={base}", "--max_iters=20", "--eval_interval=20",
           "--eval_iters=2")
    common = [*TINY, f"--dataset={shakespeare_char}", f"--init_from={base}", f"--model_overrides={LORA}",
              "--max_iters=8", "--eval_interval=8", "--eval_iters=2", "--gradient_accumulation_steps=4",
              "--batch_size=4"]
    one, two = tmp_path / "single", tmp_path / "fsdp"
    single(*common, f"--out_dir={one}")
    result = torchrun(2, *common, f"--out_dir={two}")
    assert "training 5,632 LoRA adapter parameters" in result.stdout
    assert_histories_close(one, two, 1e-5)
    info = checkpoint.read(two)
    assert info["base"]["init_from"] == str(base) and checkpoint.is_sharded(info)
    stored = set()
    for name in os.listdir(two / "ckpt" / "state"):
        with safe_open(str(two / "ckpt" / "state" / name), "pt") as f:
            stored |= set(f.keys())
    adapters = {n for n, _ in GPT(checkpoint.model_config(info)).named_parameters() if "lora" in n}
    assert {k for k in stored if k.startswith("model.")} == {f"model.{n}" for n in adapters}  # the adapters alone
    assert all(k.split(".")[0] in ("model", "optim") and "lora" in k for k in stored)
    exported = {}
    for out in (one, two):
        result = run_script("export.py", f"--out_dir={out}", f"--export_dir={out / 'hf'}", "--dtype=float32")
        assert result.returncode == 0, result.stderr
        with safe_open(str(out / "hf" / "model.safetensors"), "pt") as f:
            exported[out] = {k: f.get_tensor(k) for k in f.keys()}
    assert exported[one].keys() == exported[two].keys()
    for k, v in exported[one].items():
        assert torch.allclose(v, exported[two][k], atol=1e-5), k


# ----------------------------------------------------------------------------------------------------------------
# the memory estimate per process, and the errors a user can make


def test_estimate_per_process_for_fsdp():
    """gpt-oss-20b full fine-tuning planned on 16 processes: the weights, gradients and AdamW state per process
    are the whole model's sixteenth plus what FSDP gathers whole (fsdp.memory_estimate); from the config alone."""
    args = ["--estimate_only=True", "--device=cpu", "--model=gpt-oss-20b", "--dataset=none", "--batch_size=1",
            "--block_size=4096", "--dtype=bfloat16", "--gradient_checkpointing=True", "--parallel=fsdp"]
    whole = run_script("train.py", *args, "--parallel=ddp", "--gradient_accumulation_steps=16")
    assert whole.returncode == 0, whole.stderr
    sharded = run_script("train.py", *args, "--estimate_world_size=16", "--gradient_accumulation_steps=16")
    assert sharded.returncode == 0, sharded.stderr

    def terms(stdout):
        line = next(l for l in stdout.splitlines() if l.startswith("memory estimate"))
        return line, {k: float(v) for k, v in re.findall(r"(\w+) (\d+\.\d+) GiB", line)}
    line, per_process = terms(sharded.stdout)
    _, one = terms(whole.stdout)
    assert "per process, fsdp over 16 processes" in line, line
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt-oss-20b"))
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - model.config.n_layer * block
    gib = 2 ** 30
    assert per_process["optimizer"] == pytest.approx(one["optimizer"] / 16, abs=0.01)  # AdamW's 2 moments, sharded
    # weights: a 16th of the float32 master weights, plus the root and two blocks gathered whole in bf16
    assert per_process["weights"] == pytest.approx(one["weights"] / 16 + 2 * (root + 2 * block) / gib, abs=0.01)
    # gradients: a 16th, plus one block's whole in float32 before its reduce-scatter
    assert per_process["gradients"] == pytest.approx(one["gradients"] / 16 + 4 * block / gib, abs=0.01)
    assert per_process["activations"] == one["activations"]
    assert per_process["total"] < 80 < one["total"]
    accumulating = run_script("train.py", *args, "--estimate_world_size=16", "--gradient_accumulation_steps=32")
    assert terms(accumulating.stdout)[1]["gradients"] == pytest.approx(one["gradients"], abs=0.01)  # whole, fp32


@pytest.mark.parametrize("args, message", [
    (["--optimizer=muon"], "optimizer=muon needs whole weight matrices"),
    (["--dtype=float16"], "not float16"),
    (["--parallel=zero3"], "parallel 'zero3' is not one of ddp, fsdp"),
])
def test_fsdp_config_errors_are_one_line(shakespeare_char, tmp_path, args, message):
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={tmp_path / 'out'}",
                        "--parallel=fsdp", *args)
    assert_one_line_error(result, message)


def test_failed_sharded_save_stops_every_process_and_keeps_the_previous(shakespeare_char, tmp_path):
    """A sharded checkpoint that cannot be written (a file stands where ckpt.tmp/ goes) stops both processes with
    the one-line error, non-zero; the previous checkpoint stays loadable."""
    out = tmp_path / "out"
    common = [*TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--eval_interval=4", "--eval_iters=2",
              "--gradient_accumulation_steps=2"]
    torchrun(2, *common, "--max_iters=4")
    (out / "ckpt.tmp").write_text("in the way")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           "--parallel=fsdp", *common, "--max_iters=8", "--init_from=resume"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "iter 8: could not write a checkpoint" in errors[0], result.stderr[-3000:]
    assert "Traceback (most recent call last):\n  File \"" + str(REPO / "train.py") not in result.stderr
    assert checkpoint.read(out)["iter_num"] == 4
    model, _ = checkpoint.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
