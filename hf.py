"""
Hugging Face checkpoints in and out of nanoforge's GPT: GPT-2, Gemma 3 (text) and GPT-OSS.

    model = GPT.from_pretrained("openai/gpt-oss-20b", dtype=torch.bfloat16, device="cuda")
    model.save_pretrained("out/hf")  # transformers.AutoModelForCausalLM.from_pretrained("out/hf") loads it

Top to bottom: config.json <-> GPTConfig, the table of tensor names (one table serves load and save),
MXFP4 expert decoding, the streaming loader, the sharded writer. Only safetensors and JSON are read or
written (no pickle). Loading builds the model on the meta device, materialises it once in the target dtype
and copies the checkpoint in tensor by tensor, so peak host memory stays near one copy of the model.
"""

import json
import math
import os
from dataclasses import dataclass, fields, replace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import GPTConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "gemma3_text", "gemma3", "gpt_oss")
GPT_OSS_SWIGLU_ALPHA = 1.702  # fixed in model.clamped_swiglu

# ----------------------------------------------------------------------------------------------------------------
# config.json -> GPTConfig
#
# A field missing from config.json takes the default of transformers' config class for that model type.
# Training-only settings are not taken from the checkpoint: dropout stays 0 (pass dropout=... as an override),
# and GPT-OSS's router_aux_loss_coef (0.9 in the released configs, used by transformers only when
# output_router_logits=True) does not replace our moe_aux_loss_weight; save_pretrained writes ours out as it.


def config_from_hf(hf_config):
    """GPTConfig for a transformers config.json dict (gpt2, gemma3_text, gemma3 multimodal's text part, gpt_oss)."""
    model_type = hf_config.get("model_type")
    if model_type == "gemma3":  # the multimodal wrapper: the language model's config is nested
        text = dict(hf_config.get("text_config") or {})
        text.setdefault("tie_word_embeddings", hf_config.get("tie_word_embeddings", True))
        hf_config, model_type = text, "gemma3_text"
    if model_type == "gpt2":
        return _gpt2_config(hf_config)
    if model_type == "gemma3_text":
        return _gemma3_config(hf_config)
    if model_type == "gpt_oss":
        return _gpt_oss_config(hf_config)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    raise ValueError(f"unsupported model_type {model_type!r} in config.json (supported: {supported})")


GELU_APPROX = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # transformers' names: ours


def _gpt2_config(hf):
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_APPROX:
        raise ValueError(f"GPT-2 activation_function {act!r} is not supported (nanoforge has GELU: "
                         f"{', '.join(GELU_APPROX)})")
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                    ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise ValueError(f"GPT-2 {key}={hf[key]!r} is not supported (needs {ok})")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768),
        mlp_hidden=hf.get("n_inner") or 0, dropout=0.0, norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        pos_emb="learned", mlp="gelu", gelu_approx=GELU_APPROX[act],
        tie_embeddings=hf.get("tie_word_embeddings", True))


def _gemma3_config(hf):
    act = hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"Gemma 3 hidden_activation {act!r} is not supported (nanoforge uses gelu_pytorch_tanh)")
    if hf.get("attn_logit_softcapping") is not None or hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 attn_logit_softcapping / use_bidirectional_attention are not supported")
    full_theta, local_theta = _gemma3_rope_thetas(hf)
    n_layer = hf.get("num_hidden_layers", 26)
    layer_types = hf.get("layer_types") or [  # older configs: every sliding_window_pattern-th layer is full
        "full_attention" if (i + 1) % hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)) == 0
        else "sliding_attention"
        for i in range(n_layer)]
    query_scalar = hf.get("query_pre_attn_scalar", 256)
    if query_scalar != int(query_scalar):
        raise ValueError(f"Gemma 3 query_pre_attn_scalar {query_scalar} must be a whole number")
    n_head = hf.get("num_attention_heads", 8)
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 262208), block_size=hf.get("max_position_embeddings", 131072),
        n_layer=n_layer, n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf.get("hidden_size", 2304), head_dim=hf.get("head_dim", 256),
        mlp_hidden=hf.get("intermediate_size", 9216), dropout=0.0, norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm_unit_offset=True, sandwich_norm=True, qk_norm=True,
        pos_emb="rope", rope_theta=full_theta, rope_local_theta=local_theta,
        attn_pattern=attn_pattern_from(layer_types, n_layer), sliding_window=hf.get("sliding_window", 4096) or 0,
        attn_scale_dim=int(query_scalar), qkv_bias=hf.get("attention_bias", False),
        attn_out_bias=hf.get("attention_bias", False), mlp="geglu", mlp_bias=False, embed_scale=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), logit_softcap=hf.get("final_logit_softcapping") or 0.0)


