"""KV-cache generation (engine.py): greedy decoding token for token against transformers' generate on
tiny random GPT-2 / Gemma 3 / GPT-OSS checkpoints whose prompts outrun the sliding window (the ring buffer wraps),
cached against recomputed logits at every step, batches of ragged prompts against one-by-one runs, per-row stop
tokens, seeded sampling, stop strings through engine.TextStream, the decode layout, the sliding-window cache's
flat size, and the sampler. fp32 on CPU, one thread (tiny models on busy cores run faster without thread handoffs)."""
import copy
import random
import string
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import engine  # noqa: E402
import ops  # noqa: E402
from engine import KVCache, Sampling, TextStream, sample  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402

FAMILIES = ["gpt2", "gemma3", "gpt_oss"]
WINDOW = 8      # sliding window of the Gemma 3 / GPT-OSS checkpoints
PROMPT = 20     # > WINDOW: the ring buffer wraps during the prompt already
NEW = 64        # new tokens in the transformers comparison
VOCAB = 97      # prompts draw ids below every model's vocabulary
LOGIT_TOL = 1e-5
STD = {"gpt2": 0.3, "gemma3": 0.3, "gpt_oss": 0.1}  # weight noise: varied greedy tokens, not chaotic rounding


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model, std, seed=0, head_std=0.02):
    """Noise large enough that greedy decoding wanders over many tokens (transformers' init zeroes biases and
    sinks and sets norms to 0/1). The untied head is redrawn small: its scale leaves every argmax as it is, and
    logits below 1 keep fp32 rounding (amplified by the random layers) well under the tolerances."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
        head = model.lm_head.weight
        head.copy_(torch.randn(head.shape, generator=g) * head_std)
    return model.eval()


def hf_reference(family):
    """A tiny random transformers model: eager attention (and experts), sliding layers of WINDOW, untied head."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GptOssConfig,
                              GptOssForCausalLM)
    torch.manual_seed(0)  # transformers' own init draws from the global generator
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                           tie_word_embeddings=False, bos_token_id=None, eos_token_id=None))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=101, hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=20, sliding_window=WINDOW,
            max_position_embeddings=128, tie_word_embeddings=False, attn_implementation="eager",
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]))
    else:
        model = GptOssForCausalLM(GptOssConfig(
            vocab_size=101, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
            max_position_embeddings=128, swiglu_limit=1.0, tie_word_embeddings=False, attention_bias=True,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                 truncate=False, original_max_position_embeddings=32),
            attn_implementation="eager", experts_implementation="eager"))
    return randomise(model, STD[family])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """family -> (transformers model, our GPT loaded from its saved directory), each built once."""
    pytest.importorskip("transformers")
    built = {}

    def get(family):
        if family not in built:
            ref = hf_reference(family)
            path = tmp_path_factory.mktemp(family)
            ref.save_pretrained(path)
            built[family] = ref, GPT.from_pretrained(path).eval()
        return built[family]
    return get


def sliding_only_model(block_size=128):
    """One of ours with nothing but sliding layers (no transformers equivalent needed)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=101, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                       head_dim=8, norm="rmsnorm", pos_emb="rope", attn_pattern="S", sliding_window=WINDOW,
                       attn_sinks=True, mlp="swiglu", tie_embeddings=False)
    return randomise(GPT(config), 0.3)


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def greedy(model, prompts, n, **kw):
    """generate_stream's steps as one list of tokens per row (None where a row has stopped)."""
    steps = list(model.generate_stream(prompts, n, temperature=0, **kw))
    return [list(row) for row in zip(*steps)]


