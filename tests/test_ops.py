"""ops.py's speed-only paths against the plain computations their docstrings name: banded sliding-window attention
and attention sinks against a masked softmax with an explicit sink logit, the experts' grouped matmul against a
per-expert loop, the chunked head loss against F.cross_entropy on whole logits, and the CPU decoding layouts
(decode_layout, BatchedHead) against a plain nn.Linear, the int8 decode kernel (Int8Linear, quantize_int8) against the
dequantised Linear. float64 where the reference allows it."""
import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import ops
from conftest import int8_rounded
from model import GPT, GPTConfig


def reference_attention(q, k, v, visible, scale, sinks=None):
    """softmax over the visible keys' scores (and the sink logit, which has no value), dotted with v."""
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1] @ v
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("T, window", [(50, 1), (50, 3), (50, 7), (64, 16), (37, 10), (100, 33)])
def test_banded_sliding_attention_equals_masked_softmax(T, window):
    """ops.attention's CPU path for sliding layers longer than their window (banded_attention: half-window
    chunks against 1.5 windows of keys) against softmax over a dense masked score matrix, in float64, with
    and without sinks; lengths that are not multiples of the chunk included."""
    torch.manual_seed(T + window)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
    visible = (j <= i) & (j > i - window)
    sinks = torch.randn(3, dtype=torch.float64)
    for s in (None, sinks):
        out = ops.attention(q, k, v, None, 0.3, s, window=window)
        assert (out - reference_attention(q, k, v, visible, 0.3, s)).abs().max().item() < 1e-12


@pytest.mark.parametrize("case", ["causal", "decode", "padded"])
def test_sinks_through_sdpa_equal_an_extra_logit(case):
    """The sink as an extra zero key whose score is the sink logit (what SDPA gets) against the explicit extra
    logit: causal (no mask), one query over a cache's keys, and a per-row mask with padding; grouped-query heads."""
    torch.manual_seed(1)
    B, H, Hkv, D, S = 3, 4, 2, 8, 11
    T = {"causal": S, "decode": 1, "padded": 5}[case]
    q = torch.randn(B, H, T, D, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S, D, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(H, dtype=torch.float64)
    kq, vq = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    qcols, kcols = torch.arange(S - T, S).view(-1, 1), torch.arange(S).view(1, -1)
    visible = kcols <= qcols  # (T, S)
    if case == "padded":  # row b's tokens start at column b: earlier keys are padding
        visible = visible & (kcols >= torch.arange(B).view(B, 1, 1, 1))
        visible = visible | (kcols == qcols)
    mask = None if case == "causal" else visible if case == "padded" else visible.view(1, 1, T, S)
    out = ops.attention(q, k, v, mask, 0.4, sinks)
    expected = reference_attention(q, kq, vq, visible if visible.dim() == 4 else visible.view(1, 1, T, S), 0.4, sinks)
    assert (out - expected).abs().max().item() < 1e-12
    without = ops.attention(q, k, v, mask, 0.4)
    assert (without - reference_attention(q, kq, vq, visible if visible.dim() == 4 else visible.view(1, 1, T, S),
                                          0.4)).abs().max().item() < 1e-12


@pytest.mark.parametrize("with_bias", [True, False])
def test_grouped_matmul_equals_a_loop_over_experts(with_bias):
    """Rows grouped by expert (an expert with none too), against [x_e @ w[e] + b[e] for each expert e]; gradients."""
    torch.manual_seed(2)
    counts = torch.tensor([3, 0, 7, 1, 5])
    x = torch.randn(int(counts.sum()), 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = ops.grouped_matmul(x, w, counts, b)
    rows = torch.repeat_interleave(torch.arange(5), counts)
    expected = torch.stack([x[i] @ w[e] + (b[e] if with_bias else 0) for i, e in enumerate(rows.tolist())])
    assert (y - expected).abs().max().item() < 1e-12
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w], g)
    expected_grads = torch.autograd.grad(expected, [x, w], g)
    assert all((a - e).abs().max().item() < 1e-12 for a, e in zip(grads, expected_grads))


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("weight_trains", [True, False])
def test_head_loss_equals_cross_entropy(softcap, weight_trains):
    """float64, 37 rows in chunks of 8 (the last one short), some targets ignored (-1), a scaled gradient."""
    torch.manual_seed(0)
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(53, 16, dtype=torch.float64, requires_grad=weight_trains)
    t = torch.randint(53, (37,))
    t[::5] = -1
    loss = ops.head_loss(x, w, t, softcap, chunk_bytes=0, min_rows=8)
    (0.7 * loss).backward()
    grads = x.grad, w.grad
    x.grad = w.grad = None
    logits = x @ w.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(logits, t, ignore_index=-1)
    (0.7 * reference).backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-14)
    assert torch.allclose(grads[0], x.grad, rtol=0, atol=1e-15)
    assert (grads[1] is None) == (not weight_trains)
    if weight_trains:
        assert torch.allclose(grads[1], w.grad, rtol=0, atol=1e-15)