def _gemma3_rope_thetas(hf):
    """(full, sliding) RoPE bases from transformers 5's per-layer-type rope_parameters or the older fields."""
    params = hf.get("rope_parameters") or {}
    if "rope_type" in params or "rope_theta" in params:  # one dict for all layers: it describes the full ones
        params = {"full_attention": params}
    full = dict(params.get("full_attention") or hf.get("rope_scaling") or {})
    local = dict(params.get("sliding_attention") or {})
    for kind, p in (("full_attention", full), ("sliding_attention", local)):
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"Gemma 3 {kind} rope_type {rope_type!r} is not supported (only default RoPE; "
                             "gemma-3-270m and 1b use it, the 4b+ multimodal models scale RoPE)")
    return (float(full.get("rope_theta", hf.get("rope_theta", 1e6))),
            float(local.get("rope_theta", hf.get("rope_local_base_freq", 1e4))))


def _gpt_oss_config(hf):
    alpha = hf.get("swiglu_alpha", GPT_OSS_SWIGLU_ALPHA)
    if alpha != GPT_OSS_SWIGLU_ALPHA:
        raise ValueError(f"GPT-OSS swiglu_alpha {alpha} is not supported (nanoforge uses {GPT_OSS_SWIGLU_ALPHA})")
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise ValueError(f"quantization {quant!r} is not supported (only MXFP4 experts, which load dequantized)")
    n_layer, n_head = hf.get("num_hidden_layers", 36), hf.get("num_attention_heads", 64)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    block_size = hf.get("max_position_embeddings", 131072)
    attention_bias = hf.get("attention_bias", True)
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 201088), block_size=block_size, n_layer=n_layer, n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf.get("hidden_size", 2880),
        head_dim=hf.get("head_dim", 64), mlp_hidden=hf.get("intermediate_size", 2880), dropout=0.0,
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-5), pos_emb="rope", **_gpt_oss_rope(hf, block_size),
        attn_pattern=attn_pattern_from(layer_types, n_layer), sliding_window=hf.get("sliding_window", 128) or 0,
        attn_sinks=True, qkv_bias=attention_bias, attn_out_bias=attention_bias, mlp="swiglu", mlp_bias=True,
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        n_expert=hf.get("num_local_experts", hf.get("num_experts", 128)),
        n_expert_active=hf.get("num_experts_per_tok", 4),
        router_bias=True, tie_embeddings=hf.get("tie_word_embeddings", False))


def _gpt_oss_rope(hf, block_size):
    """GPTConfig RoPE fields from rope_parameters (transformers 5) or rope_theta + rope_scaling (older configs)."""
    default = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                   original_max_position_embeddings=4096)  # GptOssConfig's default
    p = hf.get("rope_parameters") or hf.get("rope_scaling") or default
    theta = float(p.get("rope_theta", hf.get("rope_theta", 150000.0)))
    rope_type = p.get("rope_type", p.get("type", "default"))
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return dict(rope_theta=theta)
    if rope_type != "yarn":
        raise ValueError(f"GPT-OSS rope_type {rope_type!r} is not supported (default or yarn)")
    original_ctx = hf.get("original_max_position_embeddings") or p.get("original_max_position_embeddings", block_size)
    factor = p.get("factor") or block_size / original_ctx
    default_attention_factor = 0.1 * math.log(factor) + 1.0
    if p.get("attention_factor") not in (None, default_attention_factor) or p.get("mscale") or p.get("mscale_all_dim"):
        raise ValueError("YaRN attention_factor / mscale other than the default 0.1 * ln(factor) + 1 are not supported")
    return dict(rope_theta=theta, yarn_factor=float(factor), yarn_beta_fast=float(p.get("beta_fast") or 32.0),
                yarn_beta_slow=float(p.get("beta_slow") or 1.0), yarn_original_ctx=int(original_ctx),
                yarn_truncate=bool(p.get("truncate", True)))


