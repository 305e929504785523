"""hf.py against transformers: logit parity on random tiny GPT-2 / Gemma 3 / GPT-OSS models (fp32, CPU, eager
attention), save_pretrained round trips, MXFP4 decoding, the MoE aux loss, and preset parameter counts."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import hf  # noqa: E402
from model import GPT, GPTConfig, load_balancing_loss  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,  # noqa: E402
                          GPT2LMHeadModel, GptOssConfig, GptOssForCausalLM)

TOL = 1e-5
EAGER = dict(attn_implementation="eager", experts_implementation="eager")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # transformers' own init draws from the global generator


def randomise(model, seed=0, std=0.1):
    """Noise on every parameter: transformers' init zeroes biases and sinks and sets norms to 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            assert torch.isfinite(p).all()
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tokens(vocab, T=20, B=2, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


def max_diff(a, b):
    return (a - b).abs().max().item()


def check_round_trip(ours, ref, idx, tmp_path, **save_kwargs):
    """ours.save_pretrained -> transformers reloads it -> the same logits as the reference."""
    out = tmp_path / "saved"
    ours.save_pretrained(out, **save_kwargs)
    reloaded = AutoModelForCausalLM.from_pretrained(out, **EAGER).eval()
    assert max_diff(hf_logits(reloaded, idx), ref) < TOL
    return out


# ----------------------------------------------------------------------------------------------------------------
# GPT-2


def tiny_gpt2(tmp_path, tie=True, activation="gelu_new"):
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tie,
                        activation_function=activation)
    model = randomise(GPT2LMHeadModel(config))
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_gpt2_logits_and_round_trip(tmp_path):
    ref_model, path = tiny_gpt2(tmp_path)
    idx = tokens(97)
    ref = hf_logits(ref_model, idx)
    ours = GPT.from_pretrained(path)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert max_diff(our_logits(ours, idx), ref) < TOL
    check_round_trip(ours, ref, idx, tmp_path)


def test_gpt2_exact_gelu(tmp_path):
    """activation_function='gelu' (exact erf, nanoGPT's nn.GELU) loads as gelu_approx='none' and saves back."""
    ref_model, path = tiny_gpt2(tmp_path, activation="gelu")
    idx = tokens(97)
    ref = hf_logits(ref_model, idx)
    ours = GPT.from_pretrained(path)
    assert ours.config.gelu_approx == "none"
    assert max_diff(our_logits(ours, idx), ref) < TOL
    out = check_round_trip(ours, ref, idx, tmp_path)
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"


def test_gpt2_untied_and_sharded(tmp_path):
    ref_model, path = tiny_gpt2(tmp_path, tie=False)
    idx = tokens(97)
    ref = hf_logits(ref_model, idx)
    ours = GPT.from_pretrained(path)
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    assert max_diff(our_logits(ours, idx), ref) < TOL
    out = check_round_trip(ours, ref, idx, tmp_path, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())
    assert not list(out.glob(".*tmp")) and not (out / "model.safetensors").exists()
    assert max_diff(our_logits(GPT.from_pretrained(out), idx), ref) < TOL
    ours.save_pretrained(out)  # saving unsharded over a sharded save leaves no stale shards behind
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_gpt2_hub_names_without_prefix(tmp_path):
    ref_model, path = tiny_gpt2(tmp_path)
    state = load_file(path / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))  # legacy mask buffers are ignored
    save_file(bare, path / "model.safetensors")
    idx = tokens(97)
    assert max_diff(our_logits(GPT.from_pretrained(path), idx), hf_logits(ref_model, idx)) < TOL


def test_our_gpt2_variant_saves_with_zero_biases(tmp_path):
    # gpt2-compact's shape: no q/k/v bias, untied head; GPT2LMHeadModel gets a zero c_attn bias
    config = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, qkv_bias=False,
                       tie_embeddings=False)
    ours = GPT(config).eval()
    idx = tokens(97)
    ours.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert max_diff(hf_logits(reloaded, idx), our_logits(ours, idx)) < TOL


