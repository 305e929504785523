"""
One GPT module for three families of decoder-only transformers, chosen by GPTConfig switches:

- GPT-2:   learned positions, LayerNorm, GELU MLP, fused biased qkv, tied head.
- Gemma 3: RMSNorm(1+w), sandwich norms, q/k norm, gated GELU, sliding/full layers with two RoPE bases, MQA.
- GPT-OSS: RMSNorm, mixture of experts (top-k, clamped SwiGLU), attention sinks, YaRN RoPE, sliding/full, GQA.

Every switch lives in GPTConfig; grep a field's name to see the one place it is used.
Hugging Face import/export lives in hf.py; the KV-cache generator lives at the end of this file.
"""

import difflib
import fnmatch
import functools
import math
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable


@dataclass
class GPTConfig:
    # sizes (0 means "derive the usual value", so every field stays a plain int/float/str/bool)
    vocab_size: int = 50304
    block_size: int = 1024        # longest sequence the model is built for
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0            # 0: n_head (multi-head); 1: multi-query; else grouped-query
    n_embd: int = 768
    head_dim: int = 0             # 0: n_embd // n_head (Gemma and GPT-OSS set it independently)
    mlp_hidden: int = 0           # 0: 4 * n_embd; with experts, the width of each expert
    dropout: float = 0.0
    # normalisation
    norm: str = "layernorm"       # "layernorm" | "rmsnorm" (computed in float32)
    norm_eps: float = 1e-5
    norm_bias: bool = True        # LayerNorm bias
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + w), w stored as an offset from 1 (Gemma)
    sandwich_norm: bool = False   # also normalise the attention/MLP outputs before the residual add (Gemma)
    qk_norm: bool = False         # RMSNorm over head_dim on q and k before RoPE (Gemma)
    # positions
    pos_emb: str = "learned"      # "learned" absolute table (GPT-2) | "rope" (rotate-half)
    rope_theta: float = 10000.0   # RoPE base of full-attention layers
    rope_local_theta: float = 0.0  # RoPE base of sliding layers; 0: rope_theta (Gemma: 1e4 vs 1e6)
    yarn_factor: float = 1.0      # YaRN context extension of the full-layer base; 1: off (GPT-OSS: 32)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_original_ctx: int = 4096
    yarn_truncate: bool = False
    # attention
    attn_pattern: str = "F"       # layer kinds, repeated over depth: F full causal, S sliding window
    sliding_window: int = 0       # S layers: a query sees itself and the sliding_window - 1 keys before it
    attn_scale_dim: int = 0       # scores scaled by attn_scale_dim ** -0.5; 0: head_dim (Gemma: query_pre_attn_scalar)
    attn_sinks: bool = False      # a learned logit per head joins every softmax row, with no value (GPT-OSS)
    qkv_bias: bool = True
    attn_out_bias: bool = True
    # MLP
    mlp: str = "gelu"             # "gelu": fc-gelu-proj | "geglu": gated GELU (Gemma) | "swiglu": clamped SwiGLU (GPT-OSS)
    gelu_approx: str = "tanh"     # GELU of gelu/geglu MLPs: "tanh" (HF GPT-2 gelu_new, Gemma) | "none": exact (nanoGPT)
    mlp_bias: bool = True         # also the per-expert biases
    swiglu_limit: float = 7.0
    n_expert: int = 0             # > 0: mixture of experts, each a clamped SwiGLU MLP (GPT-OSS)
    n_expert_active: int = 0      # experts per token (top-k)
    router_bias: bool = False
    moe_aux_loss_weight: float = 0.01  # Switch-style load-balancing loss added to the LM loss in training
    # embeddings and head
    embed_scale: bool = False     # multiply token embeddings by sqrt(n_embd), rounded to the weight dtype (Gemma)
    tie_embeddings: bool = True
    logit_softcap: float = 0.0    # tanh(logits / c) * c; 0: off
    # LoRA fine-tuning: low-rank adapters on the weights named by lora_targets (comma-separated patterns matched
    # against module or expert-tensor names, e.g. "attn.c_attn,attn.c_proj" or "h.7.mlp.down,h.15.mlp.down")
    lora_rank: int = 0            # 0: no adapters
    lora_alpha: float = 16.0      # adapter output scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "attn.c_attn,attn.c_proj"

    def __post_init__(self):
        assert self.norm in ("layernorm", "rmsnorm"), f"norm must be layernorm or rmsnorm, got {self.norm!r}"
        assert self.pos_emb in ("learned", "rope"), f"pos_emb must be learned or rope, got {self.pos_emb!r}"
        assert self.mlp in ("gelu", "geglu", "swiglu"), f"mlp must be gelu, geglu or swiglu, got {self.mlp!r}"
        assert self.gelu_approx in ("tanh", "none"), f"gelu_approx must be tanh or none, got {self.gelu_approx!r}"
        assert self.attn_pattern and set(self.attn_pattern) <= {"F", "S"}, "attn_pattern is a string of F and S"
        assert "S" not in self.attn_pattern or self.sliding_window > 0, "sliding layers need sliding_window > 0"
        assert self.n_head % self.kv_heads == 0, "n_head must be a multiple of n_kv_head"
        assert self.n_expert == 0 or 0 < self.n_expert_active <= self.n_expert, "need 0 < n_expert_active <= n_expert"
        assert self.n_expert == 0 or self.mlp == "swiglu", "experts are clamped-SwiGLU MLPs (mlp='swiglu')"

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def hd(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def hidden(self):
        return self.mlp_hidden or 4 * self.n_embd

    def layer_kind(self, i):
        return self.attn_pattern[i % len(self.attn_pattern)]

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}: checkpoint from a newer nanoforge?")
        return cls(**d)

    @staticmethod
    def presets():
        return list(PRESETS)

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=3)
            hint = f" (did you mean: {', '.join(close)}?)" if close else f" (known: {', '.join(PRESETS)})"
            raise ValueError(f"unknown preset {name!r}{hint}")
        return cls(**{**PRESETS[name], **overrides})


