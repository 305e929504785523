"""serve.py, driven as a real server (a subprocess on a free loopback port) with the official openai client.

Expected texts come from the model's own single-prompt generator (GPT.generate_stream) on the same weights,
so every greedy answer the server gives, alone or batched with 15 others, must match it token for token.

Throughput is a benchmark, not a test:  python tests/test_serve.py bench [--clients=8] [--max_tokens=64]
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")  # offline tiktoken, here and in subprocesses
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import openai  # noqa: E402
import tiktoken  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
from conftest import run_script  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

KEY = "test-key"
ENC = tiktoken.get_encoding("gpt2")
PROMPTS = ["Hello", "The meaning of life is", "Once upon a time, in a land far away,", "x", "1 2 3 4",
           "To be or not to be, that is the question", "ROMEO:", "def f(x):\n    return"]


# ----------------------------------------------------------------------------------------------------------------
# a tiny checkpoint, and servers as subprocesses


def make_checkpoint(path, n_layer=2, n_embd=32, n_head=2, block_size=512, seed=0, layout="hf"):
    """A randomly initialised GPT-2-family model with the GPT-2 vocabulary: a Hugging Face directory
    (layout="hf") or a nanoforge out_dir (layout="out_dir", through checkpoint.save). Its untied head gets
    std 0.5, so the logits spread widely: greedy text is varied (not one token repeated) and has clear
    margins, so batched and single-row forwards (equal up to float rounding) pick the same tokens."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=50257, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)
    if layout == "hf":
        model.save_pretrained(path)
    else:
        import checkpoint
        from tokenizer import load_tokenizer, make_meta
        checkpoint.save(path, model, {"iter_num": 0}, make_meta(load_tokenizer({"tokenizer": "gpt2"})))
    return path


def make_gemma_checkpoint(path, seed=0):
    """A tiny Gemma 3 (sliding-window and full layers, RoPE, multi-query attention) in Hugging Face layout, with
    a meta.json beside it naming the GPT-2 tokenizer (Gemma's own SentencePiece one is not tiktoken)."""
    from tokenizer import load_tokenizer, make_meta
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset("gemma3-compact", n_layer=2, n_head=2, n_kv_head=1, n_embd=32, head_dim=16,
                                 mlp_hidden=64, sliding_window=4, attn_scale_dim=16, block_size=512))
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)
    model.save_pretrained(path)
    (Path(path) / "meta.json").write_text(json.dumps(make_meta(load_tokenizer({"tokenizer": "gpt2"}))))
    return path


def greedy_reference(path, model=None):
    """Greedy continuations from the model's own single-prompt generator, ending at <|endoftext|> (of the model
    in path, or of `model`)."""
    model = model or GPT.from_pretrained(str(path)).eval()

    def greedy(ids, n):
        out = []
        for step in model.generate_stream([ids], n, temperature=0, stop_tokens=[ENC.eot_token]):
            if step[0] is None or step[0] == ENC.eot_token:
                break
            out.append(step[0])
        return out

    return greedy