def test_bf16_load_keeps_rope_in_float32(tmp_path):
    ref_model = randomise(GptOssForCausalLM(tiny_gpt_oss_config()))
    ref_model.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    fresh, idx = GPT(ours.config), torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the RoPE tables are made at the first forward on a device, in float32
        ours(idx), fresh(idx)
    for kind, (inv_freq, _) in ours.rope_freqs[idx.device].items():
        assert inv_freq.dtype == torch.float32
        assert torch.equal(inv_freq, fresh.rope_freqs[idx.device][kind][0])


# ----------------------------------------------------------------------------------------------------------------
# Gemma 3


def test_gemma3_logits_and_round_trip(tmp_path):
    config = Gemma3TextConfig(
        vocab_size=101, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=20, sliding_window=5, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        final_logit_softcapping=3.0, attn_implementation="eager")
    ref_model = randomise(Gemma3ForCausalLM(config))
    ref_model.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf")
    c = ours.config
    assert (c.attn_pattern, c.attn_scale_dim, c.hd, c.kv_heads, c.logit_softcap) == ("SFSS", 20, 24, 1, 3.0)
    idx = tokens(101, T=17)
    ref = hf_logits(ref_model, idx)
    assert max_diff(our_logits(ours, idx), ref) < TOL
    check_round_trip(ours, ref, idx, tmp_path)


def test_gemma3_multimodal_config_takes_text_config():
    config = hf.config_from_hf({"model_type": "gemma3", "text_config": {"num_hidden_layers": 6, "hidden_size": 64}})
    assert (config.n_layer, config.n_embd, config.attn_pattern, config.rope_local_theta) == (6, 64, "SSSSSF", 1e4)


# ----------------------------------------------------------------------------------------------------------------
# GPT-OSS


def tiny_gpt_oss_config(**kw):
    return GptOssConfig(**{**dict(
        vocab_size=101, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        max_position_embeddings=64, swiglu_limit=1.0, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=16)), **kw}, **EAGER)


def test_gpt_oss_logits_and_round_trip(tmp_path):
    ref_model = randomise(GptOssForCausalLM(tiny_gpt_oss_config()))
    assert ref_model.config._experts_implementation == "eager"
    ref_model.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf")
    c = ours.config
    assert (c.attn_pattern, c.yarn_factor, c.yarn_original_ctx, c.yarn_truncate) == ("SFS", 4.0, 16, False)
    idx = tokens(101, T=20)
    ref = hf_logits(ref_model, idx)
    assert max_diff(our_logits(ours, idx), ref) < TOL
    check_round_trip(ours, ref, idx, tmp_path)


