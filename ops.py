"""
Speed-only paths: each computes exactly what a plain reference computes (written in its docstring, and checked
against it in tests/test_ops.py), only faster or in less memory. model.py's architecture calls them; nothing here
changes what a model means.

- attention: PyTorch's fused scaled_dot_product_attention; attention sinks as an extra zero key whose score is
  the sink logit; sliding windows on CPU as banded_attention (work T * window, not T^2).
    reference: softmax over [q.k * scale for the visible keys] + [sink], masked, dotted with v.
- grouped_matmul: the mixture-of-experts matmuls, one grouped GEMM on CUDA in bf16.
    reference: a loop over experts, torch.cat([x_e @ w[e] + b[e] for e]).
- head_loss: the vocabulary head and cross-entropy a chunk of rows at a time, gradients in the same pass.
    reference: F.cross_entropy(x @ weight.T, targets, ignore_index=-1).
- decode_layout / BatchedHead: weight layouts that suit one-token matmuls on CPU.
    reference: the same nn.Linear with contiguous weights.
- quantize_int8 / Int8Linear: weight-only int8 for decoding on CPU, a kernel that reads 1 byte per weight. The
  quantisation itself (int8_weight) is the one lossy step in this file, taken only when asked for.
    reference: F.linear(x, q.float() * scale[:, None], bias), the dequantised Linear.
- Muon: torch.optim.Muon's update, its Newton-Schulz orthogonalisation in float32 on CPUs that multiply bf16
  slowly (torch's always casts to bf16: 100x slower than float32 on an AVX2 CPU without bf16 units).
    reference: torch.optim.Muon (the same state and hyper-parameters, so checkpoints move between the two).
- clip_grad_norm: gradient clipping that skips the multiply by 1 when the norm is within the limit (CPU).
    reference: torch.nn.utils.clip_grad_norm_.
"""
import functools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


# ----------------------------------------------------------------------------------------------------------------
# attention

@functools.lru_cache(maxsize=16)
def sliding_window_mask(T, window, device):
    """Boolean (T, T) mask, True where query i may see key j: i - window < j <= i. Built once per length."""
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(T, device=device).unsqueeze(0)
    return (j <= i) & (j > i - window)


@functools.lru_cache(maxsize=16)
def causal_mask(T, device):
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


@functools.lru_cache(maxsize=16)
def band_mask(n_chunks, chunk, before, window, device):
    """(n, c, before + c) mask for banded_attention: query r of chunk i (position i*c + r) sees key j of its
    band (position i*c - before + j) iff that key is at most window - 1 positions back, and not before 0."""
    r = torch.arange(chunk, device=device).view(chunk, 1)
    j = torch.arange(before + chunk, device=device).view(1, -1)
    back = r + before - j  # how many positions the key lies behind the query
    starts = torch.arange(n_chunks, device=device).view(-1, 1, 1) * chunk - before
    return (back >= 0) & (back < window) & (starts + j >= 0)