class Server:
    """`python serve.py ARGS --port=0` in the background; its URL from the line it prints when listening."""

    def __init__(self, *args, port=0, cwd=None):
        self.args = args
        self.proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), f"--port={port}", *args], cwd=cwd or REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output, self.url = [], None
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            if "listening on http://" in line and self.url is None:
                self.url = line.split("listening on ")[1].strip().removesuffix("/v1")
                self.listening.set()
        self.listening.set()  # exited

    def wait_ready(self, timeout=60):
        assert self.listening.wait(timeout), f"server did not start: {''.join(self.output)}"
        assert self.url, f"server exited: {''.join(self.output)}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not healthy: {''.join(self.output)}")

    def client(self, api_key=KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def health(self):
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def settled(server, timeout=30):
    """Wait until the server has written every trace record it has accepted (a thread writes them just after the
    responses), so that a count of the trace's lines taken now is not overtaken by earlier requests' lines."""
    deadline = time.time() + timeout
    while server.health()["traces"]["pending"] and time.time() < deadline:
        time.sleep(0.02)


def read_trace(path, at_least=0, timeout=10):
    """The trace's records, once it holds at least `at_least` (a background thread writes them, just after the
    response is sent)."""
    deadline = time.time() + timeout
    while True:
        lines = Path(path).read_text().splitlines() if Path(path).exists() else []
        if len(lines) >= at_least or time.time() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The same tiny model twice: a nanoforge out_dir (served by `main`) and a Hugging Face directory."""
    root = tmp_path_factory.mktemp("tiny")
    make_checkpoint(root / "out-tiny", layout="out_dir")
    return make_checkpoint(root / "hf-tiny", layout="hf")


@pytest.fixture(scope="module")
def reference(ckpt):
    return greedy_reference(ckpt)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_gemma_checkpoint(tmp_path_factory.mktemp("gemma") / "gemma")


@pytest.fixture(scope="module")
def servers(ckpt, gemma, tmp_path_factory):
    """Three servers started together: `main` (with an API key), `remote` (the upstream) and `front` (forwards
    to remote, falls back to its own model; also serves a Gemma 3)."""
    tmp = tmp_path_factory.mktemp("serve")
    s = {"trace": tmp / "main.jsonl", "front_trace": tmp / "front.jsonl"}
    with socket.socket() as probe:  # a free port for the upstream, so all three can start at once
        probe.bind(("127.0.0.1", 0))
        remote_port = probe.getsockname()[1]
    try:
        s["remote"] = Server(f"--init_from={ckpt}", "--model_name=remote", f"--trace_file={tmp / 'remote.jsonl'}",
                             port=remote_port)
        s["main"] = Server(f"--init_from={ckpt.parent / 'out-tiny'}", "--model_name=tiny", f"--api_key={KEY}",
                           f"--trace_file={s['trace']}")
        s["front"] = Server(f"--model=front={ckpt}", f"--model=gemma={gemma}",
                            f"--upstream=http://127.0.0.1:{remote_port}/v1", "--fallback=front",
                            f"--trace_file={s['front_trace']}")
        for name in ("remote", "main", "front"):
            s[name].wait_ready()
        yield s
    finally:
        for name in ("main", "remote", "front"):
            if name in s:
                s[name].stop()


@pytest.fixture(scope="module")
def client(servers):
    return servers["main"].client()


def chat_ids(messages, chat_format="plain"):
    from tokenizer import load_tokenizer, render_prompt
    return render_prompt(load_tokenizer({"tokenizer": "gpt2"}), messages, chat_format)


# ----------------------------------------------------------------------------------------------------------------
# completions and chat


def test_models_and_health(servers, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = servers["main"].health()
    assert health["status"] == "ok" and "tiny" in health["models"]


def test_completion_matches_the_models_own_generator(client, reference):
    for prompt in PROMPTS[:3]:
        ids = ENC.encode(prompt)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        expected = reference(ids, 12)
        assert r.choices[0].text == ENC.decode(expected)
        assert r.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
        assert r.model == "tiny" and r.object == "text_completion"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
        assert r.usage.total_tokens == len(ids) + 12


def test_completion_token_prompt_batch_and_n(client, reference):
    ids = ENC.encode(PROMPTS[1])
    r = client.completions.create(model="tiny", prompt=[ids, PROMPTS[2]], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    texts = {c.index: c.text for c in r.choices}
    assert texts[0] == texts[1] == ENC.decode(reference(ids, 5))
    assert texts[2] == texts[3] == ENC.decode(reference(ENC.encode(PROMPTS[2]), 5))
    assert r.usage.prompt_tokens == len(ids) + len(ENC.encode(PROMPTS[2]))
    assert r.usage.completion_tokens == 20


def test_sampling_seed_is_reproducible(client):
    kw = dict(model="tiny", prompt="Seeds:", max_tokens=10, temperature=1.0, top_p=0.9, n=2)
    a = client.completions.create(seed=1234, **kw)
    b = client.completions.create(seed=1234, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    c = client.completions.create(seed=99, **kw)
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_same_seed_same_tokens_in_serve_sample_and_generate(client, ckpt):
    """One sampler: a seeded request to serve.py, sample.py with that --seed and GPT.generate with a generator of that
    seed draw the same tokens (the same uniforms through engine.sample), for several settings."""
    out_dir = ckpt.parent / "out-tiny"
    model, _ = checkpoint.load_model(out_dir)
    for seed, temperature, top_k, top_p in ((7, 0.8, 200, 1.0), (1234, 1.3, 0, 0.9), (2**40 + 5, 1.0, 20, 0.95)):
        prompt = f"Seed {seed} says"
        ids = ENC.encode(prompt)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=temperature,
                                      top_p=top_p, seed=seed, extra_body={"top_k": top_k})
        result = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--num_samples=1",
                            f"--start={prompt}", "--max_new_tokens=16", f"--temperature={temperature}",
                            f"--top_k={top_k}", f"--top_p={top_p}", f"--seed={seed}")
        assert result.returncode == 0, result.stderr
        sampled = result.stdout.split("\n[")[0].removeprefix(prompt)
        generated = model.generate(torch.tensor([ids]), 16, temperature=temperature, top_k=top_k or None,
                                   top_p=top_p, generator=torch.Generator().manual_seed(seed))[0, len(ids):]
        assert r.choices[0].text == sampled == ENC.decode(generated.tolist()), (seed, temperature, top_k, top_p)
        assert sampled != ENC.decode(model.generate(torch.tensor([ids]), 16, temperature=0)[0, len(ids):].tolist())


def test_chat(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    ids = chat_ids(messages)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ENC.decode(reference(ids, 8))
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"
    # content as a list of text parts, and max_completion_tokens
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    r2 = client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens == 3
    assert r2.usage.prompt_tokens == len(chat_ids([{"role": "user", "content": "Hi there"}]))


def test_gemma_family_uses_its_chat_format(servers, gemma):
    """Sliding-window layers, RoPE and multi-query attention through the batcher, with Gemma's chat format."""
    greedy = greedy_reference(gemma)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = chat_ids(messages, "gemma")
    assert servers["front"].health()["models"]["gemma"]["chat_format"] == "gemma"
    client = servers["front"].client()
    r = client.chat.completions.create(model="gemma", messages=messages, max_tokens=20, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == ENC.decode(greedy(ids, 20)).split("<end_of_turn>")[0]
    prompts = ["Hello", "A longer prompt than the sliding window of four tokens"]
    r = client.completions.create(model="gemma", prompt=prompts, max_tokens=12, temperature=0)
    for c in r.choices:
        assert c.text == ENC.decode(greedy(ENC.encode(prompts[c.index]), 12))


def test_streaming(client, reference):
    ids = ENC.encode(PROMPTS[2])
    expected = ENC.decode(reference(ids, 10))
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "Stream, please"}]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ENC.decode(reference(chat_ids(messages), 6))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_stream_wire_format_ends_with_done(servers):
    with httpx.stream("POST", f"{servers['main'].url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def _stop_case(reference):
    """A prompt, its greedy text, and a stop string whose first occurrence is mid-text (not at the start)."""
    for prompt in PROMPTS:
        text = ENC.decode(reference(ENC.encode(prompt), 24))
        if "\ufffd" in text:
            continue
        for k in range(len(text) // 3, len(text) - 3):
            for n in (2, 3, 4):
                stop = text[k:k + n]
                if text.find(stop) == k and stop.strip():
                    return prompt, text, stop, text[:k]
    pytest.skip("no greedy text with a usable stop string")


def test_stop_strings_end_the_text_exactly(client, reference):
    prompt, text, stop, expected = _stop_case(reference)
    for stops in (stop, ["never-appears", stop]):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stops)
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------------------------------------------
# log-probabilities (completions' logprobs and echo, chat's logprobs and top_logprobs) and the tokenizer endpoints


@pytest.fixture(scope="module")
def log_softmax(ckpt):
    """The model's own log-probabilities, from its plain forward: ids -> (len(ids), vocab), row i the distribution
    of the token after ids[:i + 1]."""
    model = GPT.from_pretrained(str(ckpt)).eval()

    def run(ids):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)

    return run