def test_decode_layouts_equal_the_plain_linear():
    """decode_layout (widening weights stored transposed) and BatchedHead (the layout per batch size, blocks of 256
    vocabulary rows from 4 rows on) give a plain nn.Linear's outputs for 1, 2, 3, 4 and 9 rows."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=700, tie_embeddings=False))
    plain = copy.deepcopy(model)
    ops.decode_layout(model)
    head = model.lm_head.weight
    assert head.stride() == (1, head.shape[0]) and torch.equal(head, plain.lm_head.weight)
    batched = ops.BatchedHead(model.lm_head)
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 9):
            x = torch.randn(rows, 1, 16)
            expected = F.linear(x, plain.lm_head.weight)
            assert (batched(x) - expected).abs().max().item() < 1e-5
            assert (model.lm_head(x) - expected).abs().max().item() < 1e-5


def test_int8_weight_rounds_each_row_to_its_own_scale():
    """int8_weight: q in [-127, 127], each row's absmax maps to +-127, every weight within half a step of q * scale;
    a row of zeros gets scale 1 (no division by zero)."""
    torch.manual_seed(4)
    w = torch.randn(6, 40) * torch.tensor([1e-3, 0.02, 1.0, 30.0, 0.5, 0.0]).view(-1, 1)
    q, scale = ops.int8_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.abs().max().item() <= 127
    assert torch.equal(q[:5].abs().amax(dim=1), torch.full((5,), 127, dtype=torch.int8))
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert scale[5].item() == 1.0 and not q[5].any()


needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                               reason="the int8 kernel is compiled by torch.compile's C++ backend: no C++ compiler")


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_the_dequantised_linear(dtype):
    """Int8Linear against F.linear on its dequantised weight (float64): the compiled kernel (1 to INT8_MAX_ROWS rows)
    and the dequantising path (more rows), with and without a bias, square and non-square weights, 2-d and 3-d
    inputs; float32 to float32 rounding, bf16 to bf16's."""
    torch.manual_seed(5)
    for n_in, n_out, bias in ((48, 80, True), (64, 64, False), (80, 37, True)):
        linear = torch.nn.Linear(n_in, n_out, bias=bias)
        layer = ops.Int8Linear(linear.weight, linear.bias)
        w = layer.qweight.double() * layer.scale.double()[:, None]
        for rows in (1, 3, ops.INT8_MAX_ROWS, ops.INT8_MAX_ROWS + 1, 40):
            x = torch.randn(rows, n_in).to(dtype)
            expected = F.linear(x.double(), w, linear.bias.double() if bias else None)
            for shaped in (x, x.view(1, rows, n_in)):
                y = layer(shaped)
                assert y.dtype == dtype and y.shape == (*shaped.shape[:-1], n_out)
                error = (y.double().view(rows, n_out) - expected).abs().max().item()
                assert error < (1e-5 if dtype == torch.float32 else 0.02) * expected.abs().max().item()