def attn_pattern_from(layer_types, n_layer):
    """F/S string, one letter per layer, for transformers' layer_types."""
    kinds = {"full_attention": "F", "sliding_attention": "S"}
    unknown = sorted(set(layer_types) - set(kinds))
    if unknown or len(layer_types) != n_layer:
        raise ValueError(f"layer_types must list {n_layer} of full_attention / sliding_attention, "
                         f"got {unknown or len(layer_types)}")
    return "".join(kinds[t] for t in layer_types)


# ----------------------------------------------------------------------------------------------------------------
# GPTConfig -> config.json


def family_of(config):
    """The Hugging Face architecture a GPTConfig maps to, decided by its switches."""
    if config.pos_emb == "learned":
        return "gpt2"
    if config.n_expert > 0:
        return "gpt_oss"
    if config.norm_unit_offset or config.sandwich_norm:
        return "gemma3_text"
    raise ValueError("no Hugging Face architecture matches this GPTConfig: GPT-2 needs pos_emb='learned', "
                     "GPT-OSS n_expert > 0, Gemma 3 norm_unit_offset/sandwich_norm")


def _require(family, config, **wanted):
    """Raise naming the first field whose value the family's HF architecture cannot express."""
    for field, allowed in wanted.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        value = getattr(config, field)
        if value not in allowed:
            raise ValueError(f"GPTConfig.{field}={value!r} cannot be saved as a Hugging Face {family} checkpoint "
                             f"(needs {' or '.join(map(repr, allowed))})")


def hf_config_from(config, dtype=None):
    """transformers config.json dict for a GPTConfig. Biases our config leaves out but the HF architecture
    always has (GPT-2's, GPT-OSS's router/expert biases) are written as zeros, which is exact; features the
    architecture lacks raise a ValueError naming the field."""
    family = family_of(config)
    kinds = {"S": "sliding_attention", "F": "full_attention"}
    layer_types = [kinds[config.layer_kind(i)] for i in range(config.n_layer)]
    if family == "gpt2":
        _require(family, config, norm="layernorm", mlp="gelu", n_expert=0, n_kv_head=(0, config.n_head),
                 head_dim=(0, config.n_embd // config.n_head), attn_scale_dim=(0, config.hd), qk_norm=False,
                 sandwich_norm=False, attn_sinks=False, embed_scale=False, logit_softcap=0.0)
        if "S" in config.attn_pattern:
            raise ValueError(f"GPTConfig.attn_pattern={config.attn_pattern!r}: GPT-2 has no sliding layers")
        if config.n_embd % config.n_head:
            raise ValueError(f"GPT-2 needs n_embd ({config.n_embd}) divisible by n_head ({config.n_head})")
        hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=config.vocab_size,
                  n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                  n_inner=config.mlp_hidden or None, resid_pdrop=config.dropout,
                  activation_function="gelu_new" if config.gelu_approx == "tanh" else "gelu",
                  embd_pdrop=config.dropout, attn_pdrop=config.dropout, layer_norm_epsilon=config.norm_eps,
                  scale_attn_weights=True, tie_word_embeddings=config.tie_embeddings)
    elif family == "gemma3_text":
        _require(family, config, pos_emb="rope", norm="rmsnorm", norm_unit_offset=True, sandwich_norm=True,
                 qk_norm=True, mlp="geglu", gelu_approx="tanh", mlp_bias=False, embed_scale=True, attn_sinks=False,
                 yarn_factor=1.0)
        if config.n_embd % config.n_head:  # Gemma3TextConfig.validate_architecture insists
            raise ValueError(f"Gemma 3 needs n_embd ({config.n_embd}) divisible by n_head ({config.n_head})")
        local_theta = config.rope_local_theta or config.rope_theta
        hf = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=config.vocab_size,
                  hidden_size=config.n_embd, intermediate_size=config.hidden, num_hidden_layers=config.n_layer,
                  num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads, head_dim=config.hd,
                  hidden_activation="gelu_pytorch_tanh", max_position_embeddings=config.block_size,
                  rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                                   "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta}},
                  attention_bias=config.qkv_bias or config.attn_out_bias, attention_dropout=config.dropout,
                  query_pre_attn_scalar=config.attn_scale_dim or config.hd,
                  sliding_window=config.sliding_window or None, layer_types=layer_types,
                  final_logit_softcapping=config.logit_softcap or None, attn_logit_softcapping=None)
    else:
        _require(family, config, pos_emb="rope", norm="rmsnorm", norm_unit_offset=False, sandwich_norm=False,
                 qk_norm=False, mlp="swiglu", attn_sinks=True, embed_scale=False, logit_softcap=0.0,
                 attn_scale_dim=(0, config.hd), rope_local_theta=(0, config.rope_theta))
        rope = {"rope_type": "default", "rope_theta": config.rope_theta}
        if config.yarn_factor != 1.0:
            rope.update(rope_type="yarn", factor=config.yarn_factor, beta_fast=config.yarn_beta_fast,
                        beta_slow=config.yarn_beta_slow, truncate=config.yarn_truncate,
                        original_max_position_embeddings=config.yarn_original_ctx)
        hf = dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=config.vocab_size,
                  hidden_size=config.n_embd, intermediate_size=config.hidden, num_hidden_layers=config.n_layer,
                  num_attention_heads=config.n_head, num_key_value_heads=config.kv_heads, head_dim=config.hd,
                  num_local_experts=config.n_expert, num_experts_per_tok=config.n_expert_active,
                  sliding_window=config.sliding_window or None, layer_types=layer_types,
                  max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_parameters=rope,
                  attention_bias=config.qkv_bias or config.attn_out_bias, attention_dropout=config.dropout,
                  swiglu_alpha=GPT_OSS_SWIGLU_ALPHA, swiglu_limit=config.swiglu_limit, hidden_act="silu",
                  router_aux_loss_coef=config.moe_aux_loss_weight, output_router_logits=False,
                  tie_word_embeddings=config.tie_embeddings)
    if dtype is not None:  # "dtype" for transformers 5, "torch_dtype" for 4.x
        hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    return hf