def _offsets(tokens):
    return [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_echo_with_max_tokens_0_scores_the_prompt(client, log_softmax):
    """The scoring idiom of OpenAI and vLLM: the prompt's tokens, each with its log-probability under the model and
    its 5 likeliest alternatives (the first token has none), and no completion."""
    prompt = PROMPTS[5]
    ids = ENC.encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, logprobs=5, echo=True, max_tokens=0)
    choice, expected = r.choices[0], log_softmax(ids)
    lp = choice.logprobs
    assert choice.text == prompt and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert lp.tokens == [ENC.decode([t]) for t in ids] and "".join(lp.tokens) == prompt
    assert lp.text_offset == _offsets(lp.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        values, top = expected[i - 1].topk(5)
        alternatives = {ENC.decode([t]): v for t, v in zip(top.tolist(), values.tolist())}
        # the 5 likeliest, and the prompt's own token (vLLM's shape)
        assert set(lp.top_logprobs[i]) == set(alternatives) | {lp.tokens[i]}
        for token, value in alternatives.items():
            assert lp.top_logprobs[i][token] == pytest.approx(value, abs=1e-4)


def test_echo_scores_on_a_sliding_window_model(servers, gemma):
    """Gemma 3 (sliding-window layers of 4 tokens, RoPE): a prompt longer than the window, scored as its own forward
    scores it."""
    prompt = "A longer prompt than the sliding window of four tokens, scored token by token"
    ids = ENC.encode(prompt)
    model = GPT.from_pretrained(str(gemma)).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)
    r = servers["front"].client().completions.create(model="gemma", prompt=prompt, logprobs=1, echo=True,
                                                     max_tokens=0)
    got = r.choices[0].logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids)
    assert got[1:] == pytest.approx([expected[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)


def test_echo_of_token_prompts_with_one_generated_token(client, log_softmax, reference):
    """lm-eval's loglikelihood request: a batch of token-id prompts, echo, logprobs 1, one greedy token; the prompt's
    entries, then the generated token's, which is the model's top-1."""
    prompts = [ENC.encode(PROMPTS[1]), ENC.encode(PROMPTS[2]), ENC.encode("x")]
    r = client.completions.create(model="tiny", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0,
                                  seed=1234)
    for choice in r.choices:
        ids = prompts[choice.index]
        lp, expected = choice.logprobs, log_softmax(ids)
        generated = reference(ids, 1)[0]
        assert choice.text == ENC.decode(ids + [generated])
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.tokens[-1] == ENC.decode([generated])
        for i in range(1, len(ids) + 1):
            token = (ids + [generated])[i]
            assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, token].item(), abs=1e-4)
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: its own top-1, exactly
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], echo=True, max_tokens=3, temperature=0)
    assert plain.choices[0].text == PROMPTS[0] + ENC.decode(reference(ENC.encode(PROMPTS[0]), 3))
    assert plain.choices[0].logprobs is None