_GPT2 = dict(vocab_size=50257, block_size=1024)
_GEMMA3 = dict(norm="rmsnorm", norm_eps=1e-6, norm_unit_offset=True, sandwich_norm=True, qk_norm=True,
               pos_emb="rope", rope_theta=1e6, rope_local_theta=1e4, attn_pattern="SSSSSF", qkv_bias=False,
               attn_out_bias=False, mlp="geglu", mlp_bias=False, embed_scale=True)
_GPT_OSS = dict(norm="rmsnorm", norm_eps=1e-5, pos_emb="rope", attn_pattern="SF", attn_sinks=True, mlp="swiglu",
                mlp_bias=True, swiglu_limit=7.0, tie_embeddings=False)
PRESETS = {
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # the small GPT-2 of the original from-scratch scripts: 49,434,624 parameters
    "gpt2-compact": dict(vocab_size=50257, block_size=512, n_layer=6, n_head=6, n_embd=384, qkv_bias=False,
                         tie_embeddings=False, dropout=0.1),
    "gemma3-270m": dict(_GEMMA3, vocab_size=262144, block_size=32768, n_layer=18, n_head=4, n_kv_head=1,
                        n_embd=640, head_dim=256, mlp_hidden=2048, sliding_window=512, attn_scale_dim=256),
    # the scaled-down Gemma 3 of the original training scripts (GPT-2 tokenizer): 164,654,976 parameters
    "gemma3-compact": dict(_GEMMA3, vocab_size=50257, block_size=32768, n_layer=18, n_head=4, n_kv_head=1,
                           n_embd=640, head_dim=256, mlp_hidden=2048, sliding_window=512, attn_scale_dim=256,
                           tie_embeddings=False),
    "gpt-oss-20b": dict(_GPT_OSS, vocab_size=201088, block_size=131072, n_layer=24, n_head=64, n_kv_head=8,
                        n_embd=2880, head_dim=64, mlp_hidden=2880, sliding_window=128, rope_theta=150000.0,
                        yarn_factor=32.0, yarn_original_ctx=4096, n_expert=32, n_expert_active=4, router_bias=True),
    "gpt-oss-120b": dict(_GPT_OSS, vocab_size=201088, block_size=131072, n_layer=36, n_head=64, n_kv_head=8,
                         n_embd=2880, head_dim=64, mlp_hidden=2880, sliding_window=128, rope_theta=150000.0,
                         yarn_factor=32.0, yarn_original_ctx=4096, n_expert=128, n_expert_active=4, router_bias=True),
    # the original compact GPT-OSS recipe: 1,442,041,488 parameters; trained at 1024, YaRN-extended to 4096
    "gpt-oss-compact": dict(_GPT_OSS, vocab_size=32000, block_size=4096, n_layer=6, n_head=24, n_kv_head=4,
                            n_embd=1536, head_dim=64, mlp_hidden=3072, sliding_window=256, rope_theta=10000.0,
                            yarn_factor=4.0, yarn_original_ctx=1024, n_expert=16, n_expert_active=4,
                            qkv_bias=False, attn_out_bias=False, router_bias=False, tie_embeddings=True),
}


# ----------------------------------------------------------------------------------------------------------------
# building blocks