# ----------------------------------------------------------------------------------------------------------------
# tensor names: one table per config, read one way to load and the other way to save


@dataclass
class Entry:
    hf: str                   # tensor name in the checkpoint
    ours: str | None          # our parameter; None: a bias we don't have, written as zeros (shape below)
    rows: tuple | None = None  # (start, stop) along dim 0 of ours: q/k/v share c_attn, gate/up share c_fc
    transpose: bool = False   # GPT-2's Conv1D stores [in, out]
    shape: tuple = ()         # only for ours=None


def tensor_layout(config):
    """Every tensor of the Hugging Face checkpoint for this config, mapped onto our parameters."""
    family = family_of(config)
    C, I, E = config.n_embd, config.hidden, config.n_expert
    q, kv = config.n_head * config.hd, config.kv_heads * config.hd
    entries = []

    def add(hf, ours, rows=None, transpose=False, present=True, shape=()):
        entries.append(Entry(hf, ours if present else None, rows, transpose, shape))

    def attention(h, o):  # Gemma 3 and GPT-OSS: separate q/k/v/o projections
        bias = config.qkv_bias or config.attn_out_bias
        for name, rows in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv))):
            add(f"{h}self_attn.{name}_proj.weight", f"{o}attn.c_attn.weight", rows)
            if bias:
                add(f"{h}self_attn.{name}_proj.bias", f"{o}attn.c_attn.bias", rows, present=config.qkv_bias,
                    shape=(rows[1] - rows[0],))
        add(f"{h}self_attn.o_proj.weight", f"{o}attn.c_proj.weight")
        if bias:
            add(f"{h}self_attn.o_proj.bias", f"{o}attn.c_proj.bias", present=config.attn_out_bias, shape=(C,))

    if family == "gpt2":  # our names are GPT-2's
        t = "transformer."
        add(t + "wte.weight", t + "wte.weight")
        add(t + "wpe.weight", t + "wpe.weight")
        for i in range(config.n_layer):
            p = f"{t}h.{i}."
            for name, width, transpose, has_bias in (
                    ("ln_1", C, False, config.norm_bias), ("attn.c_attn", 3 * C, True, config.qkv_bias),
                    ("attn.c_proj", C, True, config.attn_out_bias), ("ln_2", C, False, config.norm_bias),
                    ("mlp.c_fc", I, True, config.mlp_bias), ("mlp.c_proj", C, True, config.mlp_bias)):
                add(f"{p}{name}.weight", f"{p}{name}.weight", transpose=transpose)
                add(f"{p}{name}.bias", f"{p}{name}.bias", present=has_bias, shape=(width,))
        add(t + "ln_f.weight", t + "ln_f.weight")
        add(t + "ln_f.bias", t + "ln_f.bias", present=config.norm_bias, shape=(C,))
    else:
        add("model.embed_tokens.weight", "transformer.wte.weight")
        for i in range(config.n_layer):
            h, o = f"model.layers.{i}.", f"transformer.h.{i}."
            add(h + "input_layernorm.weight", o + "ln_1.weight")
            attention(h, o)
            if family == "gemma3_text":  # Gemma's post_attention_layernorm is the sandwich norm, not the pre-MLP one
                add(h + "post_attention_layernorm.weight", o + "post_attn_norm.weight")
                add(h + "pre_feedforward_layernorm.weight", o + "ln_2.weight")
                add(h + "post_feedforward_layernorm.weight", o + "post_mlp_norm.weight")
                add(h + "self_attn.q_norm.weight", o + "attn.q_norm.weight")
                add(h + "self_attn.k_norm.weight", o + "attn.k_norm.weight")
                add(h + "mlp.gate_proj.weight", o + "mlp.c_fc.weight", (0, I))
                add(h + "mlp.up_proj.weight", o + "mlp.c_fc.weight", (I, 2 * I))
                add(h + "mlp.down_proj.weight", o + "mlp.c_proj.weight")
            else:
                add(h + "post_attention_layernorm.weight", o + "ln_2.weight")
                add(h + "self_attn.sinks", o + "attn.sinks")
                add(h + "mlp.router.weight", o + "mlp.router.weight")
                add(h + "mlp.router.bias", o + "mlp.router.bias", present=config.router_bias, shape=(E,))
                add(h + "mlp.experts.gate_up_proj", o + "mlp.gate_up")
                add(h + "mlp.experts.gate_up_proj_bias", o + "mlp.gate_up_bias", present=config.mlp_bias,
                    shape=(E, 2 * I))
                add(h + "mlp.experts.down_proj", o + "mlp.down")
                add(h + "mlp.experts.down_proj_bias", o + "mlp.down_bias", present=config.mlp_bias,
                    shape=(E, C))
        add("model.norm.weight", "transformer.ln_f.weight")
    if not config.tie_embeddings:
        add("lm_head.weight", "lm_head.weight")
    return entries


