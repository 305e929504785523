"""The CUDA-only paths, each against the CPU path it replaces: the grouped GEMM of the experts, fused SDPA with the
cached sliding-window mask, the chunked head loss under bf16 autocast, the compiled decode step, and train.py with
bf16 and torch.compile. Skipped without a GPU (this project's CI machine has none); run them with
`python -m pytest -q tests/test_cuda.py` on one."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, run_script
import engine
from model import GPT, GPTConfig
from ops import attention, grouped_matmul, head_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


def close(a, b, tol):
    """Within tol of b's largest magnitude (bf16 keeps ~3 significant digits)."""
    return (a.double().cpu() - b.double().cpu()).abs().max().item() <= tol * b.abs().max().item()


def test_grouped_gemm_under_autocast_matches_per_expert_matmuls(monkeypatch):
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 17, 42])  # an expert without tokens too
    x = torch.randn(int(counts.sum()), 64, requires_grad=True)
    w = torch.randn(4, 64, 32, requires_grad=True)
    bias = torch.randn(4, 32, requires_grad=True)
    reference = grouped_matmul(x, w, counts, bias)  # CPU float32: one addmm per expert
    reference.square().sum().backward()
    expected = [t.grad.clone() for t in (x, w, bias)]
    xc, wc, bc = (t.detach().to(CUDA).requires_grad_() for t in (x, w, bias))
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        y = grouped_matmul(xc, wc, counts.to(CUDA), bc)
    assert calls == [1] and y.dtype == torch.bfloat16  # float32 inputs under bf16 autocast: the grouped GEMM ran
    assert close(y, reference, 2e-2)
    y.float().square().sum().backward()
    for got, want in zip((xc.grad, wc.grad, bc.grad), expected):
        assert close(got, want, 5e-2)
    with torch.autocast(CUDA, dtype=torch.bfloat16):  # rank-4 LoRA factors: strides under 16 bytes, so the loop
        low_rank = grouped_matmul(xc, wc[..., :4].contiguous(), counts.to(CUDA))
    assert calls == [1] and close(low_rank, grouped_matmul(x, w[..., :4].contiguous(), counts), 2e-2)


@pytest.mark.parametrize("sinks", [False, True])
def test_sliding_window_sdpa_matches_cpu_banded_attention(sinks):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 40, 16) for _ in range(3))
    s = torch.randn(4) if sinks else None
    cpu = attention(q, k, v, None, 0.25, s, window=8)  # banded matmuls
    gpu = attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), None, 0.25, s.to(CUDA) if sinks else None, window=8)
    assert close(gpu, cpu, 1e-5)


def test_chunked_head_loss_under_bf16_autocast():
    torch.manual_seed(0)
    x = torch.randn(3000, 128, device=CUDA, requires_grad=True)
    w = (0.02 * torch.randn(50000, 128, device=CUDA)).requires_grad_()
    t = torch.randint(50000, (3000,), device=CUDA)
    t[::7] = -1
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        loss = head_loss(x, w, t)  # 3 chunks of 1,342 rows
    loss.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        reference = F.cross_entropy((x @ w.t()).float(), t, ignore_index=-1)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-2)
    assert close(grads[0], x.grad, 5e-2) and close(grads[1], w.grad, 5e-2)


SMALL = dict(n_layer=3, n_head=4, n_embd=64, block_size=64, vocab_size=300)
FAMILIES = {"gpt2": {},
            "gemma3-compact": dict(n_kv_head=2, head_dim=16, attn_scale_dim=16, mlp_hidden=96, sliding_window=8),
            "gpt-oss-compact": dict(n_kv_head=2, head_dim=16, mlp_hidden=32, sliding_window=8, n_expert=4,
                                    n_expert_active=2)}