def test_logprobs_of_generated_tokens(client, log_softmax, reference):
    """Each generated token's log-probability under the model's own distribution: greedy ones are the top-1; sampled
    ones (temperature, top-k) are still reported before temperature and top-k, as vLLM does."""
    ids = ENC.encode(PROMPTS[2])
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=3)
    generated = reference(ids, 8)
    lp, expected = r.choices[0].logprobs, log_softmax(ids + generated)
    assert lp.tokens == [ENC.decode([t]) for t in generated] and lp.text_offset == _offsets(lp.tokens)
    for i, token in enumerate(generated):
        assert lp.token_logprobs[i] == pytest.approx(expected[len(ids) + i - 1, token].item(), abs=1e-4)
        assert lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) and len(lp.top_logprobs[i]) == 3
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4, temperature=0, logprobs=0)
    assert r.choices[0].logprobs.top_logprobs == [{t: v} for t, v in zip(r.choices[0].logprobs.tokens,
                                                                         r.choices[0].logprobs.token_logprobs)]
    # sampled (temperature 1.5, top-k 5): chat's bytes name each token exactly
    messages = [{"role": "user", "content": "Sample"}]
    ids = chat_ids(messages)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1.5, seed=5,
                                       logprobs=True, extra_body={"top_k": 5})
    content = r.choices[0].logprobs.content
    sampled = [ENC.encode_single_token(bytes(c.bytes)) for c in content]
    expected = log_softmax(ids + sampled)
    for i, (c, token) in enumerate(zip(content, sampled)):
        assert c.logprob == pytest.approx(expected[len(ids) + i - 1, token].item(), abs=1e-4)