def layout_key(name, family):
    """The table name of a checkpoint tensor, or None for one to skip (buffers, a multimodal model's vision tower)."""
    if family == "gpt2":
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old GPT-2 files
            return None
        if not name.startswith(("transformer.", "lm_head.")):  # hub files of the bare GPT2Model
            name = "transformer." + name
    elif family == "gemma3_text":  # Gemma3ForConditionalGeneration: language_model.model.* or model.language_model.*
        for prefix in ("language_model.model.", "model.language_model."):
            if name.startswith(prefix):
                name = "model." + name.removeprefix(prefix)
        name = name.removeprefix("language_model.")  # language_model.lm_head.weight
        if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                            "model.multi_modal_projector.")):
            return None
    return name


# ----------------------------------------------------------------------------------------------------------------
# MXFP4: released GPT-OSS checkpoints store the expert matrices as 4-bit floats with a shared power of two per
# block of 32 values. *_blocks: uint8 [E, out, G, 16], two codes per byte, the low nibble the even element;
# *_scales: uint8 [E, out, G], the exponent + 127. Decoded [E, out, G * 32] = [E, out, in]; ours is [E, in, out].
# (Checked against transformers.integrations.mxfp4.convert_moe_packed_tensors.)

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def decode_mxfp4(blocks, scales):
    """float32 [..., G * 32] from blocks uint8 [..., G, 16] and scales uint8 [..., G]."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low, high = table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32]: even elements from the low nibbles
    values = values * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return values.flatten(-2)


def copy_mxfp4(param, blocks, scales, name):
    """Decode expert by expert on param's device straight into param [E, in, out]: the float32 temporaries never
    exceed one expert's matrix."""
    decoded_shape = (blocks.size(0), blocks.size(-2) * 32, blocks.size(1))  # [E, in, out]
    if blocks.shape[:-1] != scales.shape or decoded_shape != tuple(param.shape):
        raise ValueError(f"{name}: MXFP4 blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} do not decode "
                         f"to the model's {tuple(param.shape)}")
    for e in range(blocks.size(0)):
        param[e].copy_(decode_mxfp4(blocks[e].to(param.device), scales[e].to(param.device)).T)