def greedy_recomputed(model, prompt, n):
    """n greedy tokens without a cache (nor the engine's decode layout): the whole sequence through forward."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(full_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def full_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0]


# ----------------------------------------------------------------------------------------------------------------
# 1. greedy decoding equals transformers' generate


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(family, zoo):
    ref_model, ours = zoo(family)
    c = ours.config
    if family != "gpt2":
        kinds = [c.layer_kind(i) for i in range(c.n_layer)]
        assert c.sliding_window == WINDOW < PROMPT and kinds.count("S") >= 2 and kinds.count("F") >= 1
    if family == "gpt_oss":
        assert c.yarn_factor == 4.0 and c.attn_sinks and c.qkv_bias and c.n_expert == 4
    idx = torch.tensor(prompts_of([PROMPT, PROMPT]))
    ref_model.generation_config.eos_token_id = None  # never stop early (Gemma's config names eos 1)
    with torch.no_grad():
        ref = ref_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    assert ref.shape == (2, PROMPT + NEW)
    ours_idx = ours.generate(idx, NEW, temperature=0)
    assert ours_idx.tolist() == ref.tolist()
    assert greedy(ours, idx.tolist(), NEW) == ref[:, PROMPT:].tolist()
    for row in ref[:, PROMPT:].tolist():
        assert len(set(row)) >= 5, f"greedy output too repetitive to test anything: {row}"


# ----------------------------------------------------------------------------------------------------------------
# 2. cached logits equal a full recomputation at every step


@pytest.mark.parametrize("family", FAMILIES + ["sliding_only"])
def test_cached_logits_match_full_recompute(family, zoo):
    ours = sliding_only_model() if family == "sliding_only" else zoo(family)[1]
    lengths = [PROMPT, 13, 5]  # left padding of 0, 7 and 15 columns; the last prompt fits inside the window
    rows = prompts_of(lengths, seed=2)
    longest = max(lengths)
    # prefill, single steps through and past the window, then chunks: longer than the window, and shorter
    chunks = [longest] + [1] * 12 + [11, 1, 3] + [1] * 6 + [WINDOW, 1]
    cache = KVCache(ours, len(rows), sum(chunks))
    g = torch.Generator().manual_seed(3)
    worst, checks = 0.0, 0
    with torch.no_grad():
        for i, n in enumerate(chunks):
            if i == 0:  # the prompts, right-aligned (left padding of 0, 7 and 15 columns)
                cached = engine.prefill(ours, cache, rows, need=sum(chunks) - longest)
            else:
                idx = torch.randint(0, VOCAB, (len(rows), n), generator=g)
                for r, new in zip(rows, idx.tolist()):
                    r.extend(new)
                cached = engine.append(ours, cache, idx)
            for b, r in enumerate(rows):
                worst = max(worst, (cached[b] - full_logits(ours, r)[-1]).abs().max().item())
                checks += 1
    assert checks == len(rows) * len(chunks)
    assert worst < LOGIT_TOL, f"cached and recomputed logits differ by {worst:.2e}"


# ----------------------------------------------------------------------------------------------------------------
# 3. a batch of ragged prompts decodes as each prompt alone; each row stops on its own


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_by_one_and_rows_stop_alone(family, zoo):
    ours = zoo(family)[1]
    n = 24
    prompts = prompts_of([PROMPT, 13, 5, 17], seed=4)
    alone = [greedy(ours, [p], n)[0] for p in prompts]
    assert greedy(ours, prompts, n) == alone
    assert all(len(set(row)) >= 4 for row in alone)

    def cuts(stops):  # how many tokens each row yields: up to and including its first stop token
        return [next((i + 1 for i, t in enumerate(row) if t in stops), n) for row in alone]

    def expected(stops):  # the stream ends once every row has stopped (or at n); stopped rows yield None
        steps = max(cuts(stops))
        return [row[:cut] + [None] * (steps - cut) for row, cut in zip(alone, cuts(stops))]
    # one stop token that the rows reach at different steps (or never): a row stops while others go on
    stop = max(alone[0], key=lambda t: len(set(cuts({t}))))
    assert len(set(cuts({stop}))) >= 2
    assert greedy(ours, prompts, n, stop_tokens=[stop, 10_000]) == expected({stop})
    # stop tokens that every row reaches by step 7: the stream ends there, before n
    stops = {row[6] for row in alone}
    assert max(cuts(stops)) <= 7 < n
    assert greedy(ours, prompts, n, stop_tokens=stops) == expected(stops)


def hf_greedy(ref_model, prompt, n):
    idx = torch.tensor([prompt])
    with torch.no_grad():
        out = ref_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def batcher_greedy(model, prompts, n, max_prefill_tokens, late):
    """Greedy tokens of each prompt through serve.py's Batcher (its continuous batching, in-process): the prompts
    not in `late` submitted at once, the `late` ones after the first has 3 tokens (they join a running batch)."""
    import asyncio
    import serve
    batcher = serve.Batcher(model, max_prefill_tokens=max_prefill_tokens)

    async def collect(req):
        tokens = []
        while (event := await asyncio.wait_for(req.queue.get(), 60)).kind == "text":
            tokens += [entry[0] for entry in event.tokens]
        assert event.kind == "done", event
        return tokens

    async def run():
        loop = asyncio.get_running_loop()
        reqs = []
        for p in prompts:
            req = reqs.append(serve.GenRequest(loop)) or reqs[-1]
            req.rows = [serve.Row(req, 0, p, n, 0.0, None, None, None, frozenset(), TextStream(lambda ids: ""),
                                  logprobs=0)]
        tasks = [None] * len(prompts)
        for i in [i for i in range(len(prompts)) if i not in late]:
            batcher.submit(reqs[i])
            tasks[i] = asyncio.ensure_future(collect(reqs[i]))
        first = min(i for i in range(len(prompts)) if i not in late)
        while reqs[first].queue.qsize() < 3 and not tasks[first].done():
            await asyncio.sleep(0.001)
        for i in late:
            batcher.submit(reqs[i])
            tasks[i] = asyncio.ensure_future(collect(reqs[i]))
        return await asyncio.gather(*tasks)
    try:
        return asyncio.run(run())
    finally:
        batcher.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_in_the_batcher_matches_transformers(family, zoo):
    """serve.py's Batcher prefills prompts longer than its budget in chunks (in a cache of their own, then moved
    into the running batch) and whole prompts up to the budget: each row's greedy tokens equal transformers'
    generate of that prompt alone. Generated cases: budgets below, at and above the sliding window, prompts
    from 1 token to several chunks, some joining a batch that is already decoding."""
    ref_model, ours = zoo(family)
    rng = random.Random(family)
    n = 12
    for case in range(3):
        budget = [3, WINDOW, 2 * WINDOW + 3][case]
        lengths = [rng.randint(1, 45) for _ in range(7)] + [budget, budget + 1, 4 * budget + 1]
        prompts = prompts_of(lengths, seed=10 + case)
        late = set(rng.sample(range(1, len(prompts)), 4))
        got = batcher_greedy(ours, prompts, n, budget, late)
        for p, tokens in zip(prompts, got):
            assert tokens == hf_greedy(ref_model, p, n), (family, budget, len(p), p in [prompts[i] for i in late])


# ----------------------------------------------------------------------------------------------------------------
# 4. sampling is reproducible from a seed


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_sample(family, zoo):
    ours = zoo(family)[1]
    prompts = prompts_of([PROMPT, 11], seed=5)

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        steps = ours.generate_stream(prompts, 32, temperature=1.0, top_k=40, top_p=0.95, generator=g)
        return [list(row) for row in zip(*steps)]
    a, b, c = sample(123), sample(123), sample(124)
    assert a == b
    assert a != c
    assert a != greedy(ours, prompts, 32)  # and it does sample


# ----------------------------------------------------------------------------------------------------------------
# 5. stop strings end the text exactly before their first occurrence


# a toy vocabulary of multi-character pieces (1 to 3 characters) over a small alphabet, so that stop strings
# start and end inside tokens and their prefixes turn up before them
_rng = random.Random(0)
PIECES = ["".join(_rng.choice("abcde ") for _ in range(1 + i % 3)) for i in range(VOCAB)]


def pieces_decode(ids):
    return "".join(PIECES[i] for i in ids)


CHARS = CharTokenizer(string.digits + string.ascii_letters + string.punctuation + " \n\t")  # 97 ids


def run_stream(model, prompt, n, decode, stop):
    """(text, why it ended: "stop" or "length", tokens generated) for one prompt streamed through TextStream;
    generation ends at the token that completes a stop string."""
    used, stream, pieces = [], TextStream(decode, stop), []
    for step in model.generate_stream([prompt], n, temperature=0):
        used.append(step[0])
        text, hit = stream.push(step[0])
        pieces.append(text)
        if hit:
            return "".join(pieces), "stop", used
    return "".join(pieces) + stream.flush(), "length", used


def stop_cases(tokens, decode):
    """Stop strings first found past the text's first third: one whose first occurrence spans a token boundary
    (within a token or between two) and one whose prefix occurs earlier (held back, then let go); where the text
    has them, a long one over several tokens, one character, and one inside a single token after text of that
    token."""
    text = decode(tokens)
    ends = [len(decode(tokens[:i])) for i in range(len(tokens) + 1)]
    spans = list(zip(ends, ends[1:]))

    def first_late(length, ok=lambda start, stop: True):
        for start in range(len(text) // 3, len(text) - length + 1):
            stop = text[start:start + length]
            if text.find(stop) == start and "\ufffd" not in stop and ok(start, stop):
                return stop
    cases = [first_late(3, lambda start, stop: any(start < end < start + 3 for end in ends)),
             first_late(3, lambda start, stop: text.find(stop[:-1]) < start)]
    assert all(cases), text
    optional = [first_late(7), first_late(1),
                first_late(2, lambda start, stop: any(a < start and start + 2 <= b for a, b in spans)),
                first_late(1, lambda start, stop: any(a < start < b for a, b in spans))]
    return cases + [c for c in optional if c]


# a byte-level vocabulary: ASCII pieces, and pieces that end in a UTF-8 lead byte or begin with a continuation
# byte, so that some characters are split across tokens (U+FFFD until complete) and some bytes never complete one
BYTES = [bytes([0xa0 + i % 16, 97 + i % 26]) if i % 4 == 1 else bytes([97 + i % 26]) + b"\xc3" * (i % 4 == 0)
         for i in range(VOCAB)]


def bytes_decode(ids):
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


DECODERS = {"char": CHARS.decode, "pieces": pieces_decode, "bytes": bytes_decode}


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_stop_strings_end_text_exactly(decoder, zoo):
    ours = zoo("gpt2")[1]
    decode = DECODERS[decoder]
    prompt, n = prompts_of([PROMPT], seed=7)[0], 48
    tokens = greedy(ours, [prompt], n)[0]
    full = decode(tokens)
    assert len(set(tokens)) >= 8
    assert run_stream(ours, prompt, n, decode, ["\x00never"]) == (full, "length", tokens)
    assert run_stream(ours, prompt, n, decode, []) == (full, "length", tokens)
    for stop in stop_cases(tokens, decode):
        cut = full.find(stop)
        assert cut > 0
        text, reason, used = run_stream(ours, prompt, n, decode, ["\x00never", stop])
        assert (text, reason) == (full[:cut], "stop"), stop
        # generation ended on the token that completed the stop string, not later
        assert used == tokens[:len(used)] and stop in decode(used) and stop not in decode(used[:-1])


# ----------------------------------------------------------------------------------------------------------------
# 6. the decode layout changes strides, not results


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_layout_keeps_logits_and_tokens(family, zoo):
    ours = copy.deepcopy(zoo(family)[1])
    for p in ours.parameters():  # the default layout (generation on the CPU switches the zoo's models)
        p.data = p.data.contiguous()
    fast = ops.decode_layout(copy.deepcopy(ours))
    head = fast.lm_head.weight
    assert head.shape == ours.lm_head.weight.shape and head.stride() == (1, head.shape[0])
    idx = torch.tensor(prompts_of([PROMPT, PROMPT], seed=7))
    with torch.no_grad():
        assert (fast(idx)[0] - ours(idx)[0]).abs().max().item() < 1e-6
        caches = [KVCache(m, 2, PROMPT + 2) for m in (ours, fast)]
        a, b = (engine.prefill(m, c, idx.tolist(), need=2) for m, c in zip((ours, fast), caches))
        assert (a - b).abs().max().item() < 1e-6
        for step in (idx[:, :1], idx[:, 1:2]):
            a, b = (engine.append(m, c, step) for m, c in zip((ours, fast), caches))
            assert (a - b).abs().max().item() < 1e-6
    prompts = prompts_of([PROMPT, 9], seed=7)
    assert greedy(fast, prompts, 32) == [greedy_recomputed(ours, p, 32) for p in prompts]


# ----------------------------------------------------------------------------------------------------------------
# 7. sliding layers keep `window` columns however long the run


def test_sliding_cache_stays_window_sized(monkeypatch):
    torch.manual_seed(0)
    base = dict(vocab_size=64, block_size=4096, n_layer=4, n_head=2, n_embd=16, pos_emb="rope",
                sliding_window=WINDOW)
    for pattern in ("S", "SF"):
        net = GPT(GPTConfig(**base, attn_pattern=pattern))
        for max_len, batch in ((4000, 2), (WINDOW // 2, 1)):
            cache = KVCache(net, batch, max_len)
            for i, (k, v) in enumerate(zip(cache.k, cache.v)):
                cols = min(WINDOW, max_len) if net.config.layer_kind(i) == "S" else max_len
                assert k.shape == v.shape == (batch, 2, cols, 8)
    # during a run far longer than the window the ring buffers are written in place, never grown
    net = sliding_only_model(block_size=4096)
    made = []

    class Recording(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.ptrs = [k.data_ptr() for k in self.k]
            made.append(self)
    monkeypatch.setattr(engine, "KVCache", Recording)
    steps = list(net.generate_stream(prompts_of([PROMPT]), 100, temperature=0))
    assert len(steps) == 100 and len(made) == 1
    cache = made[0]
    assert cache.col == PROMPT + 99
    assert all(k.shape[2] == v.shape[2] == WINDOW for k, v in zip(cache.k, cache.v))
    assert [k.data_ptr() for k in cache.k] == cache.ptrs
    c = net.config  # one row: keys and values of every layer, WINDOW columns each
    assert sum(k.numel() + v.numel() for k, v in zip(cache.k, cache.v)) == 2 * c.n_layer * c.kv_heads * WINDOW * c.hd


# ----------------------------------------------------------------------------------------------------------------
# 8. the sampler


def draws(logits, temperature, top_k=None, top_p=None, seed=0, n=200):
    """n tokens per row of logits from engine.sample, each step with fresh uniforms: (B, n)."""
    g = torch.Generator().manual_seed(seed)
    rows = [Sampling(temperature, top_k, top_p)] * logits.size(0)
    return torch.tensor([sample(logits, rows, engine.uniforms(logits.size(0), g)) for _ in range(n)]).T


def test_sampler_greedy_limits():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    argmax = logits.argmax(-1, keepdim=True)
    assert torch.equal(draws(logits, 0, n=1), argmax)
    assert torch.equal(draws(logits, 0, top_k=5, top_p=0.5, n=1), argmax)  # temperature 0 ignores the filters
    for seed in range(20):
        assert torch.equal(draws(logits, 1.0, top_k=1, seed=seed, n=1), argmax)
        assert torch.equal(draws(logits, 1.0, top_p=1e-6, seed=seed, n=1), argmax)
        assert torch.equal(draws(logits, 5.0, top_k=1, top_p=0.9, seed=seed, n=1), argmax)


def test_sampler_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    top_k_draws = draws(logits, 1.0, top_k=5)
    top5 = logits.topk(5).indices
    assert all(set(top_k_draws[b].tolist()) <= set(top5[b].tolist()) for b in range(4))
    assert all(len(set(top_k_draws[b].tolist())) > 1 for b in range(4))
    # top_p keeps the smallest prefix of the sorted distribution whose mass reaches top_p
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < 0.6
    top_p_draws = draws(logits, 1.0, top_p=0.6, seed=1)
    for b in range(4):
        nucleus = set(order[b][keep[b]].tolist())
        assert set(top_p_draws[b].tolist()) <= nucleus
    assert draws(logits, 0.7, n=1).shape == (4, 1)


def test_sampler_is_inverse_cdf_of_the_filtered_distribution():
    """engine.sample against a float64 numpy reference of the documented rule: softmax(logits / T), top-k,
    then the nucleus (drop tokens whose preceding mass exceeds top_p), the token where the CDF passes u * total,
    u the row's own uniform; temperature 0 is argmax."""
    import numpy as np
    settings = [(0.8, None, None), (1.3, 5, None), (0.7, None, 0.6), (1.0, 20, 0.9), (0.0, None, None)]
    rows = [Sampling(t, k, p) for t, k, p in settings]
    for trial in range(20):
        logits = torch.randn(len(rows), 300, generator=torch.Generator().manual_seed(trial)) * 3
        expected = []
        for i, (t, k, p) in enumerate(settings):
            z = logits[i].double().numpy()
            u = random.Random(f"{i}-{trial}").random()
            if t == 0:
                expected.append(int(z.argmax()))
                continue
            order = np.argsort(-z, kind="stable")
            probs = np.exp((z[order] - z.max()) / t)
            if k:
                probs[k:] = 0.0
            probs /= probs.sum()
            if p is not None:
                probs[np.cumsum(probs) - probs > p] = 0.0
            cdf = np.cumsum(probs)
            expected.append(int(order[np.searchsorted(cdf, u * cdf[-1], side="right")]))
        u = torch.tensor([random.Random(f"{i}-{trial}").random() for i in range(len(rows))])
        assert sample(logits, rows, u) == expected


