"""Shared fixtures: the repo root, ../shared, an offline tiktoken cache, prepared datasets and a tiny trained model.

Scripts are run as subprocesses (`run_script`), the way users run them, from a temp cwd."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
sys.path.insert(0, str(REPO))  # the tests import the repo's modules
if (SHARED / "tiktoken_cache").is_dir():  # tiktoken offline; subprocesses inherit it
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

# a model small enough to train a few hundred iterations in seconds on two CPU cores
TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32",
        "--batch_size=16", "--gradient_accumulation_steps=1", "--dropout=0.0", "--eval_iters=10", "--log_interval=1",
        "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=20", "--wandb_log=False"]


def run_script(script, *args, env=None, timeout=300, cwd=None):
    """python <repo>/<script> args..., unbuffered; returns the CompletedProcess (text)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or REPO)


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def shared_dir():
    return SHARED


def _prepare(tmp_path_factory, name):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is missing")
    out = tmp_path_factory.mktemp("data") / name
    result = run_script(f"data/{name}/prepare.py", f"--input={SHAKESPEARE}", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def shakespeare_char(tmp_path_factory):
    """A prepared shakespeare_char dataset (train.bin, val.bin, meta.json) in a session temp dir."""
    return _prepare(tmp_path_factory, "shakespeare_char")


@pytest.fixture(scope="session")
def shakespeare_gpt2(tmp_path_factory):
    """Tiny Shakespeare in GPT-2 BPE tokens (nanoGPT's shakespeare dataset)."""
    return _prepare(tmp_path_factory, "shakespeare")


@pytest.fixture(scope="session")
def trained_char(tmp_path_factory, shakespeare_char):
    """A tiny model trained 200 iterations on shakespeare_char: (out_dir, the run's CompletedProcess).
    Read-only: copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "out-tiny-char"
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}",
                        "--max_iters=200", "--lr_decay_iters=200", "--eval_interval=100", "--log_interval=10")
    assert result.returncode == 0, result.stderr
    return out, result
