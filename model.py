"""
One GPT module for three families of decoder-only transformers, chosen by GPTConfig switches:

- GPT-2:   learned positions, LayerNorm, GELU MLP, fused biased qkv, tied head.
- Gemma 3: RMSNorm(1+w), sandwich norms, q/k norm, gated GELU, sliding/full layers with two RoPE bases, MQA.
- GPT-OSS: RMSNorm, mixture of experts (top-k, clamped SwiGLU), attention sinks, YaRN RoPE, sliding/full, GQA.

Every switch lives in GPTConfig; grep a field's name to see the one place it is used. The file reads top to
bottom: the config, the building blocks, then GPT (forward first, then LoRA, sizes, the optimizer, Hugging Face
loading and generation). Elsewhere: the speed-only paths in ops.py (each tested against the plain computation it
replaces), the KV cache, sampler and decoding loop in engine.py, Hugging Face import/export in hf.py.
"""

import difflib
import fnmatch
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import devices
import ops


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


def rope_tables(config):
    """(inverse frequencies, cos/sin scale) of full ("F") and sliding ("S") layers: Gemma's sliding layers have
    their own base, YaRN extends only the full layers' (or both, when they share the base, as GPT-OSS's do)."""
    local_theta = config.rope_local_theta or config.rope_theta
    return {"F": rope_inv_freq(config, config.rope_theta, yarn=True),
            "S": rope_inv_freq(config, local_theta, yarn=local_theta == config.rope_theta)}


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
        self.q_norm = Norm(self.hd, config) if config.qk_norm else nn.Identity()
        self.k_norm = Norm(self.hd, config) if config.qk_norm else nn.Identity()
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.attn_sinks else None

    def forward(self, x, rope, cache=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope["S" if self.sliding else "F"]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: append to this layer's KV cache, attend over what it holds
            k, v, mask = cache.update(self.layer_idx, k, v)
        else:
            mask = None
        window = self.window if self.sliding and cache is None else 0
        y = ops.attention(q, k, v, mask, self.scale, self.sinks, self.dropout if self.training else 0.0, window)
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
        return self.dropout(self.c_proj(h)), None  # no router logits: MoE's shape of result




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
        y = ops.grouped_matmul(x, getattr(self, name), counts, getattr(self, name + "_bias"))
        if name + "_A" in self.lora:
            A, B = self.lora[name + "_A"].to(x.dtype), self.lora[name + "_B"].to(x.dtype)
            y = y + ops.grouped_matmul(ops.grouped_matmul(self.lora_dropout(x), A, counts), B, counts) * self.lora_scale
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
        """The experts' weighted output and this layer's router logits (for training's load-balancing loss), as
        MLP returns (output, None); keeps the tokens each expert got (for logging)."""
        shape, C = x.shape, x.size(-1)
        x = x.reshape(-1, C)
        logits = self.router(x)
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)
        weights = F.softmax(top_logits, dim=-1)
        # sort the (token, slot) pairs by expert so each expert runs once on a contiguous block of its tokens
        flat_experts = top_experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.router.out_features)
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