def band_layout(window):
    """banded_attention's query chunk (half a window) and the keys before a chunk that its queries may see
    (whole chunks); each query is scored against before + chunk keys."""
    chunk = max(1, window // 2)
    return chunk, -(-(window - 1) // chunk) * chunk


def banded_attention(q, k, v, window, scale, sinks=None, dropout=0.0):
    """Sliding-window attention for sequences longer than the window, on CPU: queries in chunks of half a
    window are scored only against the keys of their own chunk and the two before it (1.5 windows), so the
    work grows as T * window rather than T^2 (a masked fused kernel would still visit every block; whole-window
    chunks would score 2 windows per query). q, k, v: (B, H, T, D), same heads."""
    B, H, T, D = q.shape
    c, before = band_layout(window)
    n = -(-T // c)
    q, k, v = (F.pad(t, (0, 0, 0, n * c - T)) for t in (q, k, v))  # whole chunks
    k, v = (F.pad(t, (0, 0, before, 0)) for t in (k, v))  # empty chunks before the first
    k_band = k.unfold(2, before + c, c).transpose(-1, -2)  # (B, H, n, before + c, D)
    v_band = v.unfold(2, before + c, c).transpose(-1, -2)
    scores = (q.view(B, H, n, c, D) @ k_band.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~band_mask(n, c, before, window, q.device), float("-inf"))
    if sinks is not None:  # the sink logit joins each row's softmax, then leaves with no value
        sink_col = sinks.to(scores.dtype).view(1, H, 1, 1, 1).expand(B, H, n, c, 1)
        probs = torch.cat([scores, sink_col], dim=-1).softmax(dim=-1)[..., :-1]
    else:
        probs = scores.softmax(dim=-1)
    probs = F.dropout(probs, dropout) if dropout else probs
    return (probs @ v_band).view(B, H, n * c, D)[:, :, :T]


def attention(q, k, v, mask, scale, sinks=None, dropout=0.0, window=0):
    """Scaled dot-product attention. q: (B, H, T, D); k, v: (B, Hkv, S, D).

    mask: None for causal attention (T == S), optionally within a sliding `window`; else a boolean (T, S) or
    (B, 1, T, S) "may attend" mask. Sliding layers longer than their window use banded_attention on CPU and a
    cached boolean mask on the fused SDPA kernels elsewhere; a window that covers the sequence is plain causal.
    sinks (H,): each row's softmax also gets exp(sink_h) in its denominator. SDPA gets a key of zeros whose
    score is set through an additive mask to sink_h, and a value of zeros, so it computes exactly that.
    """
    T = q.size(-2)
    if k.size(1) != q.size(1):  # grouped-query attention: share each KV head across its group of query heads
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if window and T > window and mask is None:
        if q.device.type == "cpu":
            return banded_attention(q, k, v, window, scale, sinks, dropout)
        mask = sliding_window_mask(T, window, q.device)
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                              scale=scale)
    S = k.size(-2)
    if mask is None:
        mask = causal_mask(T, q.device)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    bias = bias.view(1, 1, T, S) if bias.dim() == 2 else bias  # (1 or B, 1, T, S)
    sink_col = sinks.to(q.dtype).view(1, -1, 1, 1).expand(bias.size(0), -1, T, 1)
    bias = torch.cat([bias.expand(-1, q.size(1), -1, -1), sink_col], dim=-1)  # (B', H, T, S + 1)
    zero = q.new_zeros(q.size(0), q.size(1), 1, q.size(-1))
    k, v = torch.cat([k, zero], dim=-2), torch.cat([v, zero], dim=-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


def compute_dtype(t):
    """The dtype matmuls on t run in: autocast's when it is on for t's device, else t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def grouped_matmul(x, w, counts, bias=None):
    """Rows of x are grouped by expert (counts[e] rows for expert e); returns each group @ w[e] (+ bias[e]).

    On CUDA in bf16 (bf16 tensors, or float32 ones under bf16 autocast, as train.py runs) this is one grouped
    GEMM (whose strides must be multiples of 16 bytes: a LoRA rank of 4 takes the loop); elsewhere one matmul per
    expert over its own rows, with the bias added inside addmm (gathering a [rows, out] bias tensor would cost as
    much memory traffic as the matmul).
    """
    if isinstance(w, Int8Experts):  # quantize_int8's experts, their biases inside
        return w(x, counts)
    dtype = compute_dtype(x)
    aligned = x.size(-1) % 8 == 0 and w.size(-1) % 8 == 0
    if x.is_cuda and dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm"):
        y = torch._grouped_mm(x.to(dtype), w.to(dtype), offs=counts.cumsum(0).to(torch.int32))
        if bias is not None:
            y = y + bias.to(y.dtype).repeat_interleave(counts, dim=0, output_size=x.size(0))
        return y
    groups, ws = x.split(counts.tolist()), w.unbind(0)
    if bias is None:
        return torch.cat([g @ ws[e] for e, g in enumerate(groups)])
    bs = bias.unbind(0)
    return torch.cat([torch.addmm(bs[e], g, ws[e]) for e, g in enumerate(groups)])


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the head's logits x @ weight.T (softcapped if softcap) against targets (-1: ignored),
    a chunk of rows at a time, so the (tokens, vocab) logits never exist whole: for gpt-oss's 201,088-token vocab
    and 8,192 tokens they are 6.6 GB in float32, with their gradient twice that. The gradients are computed chunk by
    chunk in the forward pass (softmax - one-hot, the same three matmuls as the plain head) and saved for backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk, grads):
        dtype = compute_dtype(x)
        acc = torch.promote_types(dtype, torch.float32)  # the loss, the softmax and grad_w: float32 at least
        w = weight.to(dtype)
        n = (targets != -1).sum().clamp(min=1)
        total = torch.zeros((), dtype=acc, device=x.device)
        want_x, want_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = None  # the first chunk's product, then each chunk's added in place (no zero-filled start)
        for i in range(0, x.size(0), chunk):
            xc, tc = x[i:i + chunk].to(dtype), targets[i:i + chunk]
            logits = F.linear(xc, w).to(acc)
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            valid = (tc != -1).unsqueeze(1)
            picked = logits.gather(1, tc.clamp(min=0).unsqueeze(1))
            total += ((lse - picked) * valid).sum()
            if not (want_x or want_w):
                continue
            g = logits.sub_(lse).exp_()  # softmax, in place of the logits
            g.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), -valid.to(g.dtype))
            g.mul_(valid.to(acc) / n)
            if softcap:
                g.mul_(1 - capped * capped)
            g = g.to(dtype)
            if want_x:
                grad_x[i:i + chunk] = g @ w
            if want_w and grad_w is None:
                grad_w = (g.t() @ xc).to(acc)
            elif want_w and dtype == acc:
                grad_w.addmm_(g.t(), xc)
            elif want_w:
                grad_w.add_(g.t() @ xc)
            del logits, g  # before the next chunk's are made: one chunk's buffers at a time
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    @once_differentiable  # the gradients are numbers computed in forward: no graph to differentiate again
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors  # scaled in place: new (vocab, C) buffers cost page faults, not just time
        grad_x = grad_x.mul_(grad_loss) if grad_x is not None else None
        grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None, None


def head_loss_rows(vocab_size, chunk_bytes=2**28, min_rows=1024):
    """head_loss's chunk: about chunk_bytes of float32 logits but at least min_rows rows, since each chunk adds
    its part of the weight's gradient to the whole (vocab, C) matrix, which must cost little next to the chunk's
    matmuls."""
    return max(min_rows, chunk_bytes // (4 * vocab_size))


def head_loss(x, weight, targets, softcap=0.0, chunk_bytes=2**28, min_rows=1024):
    """ChunkedHeadLoss of x (..., C) in chunks of head_loss_rows rows."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    chunk = head_loss_rows(weight.size(0), chunk_bytes, min_rows)
    return ChunkedHeadLoss.apply(x, weight, targets, softcap, chunk, torch.is_grad_enabled())


# ----------------------------------------------------------------------------------------------------------------
# decoding on CPU: weight layouts for one-token matmuls


@torch.no_grad()
def decode_layout(model):
    """Store the weights of the Linears that widen (out > in: c_attn, c_fc, the vocabulary head) transposed
    in memory: same shapes and values, strides (1, out). On CPU MKL's matrix-vector product for one token
    streams such a weight faster that way (about 2x for the head); for the square and narrowing ones the
    default layout is as fast or faster. The engine applies it to models it decodes on the CPU; training keeps
    the default layout (checkpoint.save writes either)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.is_contiguous() and m.out_features > m.in_features:
            m.weight.data = m.weight.data.t().contiguous().t()
    return model


class BatchedHead(torch.nn.Module):
    """The output head for batched decoding on CPU, where it is most of a step's work (V x C, V ~ 50k-260k).
    MKL's matmul packs the big operand when several rows come at once, so x @ W.T costs about as much for
    8 rows as a pass over W does 3 times over; W @ x.T on a row-major W streams it once. One row is fastest on
    the transposed copy that decode_layout makes. So this head keeps both layouts (one extra copy of
    the head matrix) and picks per call; the values are the same. From 4 rows on, MKL's matmul packs the
    whole (V, C) matrix, a pass through memory of its own: blocks of 256 vocabulary rows (in L2 cache) make
    that packing cheap, 8 rows then cost ~2 passes over W instead of ~3."""

    def __init__(self, lm_head):
        super().__init__()
        self.weight, self.bias = lm_head.weight, lm_head.bias  # whatever layout; tied embeddings stay tied
        w = lm_head.weight.detach()  # each layout below is a view of w when w already has it, else a copy
        self.register_buffer("rows", w if w.is_contiguous() else w.contiguous(), persistent=False)  # (V, C)
        self.register_buffer("cols", w.t() if w.t().is_contiguous() else w.t().contiguous(), persistent=False)

    def forward(self, x):
        flat = x.reshape(-1, x.size(-1))
        if flat.size(0) == 1:
            y = flat @ self.cols
        elif flat.size(0) < 4:  # MKL streams W once for up to 3 rows
            y = flat @ self.rows.t()
        else:
            y = torch.cat([flat @ block.t() for block in self.rows.split(256)], dim=1)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], y.size(-1))


# ----------------------------------------------------------------------------------------------------------------
# weight-only int8 for decoding on CPU

INT8_MAX_ROWS = 8  # rows up to which Int8Linear runs the int8 kernel (GPT-2 124M shapes, one thread: 2.6x float32's
                   # speed for 1 row, 1.6x for 8, even at 16); more rows (prompts, scoring) dequantise for F.linear


def int8_weight(w):
    """Per-output-channel symmetric int8 of a (out, in) weight: (q, scale) with q = round(w / scale) in [-127, 127]
    (int8) and scale = the row's absmax / 127 (float32; 1 for a row of zeros), so w ~= q * scale[:, None]."""
    w = w.detach().float().contiguous()  # q row-major whatever w's layout (an expert's w.T, decode_layout's)
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def _int8_rows(x, q, scale, bias):
    """x (M, K) by the int8 weight q (N, K): (x @ q.T) * scale + bias (M, N), in float32, cast to x's dtype.
    Written as a reduction so that torch.compile (inductor's C++ backend) makes one loop of it: each weight row's
    bytes read once (1 byte per weight) and converted to float in registers, dotted with every row of x. The matmul
    form, x @ q.float().T, compiles to a whole float copy of the weight and a matmul: slower than float32."""
    y = (q[:, None, :].float() * x[None, :, :].float()).sum(-1) * scale[:, None] + bias[:, None]
    return y.T.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _int8_kernel():
    return torch.compile(_int8_rows, dynamic=True)  # one graph for every shape (and one for a single row)


@torch.no_grad()
def int8_matmul(x, q, scale, bias):
    """x (M, K) by the int8 weight q (N, K) with its scales (N,) and bias (N,): up to INT8_MAX_ROWS rows on CPU the
    compiled kernel, else F.linear on the dequantised weight (more rows amortise it; other devices lack the kernel)."""
    if x.size(0) <= INT8_MAX_ROWS and x.device.type == "cpu":
        # a copy, not a view of x: the compiled kernel's guards then see one kind of input (no recompiles)
        return _int8_kernel()(x.clone(memory_format=torch.contiguous_format), q, scale, bias)
    return F.linear(x, (q.float() * scale[:, None]).to(x.dtype), bias.to(x.dtype))


class Int8Linear(nn.Module):
    """An nn.Linear for inference with its weight as int8 and a float32 scale per output channel (int8_weight): a
    quarter of the bytes, and reading the weights is what bounds a decode step on CPU (each token reads every one).
    int8_matmul: up to INT8_MAX_ROWS rows on CPU (a decode step) the compiled kernel; more rows (a prompt, scoring),
    and other devices, F.linear on the dequantised weight. No gradients.
        reference: F.linear(x, q.float() * scale[:, None], bias), the dequantised Linear (in float32).
    Made from a weight (out, in) and its bias (or None): Int8Linear(linear.weight, linear.bias).
    qweight, scale, bias: the int8 values, their scales, the bias (float32; zeros when the Linear had none).
    weight: a zero-element tensor of the float dtype and device the layer computes in (engine.KVCache reads
    lm_head.weight's dtype and device); the weight itself is gone."""

    def __init__(self, weight, bias=None):
        super().__init__()
        q, scale = int8_weight(weight)
        self.out_features, self.in_features = q.shape
        # its own copy: an expert's bias is a view into the stacked one (a view would be a new input to the kernel)
        bias = bias.detach().float().clone() if bias is not None else torch.zeros(self.out_features, device=q.device)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("weight", torch.empty(0, dtype=weight.dtype, device=q.device), persistent=False)
        self.lora_A = None  # GPT.chunked_head_loss asks the head whether it has an adapter

    def forward(self, x):
        y = int8_matmul(x.reshape(-1, self.in_features), self.qweight, self.scale, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


class Int8Experts(nn.Module):
    """A mixture of experts' stacked weight (E, in, out), x @ W layout, and its biases (E, out) or None, as one
    Int8Linear per expert (separate tensors: the compiled kernel sees no views, one graph for all). grouped_matmul
    calls it with the rows grouped by expert; experts without rows cost nothing.
        reference: grouped_matmul(x, stacked, counts, bias) with each stacked[e].T rounded as Int8Linear's weight"""

    def __init__(self, stacked, bias=None):
        super().__init__()
        biases = [None] * len(stacked) if bias is None else bias
        self.experts = nn.ModuleList(Int8Linear(w.T, b) for w, b in zip(stacked, biases))
        self.out_features = stacked.size(-1)

    def forward(self, x, counts):
        groups = x.split(counts.tolist())
        ys = [self.experts[e](g) for e, g in enumerate(groups) if g.size(0)]
        return torch.cat(ys) if ys else x.new_zeros(0, self.out_features)


@torch.no_grad()
def quantize_int8(model):
    """Weight-only int8 for decoding on CPU, in place: every nn.Linear of the model (the vocabulary head included,
    LoRA adapters merged first) becomes an Int8Linear, and MoE experts Int8Experts (the tiny routers stay float: a
    rounding that flips a routing choice changes a whole expert's output). GPT-2 124M, batch 1: ~2.3x the tokens/s
    of float32. Lossy (per-channel rounding: about +0.01% held-out perplexity on a small trained GPT-2) and for
    inference only: save checkpoints from the float model. A tied embedding stays float for the token lookup (the
    head gets its own int8 copy). The kernel is compiled here, on a small layer, so a missing C++ compiler fails
    now rather than at the first token (~10 s, then torch's compile cache). Returns the model."""
    for module in list(model.modules()):
        moe = isinstance(getattr(module, "gate_up", None), nn.Parameter)  # model.MoE
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (moe and name == "router"):  # rounded, it would route elsewhere
                if getattr(child, "lora_A", None) is not None:
                    child.merge_lora()
                setattr(module, name, Int8Linear(child.weight, child.bias))
        if moe:  # its stacked experts
            if len(module.lora):
                module.merge_lora()
            for name in ("gate_up", "down"):
                experts = Int8Experts(getattr(module, name).detach(), getattr(module, name + "_bias"))
                delattr(module, name)  # a parameter's name takes only a parameter
                setattr(module, name, experts)
                setattr(module, name + "_bias", None)  # inside the experts now
    if any(m.qweight.device.type == "cpu" for m in model.modules() if isinstance(m, Int8Linear)):
        probe = Int8Linear(torch.randn(80, 48))  # in != out: the graph is not specialised to square weights
        try:
            for rows in (1, 2):  # one row is a graph of its own (torch.compile specialises sizes 0 and 1)
                probe(torch.zeros(rows, 48))
        except Exception as e:
            raise RuntimeError(f"quantize_int8: torch.compile could not build the int8 kernel (inductor's C++ backend "
                               f"needs a C++ compiler such as g++): {type(e).__name__}: {e}") from e
    return model


# ----------------------------------------------------------------------------------------------------------------
# Muon with the orthogonalisation in a dtype the machine multiplies fast


@functools.lru_cache(maxsize=None)
def newton_schulz_dtype(device_type):
    """bfloat16 where its matmuls are at least about as fast as float32's (GPUs; CPUs with AVX512-BF16 or AMX),
    else float32: timed once per process on a 256 x 256 product."""
    if device_type != "cpu":
        return torch.bfloat16

    def best(dtype, n=256, reps=5):
        a = torch.randn(n, n).to(dtype)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t0)
        return min(times)
    return torch.bfloat16 if best(torch.bfloat16) <= 1.5 * best(torch.float32) else torch.float32


def newton_schulz(g, coefficients, steps, eps, dtype):
    """torch.optim.Muon's quintic Newton-Schulz iteration (an approximate U V^T of G = U S V^T), in `dtype`, on a
    stack g (n, A, B) of same-shaped matrices at once: each one's products are its own (batched matmuls), so the
    result is the one-matrix-at-a-time loop's, in n times fewer, larger calls."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_lr_ratio(adjust_lr_fn, shape):
    """torch.optim.Muon's learning-rate factor for an (A, B) matrix."""
    A, B = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    return math.sqrt(max(1, A / B))  # None or "original"


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon (momentum, Nesterov, Newton-Schulz orthogonalised update, decoupled weight decay, lr
    adjusted by shape) with the orthogonalisation in newton_schulz_dtype: the same param_groups keys and
    "momentum_buffer" state as torch's, so either loads the other's state_dict. The step is torch's, arranged for
    small models, whose step is mostly per-call overhead: the elementwise parts over all matrices at once
    (torch._foreach_*), the orthogonalisation once per shape on the stack of that shape's matrices."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None):
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps,
                                      adjust_lr_fn=adjust_lr_fn))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, bufs = [p.grad for p in params], []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            same_shape = {}  # the matrices orthogonalised together
            for p, update in zip(params, updates):
                same_shape.setdefault((p.shape, p.dtype, p.device), []).append((p, update))
            for (shape, dtype, device), pairs in same_shape.items():
                ps, us = zip(*pairs)
                ortho = newton_schulz(torch.stack(us), group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      newton_schulz_dtype(device.type)).to(dtype)
                lr = group["lr"] * muon_lr_ratio(group["adjust_lr_fn"], shape)
                torch._foreach_add_(list(ps), list(ortho.unbind(0)), alpha=-lr)
        return loss



# ----------------------------------------------------------------------------------------------------------------
# gradient clipping without the no-op pass


def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_(parameters, max_norm): the total 2-norm of the gradients, which are scaled by
    max_norm / (norm + 1e-6) where that is below 1. torch's multiplies every gradient by that factor clamped to 1,
    also when it is 1 (an exact no-op); where reading the norm costs no device sync (plain CPU tensors) this skips
    that pass over every gradient (one op per parameter, most iterations of a small model). Else torch's, as it is."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    if not grads or any(type(g) is not torch.Tensor or g.device.type != "cpu" for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if not (max_norm / (norm + 1e-6)).item() >= 1.0:  # torch's clip factor, computed as it does; NaN clips too
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