@needs_cxx
def test_quantize_int8_decodes_as_the_dequantised_model():
    """quantize_int8 on a small GPT-2 (tied head, biases): every Linear becomes an Int8Linear (the embedding stays
    float), and prompt + KV-cache decode steps give the logits of the same model with each Linear's weight replaced
    by its dequantised int8 values; generate runs on it (the KV cache takes the float dtype from the head)."""
    import engine
    torch.manual_seed(6)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=300)).eval()
    reference = int8_rounded(copy.deepcopy(model))
    ops.quantize_int8(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, ops.Int8Linear) and model.transformer.wte.weight.dtype == torch.float32
    with torch.no_grad():
        logits = []
        for net in (reference, model):
            cache = engine.KVCache(net, 1, 16)
            steps = [engine.prefill(net, cache, [[5, 6, 7]], need=8)]
            for token in (8, 9, 10, 11):
                steps.append(engine.decode_one_token(net, cache, [token]))
            logits.append(torch.cat(steps))
    assert (logits[0] - logits[1]).abs().max().item() < 1e-4
    out = model.generate(torch.tensor([[5, 6, 7]]), 5, temperature=0)
    assert out.shape == (1, 8)


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_int8_of_a_mixture_of_experts(dtype):
    """A GPT-OSS-shaped model (experts with biases, a router, sinks, sliding window) with LoRA adapters on its
    experts and attention: quantize_int8 merges them, makes the stacked experts Int8Experts and the Linears but
    the routers Int8Linears, and its logits (a 20-token prompt: groups over INT8_MAX_ROWS rows take the
    dequantising path; then one-token steps: the kernel) equal those of the merged model with int8-rounded weights (conftest's
    int8_rounded, from the rule); also from a cold cache with no token routed to some experts."""
    import engine
    torch.manual_seed(7)
    config = GPTConfig.preset("gpt-oss-compact", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8,
                              mlp_hidden=24, sliding_window=4, block_size=64, vocab_size=97, n_expert=4,
                              n_expert_active=2, mlp_bias=True, router_bias=True,
                              lora_rank=4, lora_targets="mlp.down,mlp.gate_up,attn.c_attn")
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)  # the adapters' B is zero at init: make them count
    model = model.to(dtype)
    reference = int8_rounded(copy.deepcopy(model).merge_lora())
    ops.quantize_int8(model)
    moe = model.transformer.h[0].mlp
    assert isinstance(moe.gate_up, ops.Int8Experts) and isinstance(moe.down, ops.Int8Experts)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [b.mlp.router for b in model.transformer.h]  # the routers stay float
    assert not any(p.dim() == 3 for p in model.parameters())  # no float copy of the experts left
    prompt = torch.randint(0, 97, (20,)).tolist()
    with torch.no_grad():
        logits = []
        for net in (reference, model):
            cache = engine.KVCache(net, 1, 32)
            steps = [engine.prefill(net, cache, [prompt], need=8)]
            for token in (8, 9, 10, 11, 12):
                steps.append(engine.decode_one_token(net, cache, [token]))
            logits.append(torch.cat(steps).float())
    scale = logits[0].abs().max().item()
    assert (logits[0] - logits[1]).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.03) * scale


@needs_cxx
def test_quantize_int8_keeps_held_out_perplexity_of_a_trained_model(trained_char, shakespeare_char):
    """The issue's bar: held-out perplexity within 1% of float32's on a trained model (train.py's, 200
    iterations on Shakespeare), over 2,048 validation tokens; and its likeliest next letter is the float model's
    at most positions (lossy, not a different model)."""
    import numpy as np
    import checkpoint
    model, _ = checkpoint.load_model(trained_char[0])
    quantized = ops.quantize_int8(copy.deepcopy(model))
    val = torch.from_numpy(np.fromfile(shakespeare_char / "val.bin", dtype=np.uint16)[:2049].astype(np.int64))
    T = model.config.block_size
    x, y = val[:2048].view(-1, T), val[1:2049].view(-1, T)
    with torch.no_grad():
        losses = [net(x, y)[1].item() for net in (model, quantized)]
        steps = [net(val[:T].view(1, T))[0][0].argmax(-1) for net in (model, quantized)]
    ratio = math.exp(losses[1]) / math.exp(losses[0])
    assert abs(ratio - 1) < 0.01 and math.exp(losses[0]) < 20, losses  # trained: far below the 65-letter guess
    assert (steps[0] == steps[1]).float().mean().item() > 0.9