class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = Norm(config.n_embd, config)
        self.mlp = MoE(config) if config.n_expert else MLP(config)
        self.post_attn_norm = Norm(config.n_embd, config) if config.sandwich_norm else nn.Identity()
        self.post_mlp_norm = Norm(config.n_embd, config) if config.sandwich_norm else nn.Identity()

    def forward(self, x, rope, cache=None):
        x = x + self.post_attn_norm(self.attn(self.ln_1(x), rope, cache))
        h, router_logits = self.mlp(self.ln_2(x))
        return x + self.post_mlp_norm(h), router_logits


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
        # RoPE inverse frequencies, float32, per device: a plain dict, not buffers, so .to(dtype) cannot round them
        self.rope_freqs = {}
        self._residual_projections = {b.attn.c_proj for b in self.transformer.h} | {
            b.mlp.c_proj for b in self.transformer.h if isinstance(b.mlp, MLP)}
        self.apply(self._init_weights)
        del self._residual_projections
        if config.lora_rank:
            self.add_lora()
        self.gradient_checkpointing = False  # a training setting (train.py's gradient_checkpointing), not architecture
        self.aux_loss = None       # last training forward's load-balancing loss (detached), for logging
        self.lm_loss = None        # last forward's language-model loss (detached), for logging

    def forward(self, idx, targets=None, return_logits=True):
        """Logits (B, T, vocab) for every position, and the loss if targets are given (-1 = ignore).
        return_logits=False (train.py): the loss alone, and logits None; past 32 MB of logits it comes from
        ops.head_loss, which never holds them whole (and is faster). In training, MoE models add
        moe_aux_loss_weight * the load-balancing loss to the loss."""
        x, router_logits = self.hidden_states(idx)
        if targets is not None and not return_logits and self.chunked_head_loss(targets.numel(), ops.compute_dtype(x)):
            logits, loss = None, ops.head_loss(x, self.lm_head.weight, targets, self.config.logit_softcap)
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

    def hidden_states(self, idx, pos=None, cache=None):
        """Final-norm hidden states (B, T, C) and the MoE layers' router logits. pos: (T,) or (B, T) positions, by
        default 0..T-1; cache: the engine's KV cache, which the attention layers append to (generation)."""
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

    def embed(self, idx, pos):
        x = self.transformer.wte(idx)
        if self.config.embed_scale:
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x)

    def rope(self, pos, dtype):
        """cos/sin of full ("F") and sliding ("S") layers at positions pos; None for learned positions."""
        if self.config.pos_emb != "rope":
            return None
        if pos.device not in self.rope_freqs:
            self.rope_freqs[pos.device] = {kind: (inv.to(pos.device), scale)
                                           for kind, (inv, scale) in rope_tables(self.config).items()}
        return {kind: rope_cos_sin(inv, scale, pos, dtype) for kind, (inv, scale) in self.rope_freqs[pos.device].items()}

    def head(self, x):
        logits = self.lm_head(x)
        if self.config.logit_softcap:
            logits = torch.tanh(logits / self.config.logit_softcap) * self.config.logit_softcap
        return logits

    def chunked_head_loss(self, n_tokens, dtype):
        """Whether training's loss comes from ops.head_loss: past 32 MB of logits, for a plain head (no adapter or
        bias), and not in float16, whose range the per-token gradients (softmax / tokens) would underflow."""
        plain_head = self.lm_head.lora_A is None and self.lm_head.bias is None
        return plain_head and dtype != torch.float16 and n_tokens * self.config.vocab_size * 4 > 2**25

    def expert_load(self):
        """Tokens routed to each expert in the last forward, per MoE layer: (n_layer, n_expert), or None."""
        counts = [b.mlp.expert_counts for b in self.transformer.h if isinstance(b.mlp, MoE)]
        return torch.stack(counts) if counts else None

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
        if cfg.pos_emb == "learned":
            n -= self.transformer.wpe.weight.numel()
        if not cfg.tie_embeddings:  # the input embedding is a lookup, not a matmul
            n -= self.transformer.wte.weight.numel()
        attn = sum(12 * cfg.n_head * cfg.hd * (min(T, cfg.sliding_window) if cfg.layer_kind(i) == "S" else T)
                   for i in range(cfg.n_layer))
        return 6 * n + attn

    def estimate_mfu(self, tokens_per_iter, dt, device="cpu", dtype=torch.float32):
        """Model FLOPs utilisation against the peak of the device actually used (devices.peak_flops); at most 1: a
        peak measured low (a busy host) must not report more than the machine can do."""
        flops = self.flops_per_token(self.config.block_size) * tokens_per_iter / dt
        return min(1.0, flops / devices.peak_flops(device, dtype))

    def memory_estimate(self, batch_size, block_size, dtype, gradient_checkpointing=False, optimizer="adamw"):
        """Rough device memory of training this model per process, in bytes: weights, gradients, optimizer state
        ('adamw' or 'muon'), and the activations of one micro-batch computed in dtype (the peak comes in its
        backward pass). Reads only shapes, dtypes and requires_grad, so the model may live on the meta device."""
        named = list(self.named_parameters())  # each shared (tied) parameter once
        size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
        trained = [(n, p) for n, p in named if p.requires_grad]
        momentum_only = [p for n, p in trained if optimizer == "muon" and self.is_muon_param(n, p)]
        chunked_head = self.chunked_head_loss(batch_size * block_size, dtype)
        return dict(weights=size(p for _, p in named), gradients=size(p for _, p in trained),
                    optimizer=2 * size(p for _, p in trained) - size(momentum_only),  # AdamW: 2 moments, Muon: 1
                    activations=self.activation_bytes(batch_size, block_size, dtype, gradient_checkpointing,
                                                      chunked_head))

    def activation_bytes(self, batch_size, block_size, dtype, gradient_checkpointing, chunked_head):
        """Activations kept for backward in one micro-batch, counted per token and layer from what a block saves:
        norm and projection inputs, q/k/v (GQA's repeated k/v too) and the attention output, the MLP's (or the top-k
        experts') hidden states. Gradient checkpointing keeps each block's input and recomputes one block at a time.
        Fused (GPU) attention is assumed: no T x T scores, except the additive mask attention sinks need. The logits
        come on top: whole, with their float32 log-probabilities and gradients, where chunked_head_loss says no;
        else one chunk of ops.head_loss's rows at a time (float32 logits turned softmax in place, their gradient in
        the compute dtype, the tanh of a softcap)."""
        cfg = self.config
        a = 4 if dtype == torch.float32 else 2  # bytes per activation: autocast computes in 16 bits
        tokens = batch_size * block_size
        C, q, kv, hidden = cfg.n_embd, cfg.n_head * cfg.hd, cfg.kv_heads * cfg.hd, cfg.hidden
        attn = 2 * C + 3 * q + 2 * kv + (2 * q if kv != q else 0)
        if cfg.n_expert:  # each token's rows through gate_up, the clamped SwiGLU's intermediates, down, weighting
            mlp = 2 * C + cfg.n_expert_active * (2 * C + 7 * hidden)
        else:  # c_fc's output and the activation's; gated: [gate | up], act(gate) and the product
            mlp = 2 * C + (2 if cfg.mlp == "gelu" else 4) * hidden
        block = tokens * (attn + mlp + (2 * C if cfg.sandwich_norm else 0)) * a
        if cfg.attn_sinks:
            block += cfg.n_head * block_size * (block_size + 1) * a
        blocks = cfg.n_layer * tokens * C * a + block if gradient_checkpointing else cfg.n_layer * block
        if not chunked_head:
            return blocks + tokens * cfg.vocab_size * (a + 12)
        rows = min(tokens, ops.head_loss_rows(cfg.vocab_size))
        return blocks + rows * cfg.vocab_size * (4 + a + (8 if cfg.logit_softcap else 0))

    @staticmethod
    def is_muon_param(name, p):
        """optimizer='muon': the 2D weights inside the blocks (not the router); AdamW takes the rest."""
        return p.dim() == 2 and name.startswith("transformer.h.") and ".router." not in name


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


    # -- generation: engine.py (the KV cache, the sampler, prefill and the decode step) ---------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens (nanoGPT's signature); temperature 0 is greedy."""
        import engine
        return engine.generate(self, idx, max_new_tokens, temperature, top_k, top_p, generator)

    def generate_stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
                        generator=None):
        """Decode a batch of prompts (lists of token ids, any lengths); yields, per step, a list with each row's
        new token id, or None for rows that have stopped (a row stops after yielding one of stop_tokens)."""
        import engine
        return engine.generate_stream(self, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                                      generator)