@pytest.mark.parametrize("preset", FAMILIES)
def test_forward_on_cuda_matches_cpu(preset):
    """float32 logits of a tiny model of each family (sequence > 4 windows) on the GPU against the CPU, TF32 off."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(preset, **SMALL, **FAMILIES[preset])).eval()
        idx = torch.randint(300, (2, 40))
        with torch.no_grad():
            cpu = model(idx)[0]
            gpu = model.to(CUDA)(idx.to(CUDA))[0]
        assert close(gpu, cpu, 1e-4)
    finally:
        torch.set_float32_matmul_precision(precision)


def test_compiled_training_loss_with_chunked_head_on_cuda():
    """model(x, y, return_logits=False) compiled, under bf16 autocast, past head_loss's 32 MB threshold: the same
    loss and head gradient as eager whole logits, to bf16 precision."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=40000)).to(CUDA)
    x, y = torch.randint(40000, (8, 64), device=CUDA), torch.randint(40000, (8, 64), device=CUDA)
    results = []
    for fn, kwargs in ((torch.compile(model), dict(return_logits=False)), (model, {})):
        model.zero_grad(set_to_none=True)
        with torch.autocast(CUDA, dtype=torch.bfloat16):
            loss = fn(x, y, **kwargs)[1]
        loss.backward()
        results.append((loss.item(), model.lm_head.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-2) and close(results[0][1], results[1][1], 5e-2)


def test_compiled_decode_step_matches_eager_on_cuda():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=300)).to(CUDA).eval()
    prompt = torch.randint(300, (40,)).tolist()
    eager = [t[0] for t in model.generate_stream([prompt], 24, temperature=0)]
    assert engine.compile_decode(model)
    compiled = [t[0] for t in model.generate_stream([prompt], 24, temperature=0)]
    assert compiled == eager


def test_train_py_bf16_compiled_on_cuda(shakespeare_char, tmp_path):
    args = [a for a in TINY if not a.startswith(("--device", "--compile"))]
    result = run_script("train.py", *args, "--device=cuda", "--dtype=bfloat16", "--compile=True",
                        f"--dataset={shakespeare_char}", f"--out_dir={tmp_path / 'out'}", "--max_iters=60",
                        "--eval_interval=60", "--eval_iters=5", "--lr_decay_iters=60", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in result.stdout.splitlines()
              if line.startswith("iter ")]
    assert losses[-1] < losses[0] - 0.5


def test_train_py_fsdp_nccl_bf16_mixed_precision(shakespeare_char, tmp_path):
    """--parallel=fsdp on the GPUs (2 processes, or 1 on a one-GPU machine) with NCCL: bf16 MixedPrecisionPolicy
    (weights gathered and computed in bf16, gradients reduce-scattered in float32 onto float32 shards), compiled
    blocks, gradient checkpointing, a sharded checkpoint and its resume. The losses follow a single-GPU bf16 run's
    to bf16 precision, and fall."""
    import json
    import subprocess
    import sys

    import checkpoint
    from conftest import REPO
    nproc = min(2, torch.cuda.device_count())
    args = [a for a in TINY if not a.startswith(("--device", "--compile", "--gradient_accumulation_steps"))]
    common = [*args, "--device=cuda", "--dtype=bfloat16", f"--dataset={shakespeare_char}", "--eval_interval=30",
              "--eval_iters=8", "--lr_decay_iters=60", "--gradient_accumulation_steps=4", "--batch_size=4"]
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    result = run_script("train.py", *common, "--compile=False", "--max_iters=60", f"--out_dir={one}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(REPO / "train.py"), *common, "--parallel=fsdp", "--compile=True", "--gradient_checkpointing=True",
                f"--out_dir={sharded}"]
    for max_iters, resume in ((30, []), (60, ["--init_from=resume"])):
        result = subprocess.run([*torchrun, f"--max_iters={max_iters}", *resume], capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"fsdp over {nproc} processes" in result.stdout and "bfloat16" in result.stdout

    def evals(out):
        return {r["iter"]: r["val_loss"] for r in map(json.loads, open(out / "history.jsonl")) if "val_loss" in r}
    a, b = evals(one), evals(sharded)
    assert sorted(a) == sorted(b) == [0, 30, 60]
    assert all(abs(a[i] - b[i]) < 0.05 for i in a), (a, b)  # bf16: the same run to ~2 significant digits
    assert b[60] < b[0] - 0.5
    info = checkpoint.read(sharded)
    assert info["sharded"]["processes"] == nproc and info["iter_num"] == 60
    model, _ = checkpoint.load_model(sharded, device=CUDA, dtype=torch.bfloat16)  # one process, no process group
    assert all(torch.isfinite(p).all() for p in model.parameters())