def test_quantize_settings_rule():
    """--quantize (sample.py, serve.py, eval.py): '' or 'int8'; int8 only where its kernel runs (CPU)."""
    import checkpoint
    assert checkpoint.quantize_error("", "cuda") is None and checkpoint.quantize_error("int8", "cpu") is None
    for value, device in (("int4", "cpu"), ("INT8", "cpu"), ("int8", "cuda"), ("int8", "cuda:1"), ("int8", "mps")):
        assert checkpoint.quantize_error(value, device).startswith("--quantize")


def test_muon_equals_torch_muon_and_orthogonalises_in_float32_where_bf16_is_slow(monkeypatch):
    """ops.Muon against torch.optim.Muon over 5 steps (Nesterov momentum, weight decay, match_rms_adamw lr, a tall
    and a wide matrix): exactly equal with the orthogonalisation in bfloat16 (torch's), within bf16 rounding of it in
    float32; and their state_dicts load into each other."""
    torch.manual_seed(4)
    start = [torch.randn(64, 32), torch.randn(16, 48)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(5)]

    def run(make, dtype=None):
        if dtype is not None:
            monkeypatch.setattr(ops, "newton_schulz_dtype", lambda device_type: dtype)
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = make(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return params, opt
    reference, torch_opt = run(torch.optim.Muon)
    in_bf16, ours = run(ops.Muon, torch.bfloat16)
    in_fp32, _ = run(ops.Muon, torch.float32)
    moved = [(r - w).abs().max().item() for r, w in zip(reference, start)]
    for r, a, b, m in zip(reference, in_bf16, in_fp32, moved):
        assert torch.equal(a, r)
        assert (b - r).abs().max().item() < 0.05 * m  # the updates agree to bf16's precision
    torch_opt.load_state_dict(ours.state_dict())
    ours.load_state_dict(torch_opt.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_muon_orthogonalises_same_shaped_matrices_together_as_one_at_a_time(monkeypatch, dtype):
    """ops.Muon orthogonalises the matrices of one shape as one stack (batched matmuls): each comes out as it does
    stepped alone (a stack of one, which in bf16 is torch.optim.Muon's: above), within rounding (a batched product
    may add in another order); the momentum state is the same."""
    monkeypatch.setattr(ops, "newton_schulz_dtype", lambda device_type: dtype)
    torch.manual_seed(5)
    start = [torch.randn(48, 16) for _ in range(3)] + [torch.randn(16, 64) for _ in range(2)] + [torch.randn(16, 16)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(4)]

    def run(together):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opts = [ops.Muon(ps, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
                for ps in ([params] if together else [[p] for p in params])]
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            for opt in opts:
                opt.step()
        return params, [opt.state[p]["momentum_buffer"] for opt in opts for p in opt.param_groups[0]["params"]]
    (alone, alone_momentum), (together, momentum) = run(False), run(True)
    tolerance = 0.01 if dtype == torch.bfloat16 else 1e-4
    for a, t, s in zip(alone, together, start):
        assert (t - a).abs().max().item() <= tolerance * (a - s).abs().max().item()
    assert all(torch.equal(a, t) for a, t in zip(alone_momentum, momentum))


@pytest.mark.parametrize("scale", [1e-3, 10.0, float("nan")])
def test_clip_grad_norm_equals_torch(scale):
    """ops.clip_grad_norm against torch.nn.utils.clip_grad_norm_: the same norm and the same gradients bit for bit,
    within the limit (where it skips torch's multiply by 1), above it (clipped), and for a NaN gradient."""
    torch.manual_seed(6)
    grads = [torch.randn(48, 16) * scale, torch.randn(16) * scale, torch.randn(7, 5) * scale]
    results = []
    for clip in (torch.nn.utils.clip_grad_norm_, ops.clip_grad_norm):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads] + [torch.nn.Parameter(torch.zeros(3))]
        for p, g in zip(params, grads):  # the last one has no gradient
            p.grad = g.clone()
        results.append((clip((p for p in params), 1.0), [p.grad for p in params[:-1]]))
    (norm, expected), (ours_norm, ours) = results
    assert torch.equal(norm, ours_norm) or (norm.isnan() and ours_norm.isnan())
    for e, o in zip(expected, ours):
        assert torch.equal(e, o) or torch.equal(e.isnan(), o.isnan()) and torch.equal(e.nan_to_num(), o.nan_to_num())