def test_chat_logprobs(client, log_softmax, reference):
    messages = [{"role": "user", "content": "Hi there"}]
    ids = chat_ids(messages)
    generated = reference(ids, 6)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content, expected = r.choices[0].logprobs.content, log_softmax(ids + generated)
    assert [c.token for c in content][:len(generated)] == [ENC.decode([t]) for t in generated]
    for i, (c, token) in enumerate(zip(content, generated)):
        assert c.logprob == pytest.approx(expected[len(ids) + i - 1, token].item(), abs=1e-4)
        assert c.bytes == list(ENC.decode_single_token_bytes(token))
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == c.logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
        assert bytes(c.top_logprobs[1].bytes).decode("utf-8", "replace") == c.top_logprobs[1].token
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0, logprobs=True)
    assert [c.top_logprobs for c in r.choices[0].logprobs.content] == [[], []]
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].logprobs is None


def test_streamed_logprobs_match_the_whole_response(client):
    kw = dict(model="tiny", prompt=PROMPTS[6], max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].text == PROMPTS[6] and "".join(c.text for c in chunks) == whole.text
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((getattr(c.logprobs, key) for c in chunks if c.logprobs), []) == getattr(whole.logprobs, key)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Stream"}], max_tokens=5, temperature=0,
              logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert sum((c.logprobs.content for c in chunks if c.logprobs), []) == whole


