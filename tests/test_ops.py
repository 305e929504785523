"""ops.py's speed-only paths against the plain computations their docstrings name: banded sliding-window attention
and attention sinks against a masked softmax with an explicit sink logit, the experts' grouped matmul against a
per-expert loop, the chunked head loss against F.cross_entropy on whole logits, and the CPU decoding layouts
(decode_layout, BatchedHead) against a plain nn.Linear. float64 where the reference allows it."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ops
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