def test_logprobs_are_the_models_log_softmax():
    """engine.logprobs against a float64 log-softmax: the chosen tokens' and the top-n alternatives', whatever the
    sampling settings were (they are the model's distribution, as vLLM reports them)."""
    g = torch.Generator().manual_seed(2)
    for trial in range(10):
        logits = torch.randn(3, 40, generator=g) * (trial + 1)
        tokens = torch.randint(0, 40, (3,), generator=g).tolist()
        chosen, (top_values, top_ids) = engine.logprobs(logits, tokens, top_n=5)
        reference = torch.log_softmax(logits.double(), dim=-1)
        assert torch.allclose(chosen.double(), reference[torch.arange(3), tokens], atol=1e-5)
        ref_values, ref_ids = reference.topk(5, dim=-1)
        assert torch.allclose(top_values.double(), ref_values, atol=1e-5) and torch.equal(top_ids, ref_ids)
    chosen, (none_values, none_ids) = engine.logprobs(logits, tokens)
    assert none_values is None and none_ids is None and chosen.shape == (3,)


# ----------------------------------------------------------------------------------------------------------------
# 9. compile_decode: a static cache, so the one-token step is traced once


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decode_step_is_traced_once(family, zoo):
    """The static cache that compile_decode switches on (every preallocated column attended and masked, a tensor
    column counter) gives the same tokens as the growing cache, and one graph serves every step of generations
    of different lengths. backend="eager": dynamo's tracing and guards without inductor's (slow) code generation.
    Mixture-of-experts models are not compiled; their static cache is checked by running the step eagerly."""
    from torch._dynamo.utils import counters
    ours = zoo(family)[1]
    fast = copy.deepcopy(ours)
    torch._dynamo.reset()
    counters.clear()
    compiled = engine.compile_decode(fast, backend="eager")
    assert compiled == (family != "gpt_oss")
    if not compiled:
        fast.compiled_decode = engine.forward  # what engine.append calls for a decode step on a static cache
    for lengths, n in (([PROMPT, 9], 24), ([5, PROMPT + 3], 30)):  # the ring wraps; the full columns differ
        prompts = prompts_of(lengths, seed=3)
        assert greedy(fast, prompts, n) == greedy(ours, prompts, n)
    assert counters["stats"]["unique_graphs"] == (1 if compiled else 0)