class Linear(nn.Linear):
    """nn.Linear with an optional LoRA adapter: y = x W^T + b + dropout(x) A^T B^T * alpha / rank.
    The base weight keeps its name (and may stay frozen in bf16); the adapter adds lora_A and lora_B."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)

    def add_lora(self, rank, alpha, dropout):
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: B = 0, so training starts at the base
        self.lora_scale, self.lora_dropout = alpha / rank, nn.Dropout(dropout)

    def forward(self, x):
        y = super().forward(x)
        if self.lora_A is not None:
            A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
            y = y + F.linear(F.linear(self.lora_dropout(x), A), B) * self.lora_scale
        return y

    @torch.no_grad()
    def merge_lora(self):
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # at least float32 (float64 stays float64)
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.lora_scale
        self.weight.copy_((self.weight.to(dtype) + delta).to(self.weight.dtype))
        self.lora_A = self.lora_B = None


class Norm(nn.Module):
    """LayerNorm, or RMSNorm in float32 with weight w (GPT-OSS) or 1 + w (Gemma)."""

    def __init__(self, dim, config):
        super().__init__()
        self.kind, self.eps, self.unit_offset = config.norm, config.norm_eps, config.norm_unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if self.unit_offset else torch.ones(dim))
        has_bias = self.kind == "layernorm" and config.norm_bias
        self.bias = nn.Parameter(torch.zeros(dim)) if has_bias else None

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.size(-1),), self.weight, self.bias, self.eps)
        weight = self.weight.float() + 1.0 if self.unit_offset else self.weight.float()
        return F.rms_norm(x.float(), (x.size(-1),), weight, self.eps).to(x.dtype)


def rope_inv_freq(config, theta, yarn):
    """Inverse frequencies of rotate-half RoPE and the cos/sin scale; YaRN blends interpolated and original ones."""
    d = config.hd
    pos_freq = theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if not yarn or config.yarn_factor == 1.0:
        return 1.0 / pos_freq, 1.0

    def correction_dim(rotations):  # the frequency index that turns `rotations` times over the original context
        return d * math.log(config.yarn_original_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(config.yarn_beta_fast), correction_dim(config.yarn_beta_slow)
    if config.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = ramp / (config.yarn_factor * pos_freq) + (1 - ramp) / pos_freq
    return inv_freq, 0.1 * math.log(config.yarn_factor) + 1.0


def rope_cos_sin(inv_freq, scale, pos, dtype):
    """cos and sin for integer positions pos (T,) or (B, T): float32 math, then cast, as transformers does."""
    angles = pos.float().unsqueeze(-1) * inv_freq
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (T, D/2) or (B, T, D/2). Rotate-half convention."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv, self.hd = config.n_head, config.kv_heads, config.hd
        self.layer_idx = layer_idx
        self.sliding = config.layer_kind(layer_idx) == "S"
        self.window = config.sliding_window
        self.scale = (config.attn_scale_dim or config.hd) ** -0.5
        self.dropout = config.dropout
        # q, k and v from one matmul; for GQA the k and v parts are narrower
        self.c_attn = Linear(config.n_embd, (self.n_head + 2 * self.n_kv) * self.hd, bias=config.qkv_bias)
        self.c_proj = Linear(self.n_head * self.hd, config.n_embd, bias=config.attn_out_bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm, self.k_norm = Norm(self.hd, config), Norm(self.hd, config)
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.attn_sinks else None

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope["S" if self.sliding else "F"]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: append to this layer's KV cache, attend over what it holds
            k, v, mask = cache.update(self.layer_idx, k, v)
        else:
            mask = None
        window = self.window if self.sliding and cache is None else 0
        y = attention(q, k, v, mask, self.scale, self.sinks, self.dropout if self.training else 0.0, window)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        return self.resid_dropout(self.c_proj(y))


def clamped_swiglu(gate, up, limit, alpha=1.702):
    """GPT-OSS activation: gate clamped above, up clamped both ways, and the +1 on up."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


class MLP(nn.Module):
    """Dense MLP. Gated kinds keep gate and up in one matmul: c_fc's output is [gate | up]."""

    def __init__(self, config):
        super().__init__()
        self.kind, self.limit, self.approx = config.mlp, config.swiglu_limit, config.gelu_approx
        width = config.hidden * (1 if self.kind == "gelu" else 2)
        self.c_fc = Linear(config.n_embd, width, bias=config.mlp_bias)
        self.c_proj = Linear(config.hidden, config.n_embd, bias=config.mlp_bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate=self.approx)
        else:
            gate, up = h.chunk(2, dim=-1)
            if self.kind == "geglu":
                h = F.gelu(gate, approximate=self.approx) * up
            else:
                h = clamped_swiglu(gate, up, self.limit)
        return self.dropout(self.c_proj(h))


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