# ----------------------------------------------------------------------------------------------------------------
# loading


def checkpoint_dir(name_or_path):
    """A local checkpoint directory, or a hub id downloaded (config and safetensors at the repo root only)."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(f"{name_or_path} has no config.json: not a Hugging Face checkpoint directory")
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path} is a file: pass the checkpoint directory that holds config.json")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"no such checkpoint directory: {name_or_path}")
    try:  # "*/*" skips subfolders such as gpt-oss's original/ and metal/ copies of the weights
        return hub().snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"],
                                       ignore_patterns=["*/*"])
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"could not download {name_or_path!r} from the Hugging Face Hub "
                                f"({type(e).__name__}: {reason}); check the name, the network and HF_TOKEN, "
                                "or pass a local checkpoint directory") from None


def hub():
    """huggingface_hub with its own warnings off: a failed download (offline, wrong name) becomes one line of
    ours, not its retry log followed by ours."""
    import huggingface_hub
    from huggingface_hub.utils import logging as hub_logging
    hub_logging.set_verbosity_error()
    return huggingface_hub


def safetensors_files(directory):
    """The checkpoint's weight files: those named by model.safetensors.index.json, else every *.safetensors."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no .safetensors weights in {directory} (pickled pytorch_model.bin is not supported)")
    paths = [os.path.join(directory, n) for n in names]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in model.safetensors.index.json but missing")
    return paths


def load_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu", **overrides):
    """Build cls (GPT) from a Hugging Face checkpoint; overrides replace GPTConfig fields (e.g. dropout=0.1)."""
    directory = checkpoint_dir(name_or_path)
    with open(os.path.join(directory, "config.json")) as f:
        config = config_from_hf(json.load(f))
    unknown = sorted(set(overrides) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise ValueError(f"unknown GPTConfig override(s) {unknown}")
    model = empty_model(cls, replace(config, **overrides), dtype, device)
    load_weights(model, safetensors_files(directory))
    return model


def empty_model(cls, config, dtype=torch.float32, device="cpu"):
    """cls(config) with uninitialised weights (no memory or time spent on a random init that a checkpoint
    overwrites next): the one meta-device builder, used by every loader."""
    with torch.device("meta"):
        model = cls(config).to(dtype)
    model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives each module its own tensor, untying the head
        model.lm_head.weight = model.transformer.wte.weight
    return model


@torch.no_grad()
def load_weights(model, files):
    """Stream the checkpoint into the materialised model, one tensor at a time."""
    config, family = model.config, family_of(model.config)
    layout = {e.hf: e for e in tensor_layout(config)}
    params = dict(model.named_parameters())
    where = {}  # tensor name -> file: MXFP4 blocks and their scales may sit in different shards
    for path in files:
        with safe_open(path, framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path))
    loaded, unexpected = set(), []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                key = layout_key(name, family)
                if key is None or key.endswith("_scales") or (key == "lm_head.weight" and config.tie_embeddings):
                    continue  # skipped; scales are read with their blocks; a tied head is the embedding
                packed = key.endswith("_blocks")
                key = key.removesuffix("_blocks")
                entry = layout.get(key)
                if entry is None or key in loaded:
                    unexpected.append(name)
                    continue
                if packed:
                    scales_name = name.removesuffix("_blocks") + "_scales"
                    if scales_name not in where:
                        raise ValueError(f"{name} has no {scales_name} in the checkpoint")
                    with safe_open(where[scales_name], framework="pt") as g:
                        copy_mxfp4(params[entry.ours], f.get_tensor(name), g.get_tensor(scales_name), name)
                else:
                    copy_tensor(params, entry, f.get_tensor(name))
                loaded.add(key)
    missing = [k for k in layout if k not in loaded]
    if unexpected:
        raise ValueError(f"checkpoint tensors with no place in this {family} config: {_some(unexpected)}")
    if missing:
        raise ValueError(f"checkpoint lacks tensors this {family} config needs: {_some(missing)}")