# ----------------------------------------------------------------------------------------------------------------
# 10. scoring: continuations' log-probabilities, requests sharing a context packed into one row


@pytest.mark.parametrize("family", FAMILIES + ["sliding_only"])
def test_score_equals_full_forward_log_softmax(family, zoo):
    """engine.score against each (context + continuation) run alone through forward: every continuation token's
    log-probability, its greedy flag (half the continuations are the model's own greedy tokens, so flags of both
    kinds are checked) and the top-3, for contexts shared by up to four continuations, past the sliding window,
    batched several rows a forward."""
    ours = sliding_only_model() if family == "sliding_only" else zoo(family)[1]
    rng = random.Random(family)
    requests = []
    for context in prompts_of([1, 5, PROMPT, 13, 30], seed=9):
        for k in range(rng.randint(1, 4)):
            n = rng.randint(1, 12)
            continuation = (greedy_recomputed(ours, context, n) if k % 2 else
                            [rng.randrange(VOCAB) for _ in range(n)])
            requests.append((context, continuation))
    scored = engine.score(ours, requests, top_n=3, batch_rows=3, batch_tokens=200)
    flags = set()
    for (context, continuation), s in zip(requests, scored):
        logp = torch.log_softmax(full_logits(ours, context + continuation[:-1]).float(), -1)[len(context) - 1:]
        target = torch.tensor(continuation)
        assert (torch.tensor(s.logprobs) - logp.gather(1, target.unsqueeze(1))[:, 0]).abs().max() < LOGIT_TOL
        assert s.greedy == (logp.argmax(-1) == target).tolist()
        top = logp.topk(3, dim=-1)
        assert [[i for i, _ in row] for row in s.top] == top.indices.tolist()
        flags.add(all(s.greedy))
    assert flags == {True, False}
