"""GPT's training loss through ops.head_loss (the chunked head + cross-entropy) against the whole-logits loss, and when
it is used."""
import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig


@pytest.mark.parametrize("tied", [True, False])
def test_training_loss_equals_whole_logits_loss(tied):
    """model(x, y, return_logits=False), as train.py calls it, past the 32 MB of logits where head_loss takes over
    (8 x 32 tokens x 40,000 vocabulary): the same loss and gradients as the whole-logits path, in float32 and
    under bfloat16 autocast (to bf16 precision)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=40000, tie_embeddings=tied)
    model = GPT(cfg)
    x, y = torch.randint(40000, (8, 32)), torch.randint(40000, (8, 32))
    y[:, :5] = -1  # a chat prompt's tokens: not trained on

    def loss_and_grads(**kwargs):
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, y, **kwargs)
        loss.backward()
        return logits, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, chunked, chunked_grads = loss_and_grads(return_logits=False)
    _, whole, whole_grads = loss_and_grads()
    assert logits is None and chunked == pytest.approx(whole, rel=1e-6)
    for name, g in whole_grads.items():
        assert torch.allclose(chunked_grads[name], g, rtol=1e-4, atol=1e-7), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked_bf16 = model(x, y, return_logits=False)[1].item()
        whole_bf16 = model(x, y)[1].item()
    assert chunked_bf16 == pytest.approx(whole_bf16, rel=1e-2) and chunked_bf16 == pytest.approx(whole, rel=2e-2)


def test_when_the_chunked_head_loss_is_used():
    """Past 32 MB of float32 logits, for a plain head, and not in float16 (whose range the per-token gradients,
    softmax / tokens, would underflow before the GradScaler's scale reaches them)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=40000, tie_embeddings=False))
    assert model.chunked_head_loss(256, torch.float32) and model.chunked_head_loss(256, torch.bfloat16)
    assert not model.chunked_head_loss(200, torch.float32)  # 200 x 40,000 x 4 bytes = 32 MB: not past it
    assert not model.chunked_head_loss(256, torch.float16)
    model.add_lora(lora_rank=2, lora_targets="lm_head")
    assert not model.chunked_head_loss(256, torch.float32)  # an adapted head takes the whole-logits path


def test_peak_flops_cache_keeps_the_highest_and_mfu_stays_at_most_one(tmp_path, monkeypatch):
    """A peak measured on a busy host (low) never replaces a higher one measured before, so MFU is not inflated;
    and MFU is capped at 100% whatever the peak."""
    import devices
    monkeypatch.setattr(devices, "PEAK_CACHE", tmp_path / "peak_flops.json")
    for measured, expected in ((5e10, 5e10), (2e10, 5e10), (8e10, 8e10)):  # idle, busy, a faster idle run
        devices.peak_flops.cache_clear()
        monkeypatch.setattr(devices, "measure_matmul_flops", lambda device, dtype, m=measured: m)
        assert devices.peak_flops("cpu", torch.float32) == expected
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    assert model.estimate_mfu(tokens_per_iter=1e9, dt=1e-3) == 1.0  # far above any peak: capped
    devices.peak_flops.cache_clear()