def copy_tensor(params, entry, tensor):
    if entry.ours is None:  # a bias our config leaves out (an override): only zeros can be dropped
        if tensor.any():
            raise ValueError(f"{entry.hf} is non-zero but the config has no such bias (check the overrides)")
        return
    target = params[entry.ours]
    target = target if entry.rows is None else target[entry.rows[0]:entry.rows[1]]
    tensor = tensor.T if entry.transpose else tensor
    if entry.ours == "transformer.wpe.weight":  # a block_size override below the checkpoint's crops the table
        tensor = tensor[:target.size(0)]
    if tensor.shape != target.shape:
        raise ValueError(f"{entry.hf}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(target.shape)} "
                         "(config.json and weights disagree, or an override changed a size)")
    target.copy_(tensor)  # casts to the model's dtype and moves to its device


def _some(names, n=8):
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


# ----------------------------------------------------------------------------------------------------------------
# saving


def save_pretrained(model, path, dtype=None, max_shard_bytes=5 * 2**30):
    """Write config.json and model.safetensors (or model-0000i-of-0000N.safetensors shards plus
    model.safetensors.index.json above max_shard_bytes) in the layout transformers loads. dtype None keeps the
    model's. Files are written under temporary names and renamed at the end; stale weight files are removed."""
    config = model.config
    dtype = dtype or model.transformer.wte.weight.dtype
    entries = tensor_layout(config)
    hf_config = hf_config_from(config, dtype)
    params = dict(model.named_parameters())
    shards = plan_shards(entries, params, dtype, max_shard_bytes)
    os.makedirs(path, exist_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written = []
    for name, shard in zip(names, shards):
        tensors = {e.hf: export_tensor(e, params, dtype) for e in shard}
        save_file(tensors, os.path.join(path, f".{name}.tmp"), metadata={"format": "pt"})
        written.append(name)
        del tensors
    if len(shards) > 1:
        total = sum(_nbytes(e, params, dtype) for e in entries)
        weight_map = {e.hf: name for name, shard in zip(names, shards) for e in shard}
        _write_json(os.path.join(path, ".model.safetensors.index.json.tmp"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append("model.safetensors.index.json")
    _write_json(os.path.join(path, ".config.json.tmp"), hf_config)
    written.append("config.json")
    for name in os.listdir(path):  # weights of an earlier save that this one does not overwrite
        stale = name.startswith("model") and name.endswith((".safetensors", ".index.json")) and name not in written
        if stale:
            os.remove(os.path.join(path, name))
    for name in written:
        os.replace(os.path.join(path, f".{name}.tmp"), os.path.join(path, name))


def export_tensor(entry, params, dtype):
    """The checkpoint tensor for one table entry: a fresh contiguous CPU copy (safetensors rejects shared memory)."""
    if entry.ours is None:
        return torch.zeros(entry.shape, dtype=dtype)
    t = params[entry.ours].detach()
    t = t if entry.rows is None else t[entry.rows[0]:entry.rows[1]]
    t = t.T if entry.transpose else t
    return torch.empty(t.shape, dtype=dtype).copy_(t)


def _nbytes(entry, params, dtype):
    numel = math.prod(entry.shape) if entry.ours is None else params[entry.ours].numel()
    if entry.ours is not None and entry.rows is not None:
        numel = numel // params[entry.ours].size(0) * (entry.rows[1] - entry.rows[0])
    return numel * dtype.itemsize


def plan_shards(entries, params, dtype, max_shard_bytes):
    """Split the table, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own shard)."""
    shards, size = [[]], 0
    for entry in entries:
        n = _nbytes(entry, params, dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