def test_mxfp4_decodes_hand_computed_codes():
    blocks = torch.zeros(2, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[1, 15] = 0x2F, 0x71
    scales = torch.tensor([128, 126], dtype=torch.uint8)
    values = hf.decode_mxfp4(blocks, scales)
    assert values.shape == (64,)
    # byte 0x2F, scale 2^1: low nibble 0xF = -6 (even element), high nibble 0x2 = 1.0
    assert values[:2].tolist() == [-12.0, 2.0]
    # byte 0x71, scale 2^-1: low nibble 0x1 = 0.5, high nibble 0x7 = 6.0; last two elements of the second block
    assert values[62:].tolist() == [0.25, 3.0]
    assert values.count_nonzero() == 4


def test_mxfp4_matches_transformers_dequantization():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), generator=g, dtype=torch.uint8)  # [E, out, G, 16]
    scales = torch.randint(120, 135, (3, 8, 2), generator=g, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(hf.decode_mxfp4(blocks, scales).transpose(1, 2), ref)


POSITIVE_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def representable(shape, generator):
    """Random values that MXFP4 holds exactly: a signed table value times a power of two shared per 32."""
    codes = torch.randint(0, 8, shape, generator=generator)
    signs = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    exps = torch.randint(-8, -5, (*shape[:-1], shape[-1] // 32, 1), generator=generator).float()
    return (POSITIVE_FP4[codes] * signs).view(*shape[:-1], -1, 32).mul(torch.exp2(exps)).view(shape)


def pack_mxfp4(w):
    """Quantize w [..., n] (exactly representable) into blocks uint8 [..., n/32, 16] and scales uint8 [..., n/32]."""
    blocks = w.reshape(*w.shape[:-1], -1, 32)
    peak = blocks.abs().amax(-1, keepdim=True)
    exp = torch.where(peak > 0, torch.floor(torch.log2(peak)) - 2, torch.zeros_like(peak))  # peak/2^exp in [4, 8)
    scaled = blocks / torch.exp2(exp)
    match = scaled.abs().unsqueeze(-1) == POSITIVE_FP4
    assert match.any(-1).all(), "not exactly representable"
    codes = match.int().argmax(-1) | ((scaled < 0).int() << 3)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.to(torch.uint8), (exp.squeeze(-1) + 127).to(torch.uint8)


def test_mxfp4_checkpoint_loads_like_dequantized_reference(tmp_path):
    ref_model = randomise(GptOssForCausalLM(tiny_gpt_oss_config()))
    g = torch.Generator().manual_seed(3)
    state = {}
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                dense = representable(p.transpose(1, 2).shape, g)  # [E, out, in], the packed layout
                p.copy_(dense.transpose(1, 2))
                state[name + "_blocks"], state[name + "_scales"] = pack_mxfp4(dense)
            else:
                state[name] = p.detach().clone()
    path = tmp_path / "mxfp4"
    ref_model.config.save_pretrained(path)
    half = len(state) // 2  # two shards, so some blocks and scales may be found across files
    names = sorted(state)
    save_file({k: state[k] for k in names[:half]}, path / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[half:]}, path / "model-00002-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ours = GPT.from_pretrained(path)
    idx = tokens(101, T=20)
    assert max_diff(our_logits(ours, idx), hf_logits(ref_model, idx)) < TOL


def test_moe_aux_loss_matches_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(40, 8, generator=g) for _ in range(3)]
    ours = load_balancing_loss(logits, 8, 2)
    ref = load_balancing_loss_func(tuple(logits), 8, 2)
    assert abs(ours.item() - ref.item()) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# configs, errors, preset sizes


@pytest.mark.parametrize("name", ["gpt2", "gemma3-270m", "gpt-oss-20b", "gpt-oss-120b"])
def test_config_round_trip(name):
    config = GPTConfig.preset(name)
    loaded = hf.config_from_hf(hf.hf_config_from(config))
    layers = range(config.n_layer)
    assert [loaded.layer_kind(i) for i in layers] == [config.layer_kind(i) for i in layers]
    assert replace(loaded, attn_pattern=config.attn_pattern) == config  # the loader spells out every layer


# config.json files as released on the Hub (older field names: rope_theta, rope_scaling, rope_local_base_freq)
HUB_CONFIGS = {
    "gpt2": dict(model_type="gpt2", activation_function="gelu_new", n_ctx=1024, n_embd=768, n_head=12, n_layer=12,
                 n_positions=1024, vocab_size=50257, layer_norm_epsilon=1e-05, resid_pdrop=0.1),
    "gemma3-270m": dict(
        model_type="gemma3_text", _sliding_window_pattern=6, attention_bias=False, attn_logit_softcapping=None,
        final_logit_softcapping=None, head_dim=256, hidden_activation="gelu_pytorch_tanh", hidden_size=640,
        intermediate_size=2048, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
        max_position_embeddings=32768, num_attention_heads=4, num_hidden_layers=18, num_key_value_heads=1,
        query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_local_base_freq=10000.0, rope_scaling=None,
        rope_theta=1000000.0, sliding_window=512, use_bidirectional_attention=False, vocab_size=262144),
    "gpt-oss-20b": dict(
        model_type="gpt_oss", attention_bias=True, head_dim=64, hidden_act="silu", hidden_size=2880,
        intermediate_size=2880, layer_types=["sliding_attention", "full_attention"] * 12,
        max_position_embeddings=131072, num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=24,
        num_key_value_heads=8, num_local_experts=32, quantization_config={"quant_method": "mxfp4"},
        rms_norm_eps=1e-05, rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                          "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                          "truncate": False},
        rope_theta=150000, router_aux_loss_coef=0.9, sliding_window=128, swiglu_limit=7.0,
        tie_word_embeddings=False, vocab_size=201088),
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_hub_configs_match_presets(name):
    loaded, preset = hf.config_from_hf(HUB_CONFIGS[name]), GPTConfig.preset(name)
    assert replace(loaded, attn_pattern=preset.attn_pattern) == preset
    assert all(loaded.layer_kind(i) == preset.layer_kind(i) for i in range(preset.n_layer))


def test_overrides(tmp_path):
    ref_model, path = tiny_gpt2(tmp_path)
    ours = GPT.from_pretrained(path, block_size=16, dropout=0.1)  # a shorter block_size crops the position table
    assert (ours.config.block_size, ours.config.dropout, ours.transformer.wpe.weight.shape[0]) == (16, 0.1, 16)
    idx = tokens(97, T=16)
    assert max_diff(our_logits(ours, idx), hf_logits(ref_model, idx)) < TOL
    with pytest.raises(ValueError, match="unknown GPTConfig override"):
        GPT.from_pretrained(path, n_layers=3)


def test_user_errors(tmp_path):
    with pytest.raises(ValueError, match="supported: gpt2, gemma3_text, gemma3, gpt_oss"):
        hf.config_from_hf({"model_type": "llama"})
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        hf.config_from_hf({"model_type": "gpt2", "activation_function": "relu"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="mlp_bias=True cannot be saved as a Hugging Face gemma3_text"):
        hf.hf_config_from(GPTConfig.preset("gemma3-270m", mlp_bias=True))
    with pytest.raises(ValueError, match="qk_norm=True cannot be saved as a Hugging Face gpt2"):
        hf.hf_config_from(GPTConfig(qk_norm=True))
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        hf.hf_config_from(GPTConfig(pos_emb="rope"))


def test_download_failure_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nmore detail")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="could not download 'openai/gpt-oss-20b'") as err:
        GPT.from_pretrained("openai/gpt-oss-20b")
    assert "\n" not in str(err.value)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    _, path = tiny_gpt2(tmp_path)
    state = load_file(path / "model.safetensors")
    state["transformer.h.0.attn.extra"] = torch.zeros(1)
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="no place .*transformer.h.0.attn.extra"):
        GPT.from_pretrained(path)
    del state["transformer.h.0.attn.extra"], state["transformer.h.1.mlp.c_fc.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks .*transformer.h.1.mlp.c_fc.weight"):
        GPT.from_pretrained(path)


def meta_params(model_cls_or_config):
    with torch.device("meta"):
        if isinstance(model_cls_or_config, GPTConfig):
            return GPT(model_cls_or_config).num_params()
        return AutoModelForCausalLM.from_config(model_cls_or_config).num_parameters()


def hf_config(config):
    d = hf.hf_config_from(config)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.mark.parametrize("name, expected", [
    ("gpt-oss-20b", 20_914_757_184), ("gpt-oss-120b", 116_829_156_672), ("gemma3-270m", 268_098_176),
    ("gemma3-compact", 164_654_976), ("gpt2", None), ("gpt2-medium", None), ("gpt2-large", None), ("gpt2-xl", None)])
def test_preset_counts_match_transformers(name, expected):
    config = GPTConfig.preset(name)
    ours = meta_params(config)
    assert ours == meta_params(hf_config(config))
    assert expected is None or ours == expected


@pytest.mark.parametrize("name, expected", [
    ("gpt2-compact", 49_434_624), ("gpt-oss-compact", 1_442_041_488)])
def test_compact_preset_counts(name, expected):
    assert meta_params(GPTConfig.preset(name)) == expected