def test_concurrent_scoring_and_generation_match_their_solo_answers(servers):
    """Echo scoring (max_tokens 0 and 1), generation with logprobs and plain generation from 12 clients at once:
    admitted mid-decode, batched together, each answer as it is alone."""
    client = servers["main"].client()
    jobs = [dict(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=(0, 1, 6, 9)[i % 4], echo=i % 4 < 2,
                 logprobs=(3, 1, 2, None)[i % 4], temperature=0) for i in range(12)]
    alone = [client.completions.create(model="tiny", **job).choices[0] for job in jobs]
    results, errors = [None] * len(jobs), []

    def run(i):
        try:
            results[i] = client.completions.create(model="tiny", **jobs[i]).choices[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for got, solo in zip(results, alone):
        assert got.text == solo.text and got.finish_reason == solo.finish_reason
        if solo.logprobs is None:
            assert got.logprobs is None
            continue
        assert got.logprobs.tokens == solo.logprobs.tokens
        assert [x is None for x in got.logprobs.token_logprobs] == [x is None for x in solo.logprobs.token_logprobs]
        assert [x for x in got.logprobs.token_logprobs if x is not None] == pytest.approx(
            [x for x in solo.logprobs.token_logprobs if x is not None], abs=1e-4)


UNSUPPORTED = {"logit_bias": {"50256": -100}, "presence_penalty": 0.5, "frequency_penalty": 1.0, "best_of": 3,
               "suffix": " end", "tools": [{"type": "function", "function": {"name": "f"}}],
               "tool_choice": "required", "functions": [{"name": "f"}], "function_call": {"name": "f"},
               "response_format": {"type": "json_object"}, "store": True, "service_tier": "flex",
               "repetition_penalty": 1.2, "max_completion_tokens": 4, "nonsense": 1}
ASKING_FOR_NOTHING = {"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "suffix": None,
                      "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
                      "user": "someone", "metadata": {"run": "1"}, "parallel_tool_calls": True}


def test_unsupported_parameters_are_refused_by_name(servers, client):
    url, auth = servers["main"].url, {"Authorization": f"Bearer {KEY}"}
    post = lambda path, **body: httpx.post(f"{url}/v1/{path}", headers=auth, json=body, timeout=30)  # noqa: E731
    for key, value in UNSUPPORTED.items():
        error = _error(post("completions", model="tiny", prompt="x", max_tokens=1, **{key: value}), 400, param=key,
                       code="unsupported_parameter")
        assert f"unsupported parameter '{key}'" in error["message"]
    chat = dict(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    for key, value in {"echo": True, "logprobs": 3, **UNSUPPORTED}.items():
        if key != "max_completion_tokens":
            _error(post("chat/completions", **chat, **{key: value}), 400, param=key)
    assert post("completions", model="tiny", prompt="x", max_tokens=1, **ASKING_FOR_NOTHING).status_code == 200
    assert post("chat/completions", **chat, **ASKING_FOR_NOTHING).status_code == 200
    assert post("completions", model="tiny", prompt="x", max_tokens=1, n=2, best_of=2).status_code == 200
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", logit_bias={"50256": -100})
    assert e.value.body["param"] == "logit_bias" and "unsupported parameter 'logit_bias'" in e.value.body["message"]


def test_logprob_parameters_are_type_checked(servers):
    url, auth = servers["main"].url, {"Authorization": f"Bearer {KEY}"}
    post = lambda path, **body: httpx.post(f"{url}/v1/{path}", headers=auth, json=body, timeout=30)  # noqa: E731
    for bad in ("yes", 21, -1, True, 1.5):
        _error(post("completions", model="tiny", prompt="x", logprobs=bad), 400, param="logprobs")
    _error(post("completions", model="tiny", prompt="x", echo="yes"), 400, param="echo")
    _error(post("completions", model="tiny", prompt="x", max_tokens=0), 400, param="max_tokens")  # 0: echo only
    chat = dict(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    _error(post("chat/completions", **chat, logprobs="yes"), 400, param="logprobs")
    _error(post("chat/completions", **chat, top_logprobs=2), 400, param="top_logprobs")  # without logprobs: true
    _error(post("chat/completions", **chat, logprobs=False, top_logprobs=2), 400, param="top_logprobs")
    _error(post("chat/completions", **chat, logprobs=True, top_logprobs=21), 400, param="top_logprobs")
    _error(post("chat/completions", **{**chat, "max_tokens": 0}), 400, param="max_tokens")
    ok = post("completions", model="tiny", prompt="x", logprobs=None, echo=None, max_tokens=1)
    assert ok.status_code == 200 and ok.json()["choices"][0]["logprobs"] is None


def test_model_by_id(servers, client):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    _error(httpx.get(f"{servers['main'].url}/v1/models/tiny", timeout=30), 401)
    assert servers["front"].client().models.retrieve("remote").id == "remote"  # an upstream model
    _error(httpx.get(f"{servers['front'].url}/v1/models/org/no-such-model", timeout=30), 404, code="model_not_found")


def test_tokenize_and_detokenize(servers):
    url, auth = servers["main"].url, {"Authorization": f"Bearer {KEY}"}
    post = lambda path, **body: httpx.post(f"{url}/{path}", headers=auth, json=body, timeout=30)  # noqa: E731
    text = "Héllo wörld 🙂\n<|endoftext|>naïve"
    r = post("tokenize", prompt=text, add_special_tokens=False).json()
    assert r == {"count": len(ENC.encode(text, allowed_special="all")), "max_model_len": 512,
                 "tokens": ENC.encode(text, allowed_special="all")}
    assert post("detokenize", tokens=r["tokens"]).json() == {"prompt": text}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert post("tokenize", model="tiny", messages=messages).json()["tokens"] == chat_ids(messages)
    info = httpx.get(f"{url}/tokenizer_info", headers=auth, timeout=30).json()
    assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] is None and info["model_max_length"] == 512
    _error(post("tokenize", prompt=3), 400, param="prompt")
    _error(post("tokenize", prompt="x", messages=messages), 400)
    _error(post("tokenize", prompt="x", truncate=True), 400, param="truncate", code="unsupported_parameter")
    _error(post("detokenize", tokens=[10**9]), 400, param="tokens")
    _error(post("tokenize", model="nope", prompt="x"), 404, code="model_not_found")
    _error(httpx.post(f"{url}/tokenize", json={"prompt": "x"}, timeout=30), 401)


# ----------------------------------------------------------------------------------------------------------------
# bad input and auth


def _error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_bad_input_gets_openai_style_errors(servers, client):
    url, auth = servers["main"].url, {"Authorization": f"Bearer {KEY}"}
    post = lambda path, **kw: httpx.post(f"{url}/v1/{path}", headers=auth, timeout=30, **kw)  # noqa: E731
    _error(post("completions", content=b'{"model": "tiny", "prompt": '), 400, code="invalid_json")
    _error(post("completions", content=b"[1, 2]"), 400)
    _error(post("completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10_000}), 400,
           param="max_tokens", code="context_length_exceeded")
    _error(post("completions", json={"model": "tiny", "prompt": "x " * 600}), 400, param="prompt",
           code="context_length_exceeded")
    _error(post("chat/completions", json={"model": "tiny", "messages": []}), 400, param="messages")
    _error(post("chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}), 400)
    _error(post("completions", json={"model": "tiny", "prompt": "x", "temperature": "hot"}), 400, param="temperature")
    _error(post("completions", json={"model": "tiny", "prompt": "x", "stop": 3}), 400, param="stop")
    _error(post("completions", json={"model": "tiny", "prompt": [10**9]}), 400, param="prompt")
    _error(httpx.get(f"{url}/v1/nothing", headers=auth), 404)
    # the same through the openai client
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=100_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    assert client.completions.create(model="tiny", prompt="still fine", max_tokens=2).usage.completion_tokens == 2


def test_auth(servers):
    with pytest.raises(openai.AuthenticationError):
        servers["main"].client(api_key="wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    r = httpx.post(f"{servers['main'].url}/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30)
    assert _error(r, 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{servers['main'].url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{servers['main'].url}/health", timeout=30).status_code == 200  # health stays open


def test_client_disconnect_mid_stream_cancels_the_row(servers):
    url = servers["main"].url
    body = {"model": "tiny", "prompt": "A long story:", "max_tokens": 480, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json=body,
                      timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 20
    while time.time() < deadline:
        records = [t for t in read_trace(servers["trace"]) if t["prompt_tokens"] == len(ENC.encode("A long story:"))
                   and t["stream"] and t["status"] == 499]
        if records and servers["main"].health()["models"]["tiny"]["active"] == 0:
            break
        time.sleep(0.1)
    assert records, "no trace line for the cancelled stream"
    assert records[-1]["completion_tokens"] < 480
    assert servers["main"].client().completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text


# ----------------------------------------------------------------------------------------------------------------
# concurrency


def test_16_concurrent_streams_match_their_solo_answers(servers, reference):
    client = servers["main"].client()
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 8 + i) for i in range(16)]
    results, errors = [None] * 16, []

    def run(i):
        prompt, n = jobs[i]
        try:
            stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for (prompt, n), got in zip(jobs, results):
        assert got == ENC.decode(reference(ENC.encode(prompt), n))


def test_quantize_int8_answers_as_the_int8_rounded_model(ckpt, tmp_path):
    """serve.py --quantize=int8: 12 concurrent greedy streams (batches from 1 row, the int8 kernel, to 12, which
    dequantise) give the text the model's own generator gives with its weights rounded to int8 by the rule."""
    from conftest import int8_rounded
    reference = greedy_reference(None, int8_rounded(GPT.from_pretrained(str(ckpt)).eval()))
    server = Server(f"--init_from={ckpt}", "--model_name=q", "--quantize=int8", f"--trace_file={tmp_path / 't.jsonl'}")
    try:
        client = server.wait_ready().client()
        jobs = [(PROMPTS[i % len(PROMPTS)] + "!" * (i // len(PROMPTS)), 6 + i) for i in range(12)]
        results = [None] * len(jobs)

        def run(i):
            stream = client.completions.create(model="q", prompt=jobs[i][0], max_tokens=jobs[i][1], temperature=0,
                                               stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for (prompt, n), got in zip(jobs, results):
            assert got == ENC.decode(reference(ENC.encode(prompt), n)), prompt
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------------------
# upstream forwarding and fallback


def test_upstream_forwarding_then_fallback(servers, reference):
    front, remote = servers["front"], servers["remote"]
    client = front.client()
    assert {m.id for m in client.models.list().data} == {"front", "gemma", "remote"}
    assert front.health()["upstream"]["status"] == "up"
    r = client.completions.create(model="remote", prompt="Hello", max_tokens=6, temperature=0)
    assert r.model == "remote" and r.choices[0].text == ENC.decode(reference(ENC.encode("Hello"), 6))
    stream = client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, temperature=0, stream=True)
    chunks = list(stream)
    assert all(c.model == "remote" for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):  # the upstream's own 404, passed through
        client.completions.create(model="nowhere", prompt="x")
    assert client.completions.create(model="front", prompt="x", max_tokens=2).model == "front"  # local

    remote.stop()
    deadline = time.time() + 10  # /health probes the upstream at most every Upstream.CHECK_EVERY_S seconds
    while (health := front.health())["upstream"]["status"] == "up" and time.time() < deadline:
        time.sleep(0.2)
    assert health["upstream"]["status"] == "down" and health["status"] == "degraded" and not health["upstream_up"]
    r = client.completions.create(model="remote", prompt="Hello", max_tokens=6, temperature=0)
    assert r.model == "front" and r.choices[0].text == ENC.decode(reference(ENC.encode("Hello"), 6))
    chunks = list(client.completions.create(model="remote", prompt="Hi", max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    deadline = time.time() + 10  # the trace's lines are written just after the responses
    while (routes := [t["route"] for t in read_trace(servers["front_trace"])])[-2:] != ["fallback"] * 2 \
            and time.time() < deadline:
        time.sleep(0.05)
    assert "upstream" in routes and routes[-2:] == ["fallback", "fallback"]


# ----------------------------------------------------------------------------------------------------------------
# the trace, startup errors


def test_trace_has_a_line_per_request(servers, client):
    settled(servers["main"])
    before = len(read_trace(servers["trace"]))
    client.completions.create(model="tiny", prompt="trace me", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    records = read_trace(servers["trace"], before + 2)  # read while the server runs: written as they come
    assert len(records) == before + 2
    ok, bad = records[-2:]
    assert ok["status"] == 200 and ok["model"] == "tiny" and ok["endpoint"] == "/v1/completions"
    assert ok["prompt_tokens"] == len(ENC.encode("trace me")) and ok["completion_tokens"] == 3
    assert ok["latency_s"] >= 0 and ok["time"] > 1e9
    assert bad["status"] == 404 and bad["model"] == "nope"
    statuses = {t["status"] for t in records}
    assert {200, 400, 401, 404} <= statuses


def test_startup_errors_are_one_line_and_nonzero(ckpt, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        runs = [subprocess.Popen([sys.executable, str(REPO / "serve.py"), *args], cwd=tmp_path, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for args in ([f"--init_from={tmp_path / 'missing'}", "--port=0"],
                             [f"--init_from={ckpt}", f"--port={port}"])]
        outputs = [p.communicate(timeout=60) for p in runs]
    for p, (out, err) in zip(runs, outputs):
        assert p.returncode != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "missing" in outputs[0][1] and str(port) in outputs[1][1]


# ----------------------------------------------------------------------------------------------------------------
# the throughput benchmark (not a test): python tests/test_serve.py bench


def bench(clients=8, max_tokens=64, n_layer=6, n_embd=384, n_head=6, rounds=5, threads=0):
    """Total completion tokens/s of 1 client and of `clients` concurrent clients, each streaming its own
    request (temperature 0.8, own seed). The clients share one asyncio loop and count tokens from the usage
    chunk, so they cost the 2-core machine little; the best of `rounds` runs is reported."""
    import asyncio
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "small", n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=1024)
        params = sum(p.numel() for p in GPT.from_pretrained(str(path)).parameters())
        server = Server(f"--init_from={path}", "--model_name=small", f"--trace_file={Path(tmp) / 'trace.jsonl'}",
                        f"--max_batch={max(clients, 1)}", f"--threads={threads}").wait_ready()

        async def one(http, i):
            body = {"model": "small", "prompt": f"Client {i} says", "max_tokens": max_tokens, "temperature": 0.8,
                    "seed": i, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", f"{server.url}/v1/completions", json=body) as r:
                last = [line async for line in r.aiter_lines() if line.startswith("data: {")][-1]
            return json.loads(last[6:])["usage"]["completion_tokens"]

        async def run():
            best = {1: 0.0, clients: 0.0}
            async with httpx.AsyncClient(timeout=300) as http:
                await one(http, 0)  # warm up
                for _ in range(rounds):  # interleaved, so a busy spell on the machine hits both alike
                    for k in best:
                        t0 = time.perf_counter()
                        tokens = sum(await asyncio.gather(*(one(http, i) for i in range(k))))
                        best[k] = max(best[k], tokens / (time.perf_counter() - t0))
            return best

        try:
            rates = asyncio.run(run())
            for k, rate in rates.items():
                print(f"{k} client(s): {rate:.1f} tokens/s in total (best of {rounds})", flush=True)
            print(f"model: {params / 1e6:.1f}M parameters ({n_layer} layers, n_embd {n_embd}, GPT-2 vocabulary), "
                  f"{max_tokens} tokens per request; server torch threads: "
                  f"{threads or max(1, (os.cpu_count() or 2) - 1)} of {os.cpu_count()} CPUs")
            print(f"speed-up with {clients} clients: {rates[clients] / rates[1]:.2f}x")
        finally:
            server.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        kwargs = dict(arg.removeprefix("--").split("=") for arg in sys.argv[2:])
        bench(**{k: int(v) for k, v in kwargs.items()})
    else:
        sys.exit(pytest.main([__file__, "-q"]))