class MoE(nn.Module):
    """GPT-OSS mixture of experts. Expert weights are stacked, in transformers' x @ W layout:
    gate_up [E, C, 2I] with gate and up interleaved in the columns, down [E, I, C]."""

    def __init__(self, config):
        super().__init__()
        E, C, I = config.n_expert, config.n_embd, config.hidden
        self.top_k, self.limit = config.n_expert_active, config.swiglu_limit
        self.router = Linear(C, E, bias=config.router_bias)
        self.gate_up = nn.Parameter(torch.empty(E, C, 2 * I))
        self.down = nn.Parameter(torch.empty(E, I, C))
        self.gate_up_bias = nn.Parameter(torch.zeros(E, 2 * I)) if config.mlp_bias else None
        self.down_bias = nn.Parameter(torch.zeros(E, C)) if config.mlp_bias else None
        self.lora = nn.ParameterDict()  # per-expert adapters: {name}_A [E, in, r] and {name}_B [E, r, out]

    def add_lora(self, name, rank, alpha, dropout):
        """A low-rank adapter per expert on the stacked tensor `name` ("gate_up" or "down"), in x @ W layout."""
        E, n_in, n_out = getattr(self, name).shape
        A = torch.empty(E, n_in, rank, device=self.down.device)
        for e in range(E):  # PEFT's init per expert: kaiming-uniform A (as [r, in]), B = 0
            nn.init.kaiming_uniform_(A[e].T, a=math.sqrt(5))
        self.lora[name + "_A"] = nn.Parameter(A)
        self.lora[name + "_B"] = nn.Parameter(torch.zeros(E, rank, n_out, device=self.down.device))
        self.lora_scale, self.lora_dropout = alpha / rank, nn.Dropout(dropout)

    def expert_matmul(self, x, name, counts):
        y = grouped_matmul(x, getattr(self, name), counts, getattr(self, name + "_bias"))
        if name + "_A" in self.lora:
            A, B = self.lora[name + "_A"].to(x.dtype), self.lora[name + "_B"].to(x.dtype)
            y = y + grouped_matmul(grouped_matmul(self.lora_dropout(x), A, counts), B, counts) * self.lora_scale
        return y

    @torch.no_grad()
    def merge_lora(self):
        for name in ("gate_up", "down"):
            if name + "_A" in self.lora:
                W = getattr(self, name)
                dtype = torch.promote_types(W.dtype, torch.float32)
                delta = torch.bmm(self.lora.pop(name + "_A").to(dtype), self.lora.pop(name + "_B").to(dtype))
                W.copy_((W.to(dtype) + delta * self.lora_scale).to(W.dtype))

    def forward(self, x):
        """Returns the output and this layer's router logits (for the load-balancing loss)."""
        shape, C = x.shape, x.size(-1)
        x = x.reshape(-1, C)
        logits = self.router(x)
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)
        weights = F.softmax(top_logits, dim=-1)
        # sort the (token, slot) pairs by expert so each expert runs once on a contiguous block of its tokens
        flat_experts = top_experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.gate_up.size(0))
        h = self.expert_matmul(x.index_select(0, token), "gate_up", counts)  # backward: index_add, not index_put
        gate, up = h.view(h.size(0), -1, 2).unbind(-1)  # interleaved columns; backward: one stack, no zero-fills
        h = clamped_swiglu(gate, up, self.limit)
        out = self.expert_matmul(h, "down", counts)
        out = out * weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))
        self.expert_counts = counts.detach()
        return y.view(shape), logits


def load_balancing_loss(router_logits, n_expert, top_k):
    """Switch-style auxiliary loss as transformers computes it, over all layers' logits [L * N, E]:
    E * sum_e (top-k assignments to e / N) * mean_e(softmax probability)."""
    logits = torch.cat(router_logits).float()
    probs = F.softmax(logits, dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices.reshape(-1)
    assigned = torch.zeros(n_expert, device=logits.device).index_add_(0, chosen, torch.ones_like(chosen, dtype=torch.float))
    return n_expert * torch.sum(assigned / logits.size(0) * probs.mean(dim=0))


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


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = Norm(config.n_embd, config)
        self.mlp = MoE(config) if config.n_expert else MLP(config)
        if config.sandwich_norm:
            self.post_attn_norm = Norm(config.n_embd, config)
            self.post_mlp_norm = Norm(config.n_embd, config)

    def forward(self, x, rope, cache=None):
        h = self.attn(self.ln_1(x), rope, cache)
        x = x + (self.post_attn_norm(h) if hasattr(self, "post_attn_norm") else h)
        h = self.mlp(self.ln_2(x))
        h, router_logits = h if isinstance(h, tuple) else (h, None)
        x = x + (self.post_mlp_norm(h) if hasattr(self, "post_mlp_norm") else h)
        return x, router_logits


# ----------------------------------------------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=Norm(config.n_embd, config),
        ))
        if config.pos_emb == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos_emb == "rope":  # inverse frequencies only: cos/sin are made per forward for the positions used
            self.init_rope()
        self._residual_projections = {b.attn.c_proj for b in self.transformer.h} | {
            b.mlp.c_proj for b in self.transformer.h if isinstance(b.mlp, MLP)}
        self.apply(self._init_weights)
        del self._residual_projections
        if config.lora_rank:
            self.add_lora()
        self.gradient_checkpointing = False  # a training setting (train.py's gradient_checkpointing), not architecture
        self.aux_loss = None       # last training forward's load-balancing loss (detached), for logging
        self.lm_loss = None        # last forward's language-model loss (detached), for logging

    def init_rope(self, device=None):
        """(Re)compute the RoPE inverse frequencies in float32: non-persistent buffers, so hf.py calls this
        after building the model on the meta device and materialising it with to_empty."""
        config = self.config
        local_theta = config.rope_local_theta or config.rope_theta
        full, self.rope_scale_full = rope_inv_freq(config, config.rope_theta, yarn=True)
        local, self.rope_scale_local = rope_inv_freq(config, local_theta, yarn=local_theta == config.rope_theta)
        self.register_buffer("inv_freq_full", full.to(device), persistent=False)
        self.register_buffer("inv_freq_local", local.to(device), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        """.to(dtype), .half(), .to_empty() would round or empty the RoPE buffers: recompute them in float32."""
        super()._apply(fn, *args, **kwargs)
        if self.config.pos_emb == "rope":
            self.init_rope(self.inv_freq_full.device)
        return self

    def _init_weights(self, module):
        """nanoGPT's init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std, proj_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, nn.Linear):
            is_proj = module in self._residual_projections
            nn.init.normal_(module.weight, mean=0.0, std=proj_std if is_proj else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoE):
            nn.init.normal_(module.gate_up, mean=0.0, std=std)
            nn.init.normal_(module.down, mean=0.0, std=proj_std)

    # -- LoRA ---------------------------------------------------------------------------------------------------

    def lora_sites(self):
        """(name, module, tensor) for every weight matched by config.lora_targets; tensor is None for a Linear."""
        patterns = [p.strip() for p in self.config.lora_targets.split(",") if p.strip()]
        sites = []
        for name, module in self.named_modules():
            candidates = [(name, None)] if isinstance(module, Linear) else []
            if isinstance(module, MoE):
                candidates = [(f"{name}.gate_up", "gate_up"), (f"{name}.down", "down")]
            for full, tensor in candidates:
                if any(fnmatch.fnmatch(full, p) or fnmatch.fnmatch(full, "*." + p) for p in patterns):
                    sites.append((full, module, tensor))
        if not sites:
            raise ValueError(f"lora_targets {self.config.lora_targets!r} match no weight; names look like "
                             f"'transformer.h.0.attn.c_attn', 'h.0.mlp.c_fc', 'h.7.mlp.down' (experts)")
        if self.config.tie_embeddings and any(module is self.lm_head for _, module, _ in sites):
            # merging would add the head's update to the shared embedding matrix too
            raise ValueError(f"lora_targets {self.config.lora_targets!r} match lm_head, whose weight is the token "
                             f"embedding (tie_embeddings): leave lm_head out of lora_targets")
        return sites

    def add_lora(self, **lora_fields):
        """Adapters on every weight lora_targets names, after setting the lora_* config fields given (e.g.
        add_lora(lora_rank=8) on a loaded model). B starts at 0, so the model's outputs do not change."""
        for name, value in lora_fields.items():
            if not name.startswith("lora_") or not hasattr(self.config, name):
                raise ValueError(f"{name!r} is not a LoRA field of GPTConfig")
            setattr(self.config, name, value)
        cfg = self.config
        if cfg.lora_rank <= 0:
            raise ValueError(f"lora_rank must be positive to add adapters, got {cfg.lora_rank}")
        for _, module, tensor in self.lora_sites():
            if tensor is None:
                module.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
            else:
                module.add_lora(tensor, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)

    def lora_parameters(self):
        return [p for n, p in self.named_parameters() if "lora" in n]

    def merge_lora(self):
        """Fold every adapter into its weight; the model is then a plain model (config.lora_rank = 0)."""
        for m in self.modules():
            if isinstance(m, Linear) and m.lora_A is not None or isinstance(m, MoE) and len(m.lora):
                m.merge_lora()
        self.config.lora_rank = 0
        return self

    # -- sizes, flops ----------------------------------------------------------------------------------------------

    def num_params(self, active=False):
        """All unique parameters; active=True counts only the top-k experts a token uses."""
        n = sum(p.numel() for p in self.parameters())
        if active and self.config.n_expert:
            idle = 1 - self.config.n_expert_active / self.config.n_expert
            n -= int(sum(p.numel() for m in self.modules() if isinstance(m, MoE)
                         for p in (m.gate_up, m.down, m.gate_up_bias, m.down_bias) if p is not None) * idle)
        return n

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward) at sequence length T, as in the PaLM appendix:
        6 per active matmul weight, plus attention scores over the keys each query actually sees."""
        cfg = self.config
        n = self.num_params(active=True)
        if "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if not cfg.tie_embeddings:  # the input embedding is a lookup, not a matmul
            n -= self.transformer.wte.weight.numel()
        attn = sum(12 * cfg.n_head * cfg.hd * (min(T, cfg.sliding_window) if cfg.layer_kind(i) == "S" else T)
                   for i in range(cfg.n_layer))
        return 6 * n + attn

    def estimate_mfu(self, tokens_per_iter, dt, device="cpu", dtype=torch.float32):
        """Model FLOPs utilisation against the peak of the device actually used."""
        return self.flops_per_token(self.config.block_size) * tokens_per_iter / dt / device_peak_flops(device, dtype)

    # -- forward -------------------------------------------------------------------------------------------------

    def rope(self, pos, dtype):
        if self.config.pos_emb != "rope":
            return None
        return {"F": rope_cos_sin(self.inv_freq_full, self.rope_scale_full, pos, dtype),
                "S": rope_cos_sin(self.inv_freq_local, self.rope_scale_local, pos, dtype)}

    def embed(self, idx, pos):
        x = self.transformer.wte(idx)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x)

    def hidden_states(self, idx, pos=None, cache=None):
        """Final-norm hidden states (B, T, C) and each MoE layer's router logits. pos: (T,) or (B, T)."""
        T = idx.size(1)
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.embed(idx, pos)
        rope = self.rope(pos, x.dtype)
        router_logits = []
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recompute this block's activations in the backward pass: memory for compute
                x, logits = torch.utils.checkpoint.checkpoint(block, x, rope, cache, use_reentrant=False)
            else:
                x, logits = block(x, rope, cache)
            if logits is not None:
                router_logits.append(logits)
        return self.transformer.ln_f(x), router_logits

    def head(self, x):
        logits = self.lm_head(x)
        if self.config.logit_softcap:
            logits = torch.tanh(logits / self.config.logit_softcap) * self.config.logit_softcap
        return logits

    def forward(self, idx, targets=None, return_logits=True):
        """Logits (B, T, vocab) for every position, and the loss if targets are given (-1 = ignore).
        return_logits=False (train.py): the loss alone, and logits None; past 32 MB of logits it comes from
        head_loss, which never holds them whole (and is faster). In training, MoE models add
        moe_aux_loss_weight * the load-balancing loss to the loss."""
        x, router_logits = self.hidden_states(idx)
        if targets is not None and not return_logits and self.chunked_head_loss(targets.numel(), compute_dtype(x)):
            logits, loss = None, head_loss(x, self.lm_head.weight, targets, self.config.logit_softcap)
        else:
            logits = self.head(x)
            if targets is None:
                return logits, None
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        self.lm_loss = loss.detach()
        if router_logits and self.training and self.config.moe_aux_loss_weight:
            aux = load_balancing_loss(router_logits, self.config.n_expert, self.config.n_expert_active)
            self.aux_loss = aux.detach()
            loss = loss + self.config.moe_aux_loss_weight * aux
        return (logits if return_logits else None), loss

    def chunked_head_loss(self, n_tokens, dtype):
        """Whether training's loss comes from head_loss: past 32 MB of logits, for a plain head (no adapter or
        bias), and not in float16, whose range the per-token gradients (softmax / tokens) would underflow."""
        plain_head = self.lm_head.lora_A is None and self.lm_head.bias is None
        return plain_head and dtype != torch.float16 and n_tokens * self.config.vocab_size * 4 > 2**25

    def expert_load(self):
        """Tokens routed to each expert in the last forward, per MoE layer: (n_layer, n_expert), or None."""
        counts = [b.mlp.expert_counts for b in self.transformer.h if isinstance(b.mlp, MoE)]
        return torch.stack(counts) if counts else None

    # -- optimizer -------------------------------------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, eps=1e-8):
        """AdamW with weight decay on matrices only (nanoGPT); fused when the device supports it."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)

    # -- Hugging Face checkpoints (hf.py does the mapping) -----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu", **overrides):
        """A Hugging Face GPT-2, Gemma 3 or GPT-OSS checkpoint: a hub id (gpt2, google/gemma-3-270m,
        openai/gpt-oss-20b, ...) or a local directory with config.json and safetensors. overrides: GPTConfig
        fields; lora_rank etc. add fresh float32 adapters on top of the loaded weights."""
        import hf
        lora = {k: overrides.pop(k) for k in list(overrides) if k.startswith("lora_")}
        model = hf.load_pretrained(cls, name_or_path, dtype=dtype, device=device, **overrides)
        if lora.get("lora_rank"):  # after the weights: adapters built on the meta device would stay uninitialised
            model.add_lora(**lora)
        return model

    def save_pretrained(self, path, dtype=None, max_shard_bytes=5 * 2**30):
        """Write the Hugging Face layout (config.json + safetensors) that transformers loads."""
        import hf
        hf.save_pretrained(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    # -- generation (KV cache) ---------------------------------------------------------------------------------

    def forward_cached(self, idx, cache):
        """Run new tokens idx (B, T) through the model, appending to cache; logits of the last position (B, V).
        One token per row on a static cache (see compile_decode) runs the compiled step."""
        if idx.size(1) == 1 and getattr(cache, "static", False):
            logits = self._compiled_step(idx, cache)
        else:
            logits = self.one_step(idx, cache)
        cache.advance()
        return logits

    def one_step(self, idx, cache):
        x, _ = self.hidden_states(idx, pos=cache.positions(idx.size(1)), cache=cache.begin(idx.size(1)))
        return self.head(x[:, -1, :])

    def compile_decode(self, **compile_kwargs):
        """torch.compile the one-token decoding step (gpt-fast style). KVCaches made afterwards are static: a
        decode step attends over all of a full layer's preallocated columns (masked past the newest) instead
        of a slice that grows every step, and the column counter is a tensor, so nothing the compiled step
        sees changes shape from step to step or, the length being marked dynamic, from one generation to the
        next: it compiles once. Prompts (several tokens per row) run uncompiled. Mixture-of-experts models
        (GPT-OSS) stay uncompiled: their tokens are grouped by expert in sizes known only at run time, which
        would break the graph at every layer and recompile for every new grouping. Returns whether it compiled."""
        if self.config.n_expert:
            return False
        self._compiled_step = torch.compile(self.one_step, **compile_kwargs)
        return True

    @torch.no_grad()
    def use_decode_layout(self):
        """Store the weights of the Linears that widen (out > in: c_attn, c_fc, the vocabulary head) transposed
        in memory: same shapes and values, strides (1, out). On CPU MKL's matrix-vector product for one token
        streams such a weight faster that way (about 2x for the head); for the square and narrowing ones the
        default layout is as fast or faster. For inference only (sample.py, serve.py): training keeps the
        default layout."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.is_contiguous() and m.out_features > m.in_features:
                m.weight.data = m.weight.data.t().contiguous().t()
        return self

    @torch.no_grad()
    def generate_stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
                        generator=None):
        """Decode a batch of prompts (lists of token ids, any lengths) with a KV cache: one pass over the prompts,
        then one token per step. Yields, per step, a list with each row's new token id, or None for rows that
        have stopped (a row stops after yielding one of stop_tokens)."""
        device = self.lm_head.weight.device
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        longest = max(lengths)
        if longest + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's block_size {self.config.block_size}")
        # left-pad so every row's next token lands in the same column; positions start at 0 in every row
        pad = torch.tensor([longest - n for n in lengths], device=device)
        idx = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)
        cache = KVCache(self, len(prompts), longest + max_new_tokens, pad)
        logits = self.forward_cached(idx, cache)
        stop_tokens, running = set(stop_tokens), [True] * len(prompts)
        for step in range(max_new_tokens):
            next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
            out = []
            for row, token in enumerate(next_tokens[:, 0].tolist()):
                out.append(token if running[row] else None)
                running[row] = running[row] and token not in stop_tokens
            yield out
            if not any(running) or step == max_new_tokens - 1:
                return
            logits = self.forward_cached(next_tokens, cache)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens (nanoGPT's signature); temperature 0 is greedy."""
        steps = list(self.generate_stream(idx.tolist(), max_new_tokens, temperature, top_k, top_p,
                                          generator=generator))
        return torch.cat([idx, torch.tensor(steps, dtype=idx.dtype, device=idx.device).T], dim=1)


class KVCache:
    """Preallocated keys and values for every layer, gpt-fast style. Full layers keep every column; sliding
    layers keep a ring buffer of the last `window` columns, so their memory stays flat however long the run.

    Rows are left-padded to a common length: column c of row b holds position c - pad[b]; padding columns
    are masked out of every real query. One forward = begin(T), each layer's update(), then advance().

    A static cache (made for a model after compile_decode) gives the compiled one-token step fixed shapes: its
    column counter is also a tensor (col_t), and a decode step attends over every column of a full layer,
    those past the newest masked out, rather than over a slice that grows.
    """

    def __init__(self, model, batch_size, max_len, pad):
        cfg, p = model.config, model.lm_head.weight
        self.window, self.pad, self.col = cfg.sliding_window, pad, 0
        self.static = hasattr(model, "_compiled_step")
        self.col_t = torch.zeros(1, dtype=torch.long, device=p.device)
        self.ring = min(max_len, cfg.sliding_window) if "S" in cfg.attn_pattern else 0
        self.ring_cols = torch.full((self.ring,), -1, device=p.device)  # the column each ring slot holds
        self.k, self.v, self.sliding = [], [], []
        for i in range(cfg.n_layer):
            sliding = cfg.layer_kind(i) == "S"
            shape = (batch_size, cfg.kv_heads, self.ring if sliding else max_len, cfg.hd)
            self.k.append(torch.zeros(shape, dtype=p.dtype, device=p.device))
            self.v.append(torch.zeros(shape, dtype=p.dtype, device=p.device))
            self.sliding.append(sliding)
            if self.static and not sliding:  # one compiled step for every length (else one compile per length)
                torch._dynamo.maybe_mark_dynamic(self.k[-1], 2)
                torch._dynamo.maybe_mark_dynamic(self.v[-1], 2)
        self.full_cols = None if all(self.sliding) else torch.arange(max_len, device=p.device)
        if self.static and self.full_cols is not None:
            torch._dynamo.maybe_mark_dynamic(self.full_cols, 0)

    def decoding_static(self, T):
        return self.static and T == 1

    def positions(self, T):
        if self.decoding_static(T):
            return (self.col_t - self.pad).clamp(min=0).unsqueeze(1)  # (B, 1)
        cols = torch.arange(self.col, self.col + T, device=self.pad.device)
        return (cols.unsqueeze(0) - self.pad.unsqueeze(1)).clamp(min=0)  # (B, T)

    def mask(self, key_cols, query_cols, window=0):
        """(B, 1, T, S): key column visible to query column, in this row's real tokens (and window)."""
        k, q = key_cols.view(1, 1, 1, -1), query_cols.view(1, 1, -1, 1)
        ok = (k <= q) & (k >= self.pad.view(-1, 1, 1, 1))
        if window:
            ok = ok & (k > q - window) & (k >= 0)
        return ok | (k == q)  # a padding query sees itself, so its (unused) output stays finite

    def begin(self, T):
        """Prepare the masks of a forward of T new tokens, shared by all layers of a kind."""
        self.T = T
        if self.decoding_static(T):  # every preallocated column, the newest one a tensor: fixed shapes
            q = self.col_t
            self.full_mask = None if self.full_cols is None else self.mask(self.full_cols, q)
        else:
            q = torch.arange(self.col, self.col + T, device=self.pad.device)
            self.full_mask = self.mask(torch.arange(self.col + T, device=q.device), q)
        if self.ring:
            keep = q[-self.ring:]  # the new columns that stay in the ring, and their slots
            self.ring_slots = keep % self.ring
            new_ring_cols = self.ring_cols.clone()
            new_ring_cols[self.ring_slots] = keep
            # one token: write into the ring, then attend over it. Several: attend over ring + new, then write
            key_cols = new_ring_cols if T == 1 else torch.cat([self.ring_cols, q])
            self.sliding_mask = self.mask(key_cols, q, self.window)
            self.new_ring_cols = new_ring_cols
        return self

    def update(self, layer, k, v):
        """Store this layer's new keys/values (B, Hkv, T, D); return the keys, values and mask to attend over."""
        K, V = self.k[layer], self.v[layer]
        if not self.sliding[layer] and self.decoding_static(self.T):
            K.index_copy_(2, self.col_t, k)
            V.index_copy_(2, self.col_t, v)
            return K, V, self.full_mask
        if not self.sliding[layer]:
            K[:, :, self.col:self.col + self.T] = k
            V[:, :, self.col:self.col + self.T] = v
            return K[:, :, :self.col + self.T], V[:, :, :self.col + self.T], self.full_mask
        if self.T == 1:
            K.index_copy_(2, self.ring_slots, k)
            V.index_copy_(2, self.ring_slots, v)
            return K, V, self.sliding_mask
        k_all, v_all = torch.cat([K, k], dim=2), torch.cat([V, v], dim=2)
        n = len(self.ring_slots)
        K.index_copy_(2, self.ring_slots, k[:, :, -n:])
        V.index_copy_(2, self.ring_slots, v[:, :, -n:])
        return k_all, v_all, self.sliding_mask

    def advance(self):
        self.col += self.T
        if self.static:
            self.col_t += self.T
        if self.ring:
            self.ring_cols = self.new_ring_cols


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from logits (B, V): greedy at temperature 0, else top-k then nucleus (top-p)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, sorted_idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ----------------------------------------------------------------------------------------------------------------
# peak FLOP/s of the device in use, for MFU

# dense tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name()
GPU_PEAK_FLOPS = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 91.6e12},
    "L4": {torch.bfloat16: 121e12, torch.float16: 121e12, torch.float32: 30.3e12},
    "A10": {torch.bfloat16: 125e12, torch.float16: 125e12, torch.float32: 31.2e12},
    "4090": {torch.bfloat16: 165e12, torch.float16: 165e12, torch.float32: 82.6e12},
    "3090": {torch.bfloat16: 71e12, torch.float16: 71e12, torch.float32: 35.6e12},
    "V100": {torch.float16: 125e12, torch.float32: 15.7e12},
    "T4": {torch.float16: 65e12, torch.float32: 8.1e12},
}


@functools.lru_cache(maxsize=None)
def device_peak_flops(device="cpu", dtype=torch.float32):
    """Peak FLOP/s: a table for known GPUs; on CPU (or an unknown GPU) a measured matmul peak."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_FLOPS.items():
            if key in name and dtype in peaks:
                return peaks[dtype]
    return measure_matmul_flops(device, dtype)


def measure_matmul_flops(device, dtype, n=1024, reps=20):  # best of 20: a busy machine still shows its peak
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
