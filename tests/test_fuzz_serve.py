"""serve.py against a hostile client and a careless operator (issue 17, the server's classes), each class fed many
generated inputs:

- numeric parameters at the edges (NaN, Infinity, 1e400, booleans, floats for integers, negative and huge counts):
  a 400 naming the parameter; a tiny positive temperature is greedy (engine.sampling's rule): temperature 0's text;
- pathological JSON (nesting 100k deep), text no encoding can carry (lone surrogates, in any field or key): a 400
  naming the field, never a 500, and every request still has its trace line; a client that hangs up while
  sending its body is traced as 499;
- startup flags the server cannot honour: one line `error: ...` naming the flag, exit 2, no traceback, checkpoints
  untouched; the trace never written through a link (symbolic or hard) or into a file that is not a trace.

One server for the module (raw httpx requests, sequential, so the trace's lines follow the requests' order); the
startup cases run as subprocesses, started together; the flag and trace-file rules are also fuzzed in process.
"""
import hashlib
import json
import math
import os
import random
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_serve import ENC, REPO, Server, greedy_reference, make_checkpoint, read_trace, settled  # noqa: E402

import httpx  # noqa: E402

import engine  # noqa: E402
import serve  # noqa: E402

RNG_SEED = 17
PROMPT = "The meaning of life is"
CHAT = [{"role": "user", "content": "Hello there"}]


# ----------------------------------------------------------------------------------------------------------------
# the server, a client, and the trace


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny", block_size=128)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """The server, appending to a trace it wrote before (whose last line was cut short of its newline)."""
    trace = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    trace.write_text('{"time": 1.0, "endpoint": "/v1/completions", "status": 200}')  # no newline: cut short
    s = Server(f"--init_from={ckpt}", "--model_name=tiny", f"--trace_file={trace}")
    try:
        s.wait_ready()
        s.trace = trace
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as c:
        yield c


@pytest.fixture(scope="module")
def greedy(server, http, ckpt):
    """temperature 0's text for PROMPT and CHAT (8 tokens), checked against the model's own generator."""
    ref = greedy_reference(ckpt)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text == ENC.decode(ref(ENC.encode(PROMPT), 8))
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return {"completions": text, "chat": r.json()["choices"][0]["message"]["content"]}


class Sent:
    """The generation requests sent, in order, with the status each got: the trace must have a line for each."""

    def __init__(self, server):
        settled(server)  # earlier tests' lines are all written: the count below is where this test's begin
        self.trace, self.start = server.trace, len(server.trace.read_text().splitlines())
        self.statuses = []

    def post(self, http, path, content):
        r = http.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code != 500 and r.status_code < 500, (path, content[:300], r.text[:300])
        if path.startswith("/v1/"):
            self.statuses.append(r.status_code)
        return r

    def check_trace(self):
        read_trace(self.trace, self.start + len(self.statuses))  # written just after each response: wait for all
        lines = self.trace.read_text().splitlines()
        assert lines[0] == '{"time": 1.0, "endpoint": "/v1/completions", "status": 200}'  # its own old trace, kept
        records = [json.loads(line) for line in lines[self.start:]]  # every line is JSON (ASCII)
        assert all(line.isascii() for line in lines)
        assert [t["status"] for t in records] == self.statuses
        return records


def error_of(r, status=400, param=None, context=None):
    """The OpenAI error shape, the status, and (when given) the parameter it names."""
    assert r.status_code == status, (context, r.text[:500])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, (context, param, error)
    return error


def raw_body(base, key, raw):
    """base as JSON with key set to `raw`, a JSON token written as is (NaN, Infinity, 1e400, a 400-digit int)."""
    text = json.dumps({k: v for k, v in base.items() if k != key})
    return (text[:-1] + f', "{key}": {raw}}}').encode()


def completions(**extra):
    return {"model": "tiny", "prompt": "Hi", "max_tokens": 2, **extra}


def chat(**extra):
    return {"model": "tiny", "messages": CHAT, "max_tokens": 2, **extra}


# ----------------------------------------------------------------------------------------------------------------
# class 4: numeric parameters at the edges


NONFINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E999", "-0.1e99999"]
WRONG_TYPE = ["true", "false", '"1"', '""', '"NaN"', "[1]", "{}", '{"value": 1}']
FLOATS_FOR_INTS = ["1.0", "2.5", "1e2", "0.0", "-1.0", "1e-300"]
HUGE_INT = "9" * 400  # a 400-digit integer: Python's json reads it whole

# parameter -> (endpoints it belongs to, values out of its range as JSON tokens, whether it takes only integers)
NUMERIC = {
    "temperature": ("both", ["-1e-40", "-5e-324", "-0.5", "2.0001", "3", "1e308", HUGE_INT, "-" + HUGE_INT], False),
    "top_p": ("both", ["0", "0.0", "-1e-300", "1.0000001", "2", "1e308", HUGE_INT], False),
    "top_k": ("both", ["-2", "-100", "10000000000", HUGE_INT, "-" + HUGE_INT], True),
    "n": ("both", ["0", "-1", "-100", "129", "1000000", HUGE_INT], True),
    "max_tokens": ("both", ["0", "-1", "-100000", "1000000000000", HUGE_INT], True),
    "seed": ("both", [str(2**64), str(-2**63 - 1), HUGE_INT, "-" + HUGE_INT], True),
    "logprobs": ("completions", ["-1", "21", "1000", HUGE_INT], True),
    "top_logprobs": ("chat", ["-1", "21", HUGE_INT], True),
    "max_completion_tokens": ("chat", ["0", "-1", "1000000000000", HUGE_INT], True),
    "best_of": ("both", ["2", "0", "-1", HUGE_INT], True),
    "presence_penalty": ("both", ["0.5", "-2", "1e308"], False),
    "frequency_penalty": ("both", ["1", "-0.01"], False),
}


def numeric_cases():
    """(endpoint, key, raw token) for every numeric parameter: each bad kind, plus random ones."""
    rng = random.Random(RNG_SEED)
    cases = []
    for key, (where, out_of_range, integer) in NUMERIC.items():
        bad = NONFINITE + WRONG_TYPE + out_of_range + (FLOATS_FOR_INTS if integer else [])
        for _ in range(12):  # random ones: non-finite spellings, floats for integers, far out of range
            kind = rng.randrange(3)
            if kind == 0:
                bad.append(rng.choice(["", "-"]) + rng.choice(["1e", "9.5E", "1E+"]) + str(rng.randrange(309, 5000)))
            elif kind == 1 and integer:
                bad.append(repr(rng.randrange(1, 50) + rng.choice([0.5, 0.25, 0.0])))
            else:
                bad.append(str(rng.choice([-1, 1]) * 10 ** rng.randrange(20, 60)))
        for endpoint in (["completions", "chat"] if where == "both" else [where]):
            cases += [(endpoint, key, raw) for raw in bad]
    return cases


def test_numeric_parameters_at_the_edges_are_400s_naming_them(server, http, greedy):
    sent, t0 = Sent(server), time.time()
    cases = numeric_cases()
    for endpoint, key, raw in cases:
        base = completions() if endpoint == "completions" else chat(logprobs=True)
        if key in ("max_tokens", "max_completion_tokens"):
            base.pop("max_tokens")
        path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
        r = sent.post(http, path, raw_body(base, key, raw))
        error = error_of(r, 400, param=key, context=(endpoint, key, raw[:40]))
        if raw in NONFINITE:
            assert "finite" in error["message"], error
    # a non-finite number anywhere is named by its path, even where nothing reads it
    for raw in NONFINITE:
        r = sent.post(http, "/v1/completions", raw_body(completions(), "metadata", f'{{"run": {{"x": [1, {raw}]}}}}'))
        error_of(r, 400, param="metadata.run.x.1")
        r = sent.post(http, "/v1/chat/completions",
                      json.dumps(chat()).replace('"Hello there"', raw).encode())
        error_of(r, 400, param="messages.0.content")
        r = http.post("/detokenize", content=f'{{"tokens": [1, 2, {raw}]}}'.encode())
        error_of(r, 400, param="tokens.2")
    # stream_options.include_usage is a boolean, and the only option
    for raw in ["1", "0", '"yes"', "NaN", "[]"]:
        r = sent.post(http, "/v1/completions",
                      raw_body(completions(stream=True), "stream_options", f'{{"include_usage": {raw}}}'))
        error_of(r, 400, param="stream_options.include_usage")
    error_of(sent.post(http, "/v1/completions", json.dumps(completions(stream_options={"include_x": True})).encode()),
             400, param="stream_options.include_x")
    error_of(sent.post(http, "/v1/chat/completions", json.dumps(chat(max_tokens=3, max_completion_tokens=4)).encode()),
             400, param="max_completion_tokens")
    assert len(cases) > 350
    print(f"{len(sent.statuses)} bad numeric requests in {time.time() - t0:.1f}s")
    sent.check_trace()


def tiny_temperatures():
    """Positive temperatures below engine.GREEDY_BELOW (the smallest subnormal included), and zeros."""
    rng = random.Random(RNG_SEED)
    values = [5e-324, 1e-323, 1e-310, 2.2250738585072014e-308, 1e-300, 1e-40, 1e-38, 1e-10, 0.0, -0.0, 0]
    values += [10 ** rng.uniform(-323, math.log10(engine.GREEDY_BELOW)) for _ in range(12)]
    values += [engine.GREEDY_BELOW * (1 - 1e-9)]
    return [v for v in values if v < engine.GREEDY_BELOW]


def test_tiny_temperatures_are_greedy(server, http, greedy):
    """engine.sampling's rule: a temperature below GREEDY_BELOW is 0; top_k 1 and a top_p below any token's
    probability leave only the likeliest token: the same text as temperature 0 (with or without a seed)."""
    sent = Sent(server)
    rng = random.Random(RNG_SEED)
    settings = [{"temperature": t} for t in tiny_temperatures()]
    settings += [{"temperature": rng.choice([0.5, 1.0, 2.0]), "top_k": 1} for _ in range(3)]
    settings += [{"temperature": 1.0, "top_p": p} for p in (5e-324, 1e-300, 1e-40)]
    settings += [{"temperature": t, "top_k": -1, "top_p": 1} for t in (1e-30, 0)]  # -1, 1: off
    for i, s in enumerate(settings):
        s = {**s, **({"seed": rng.choice([0, -2**63, 2**64 - 1, 7])} if i % 2 else {})}
        r = sent.post(http, "/v1/completions", json.dumps(completions(prompt=PROMPT, max_tokens=8, **s)).encode())
        assert r.status_code == 200, (s, r.text)
        assert r.json()["choices"][0]["text"] == greedy["completions"], s
        if i % 4 == 0:
            r = sent.post(http, "/v1/chat/completions", json.dumps(chat(max_tokens=8, **s)).encode())
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy["chat"], s
    # the edges of the ranges are honoured, not refused: -0.0, 2, top_p 1, seeds at both ends of 64 bits, n 128
    for s in ({"temperature": 2, "seed": 1}, {"temperature": -0.0}, {"top_p": 1.0, "seed": -2**63},
              {"seed": 2**64 - 1}, {"n": 128, "max_tokens": 1}, {"logprobs": 20, "max_tokens": 1}):
        r = sent.post(http, "/v1/completions", json.dumps(completions(**s)).encode())
        assert r.status_code == 200, (s, r.text)
    sent.check_trace()


# ----------------------------------------------------------------------------------------------------------------
# class 9: pathological JSON, text no encoding can carry, a client gone during the upload


def surrogate_texts(rng, count):
    """Strings holding a lone surrogate: high or low, alone, at either end, inside text, a high one before a
    non-low character, a low one before a high one."""
    out = ["\ud800", "\udfff", "\udc80", "a\ud83d", "\ude00b", "\udc00\ud800", "x\ud800y\udfffz"]
    while len(out) < count:
        word = "".join(rng.choice("abc XYZ é🙂\n") for _ in range(rng.randrange(0, 8)))
        cut = rng.randrange(len(word) + 1)
        out.append(word[:cut] + chr(rng.randrange(0xD800, 0xE000)) + word[cut:])
    return out


def shown(path):
    """A parameter path as the error names it (a lone surrogate written as \\ud800)."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def surrogate_cases(rng):
    """(endpoint path, body, the field the 400 must name) over every string field, and keys."""
    cases = []
    for bad in surrogate_texts(rng, 60):
        cases += [
            ("/v1/completions", completions(prompt=bad), "prompt"),
            ("/v1/completions", completions(prompt=["fine", bad]), "prompt.1"),
            ("/v1/completions", completions(stop=bad), "stop"),
            ("/v1/completions", completions(stop=["\n", "ok", bad]), "stop.2"),
            ("/v1/completions", completions(model=bad), "model"),
            ("/v1/completions", completions(user=bad), "user"),
            ("/v1/completions", completions(metadata={"run": bad}), "metadata.run"),
            ("/v1/completions", completions(metadata={bad: "x"}), "metadata." + bad),
            ("/v1/completions", {**completions(), bad: 1}, bad),
            ("/v1/chat/completions", chat(messages=[{"role": "user", "content": bad}]), "messages.0.content"),
            ("/v1/chat/completions", chat(messages=[*CHAT, {"role": "assistant", "content": "a"},
                                                    {"role": "user", "content": [{"type": "text", "text": bad}]}]),
             "messages.2.content.0.text"),
            ("/v1/chat/completions", chat(messages=[{"role": bad, "content": "x"}]), "messages.0.role"),
            ("/v1/chat/completions", chat(stop=[bad]), "stop.0"),
            ("/v1/chat/completions", chat(model=bad), "model"),
            ("/v1/chat/completions", chat(user=bad), "user"),
            ("/tokenize", {"prompt": bad}, "prompt"),
            ("/tokenize", {"messages": [{"role": "user", "content": bad}]}, "messages.0.content"),
            ("/tokenize", {"model": bad, "prompt": "x"}, "model"),
        ]
    return cases


def test_lone_surrogates_are_400s_naming_the_field_and_traced(server, http, greedy):
    rng = random.Random(RNG_SEED)
    sent, t0 = Sent(server), time.time()
    cases = surrogate_cases(rng)
    for path, body, field in cases:
        r = sent.post(http, path, json.dumps(body).encode())  # ensure_ascii: the surrogate goes as "\ud800"
        assert "surrogate" in error_of(r, 400, param=shown(field))["message"]
    # text that only looks like one: a surrogate pair (an astral character) is fine
    for body in (completions(prompt="smile \ud83d\ude00"), completions(stop="\ud83d\ude00", user="\U0001f642")):
        assert sent.post(http, "/v1/completions", json.dumps(body).encode()).status_code == 200
    records = sent.check_trace()
    assert len(cases) > 1000 and len(records) == len(sent.statuses)
    bad = [t for t in records if t["status"] == 400]
    assert bad and all("surrogate" in t["error"] for t in bad)
    print(f"{len(cases)} requests with lone surrogates in {time.time() - t0:.1f}s")


def deep(depth, rng):
    """A body nesting `depth` levels somewhere (balanced or cut short)."""
    opener, closer = rng.choice([("[", "]"), ('{"a": ', "}")])
    inner = opener * depth + "1" + closer * depth
    where = rng.randrange(5)
    if where == 0:
        text = inner
    elif where == 1:
        text = json.dumps(completions())[:-1] + f', "metadata": {{"x": {inner}}}}}'
    elif where == 2:
        text = json.dumps(completions())[:-1].replace('"Hi"', inner) + "}"
    elif where == 3:
        text = '{"model": "tiny", "prompt": ' + inner
    else:
        text = '{"messages": [{"role": "user", "content": ' + inner + "}]}"
    if rng.random() < 0.3:
        text = text[: rng.randrange(1, len(text))]
    return text.encode()


def test_pathological_json_is_a_400(server, http, greedy):
    rng = random.Random(RNG_SEED)
    sent, t0 = Sent(server), time.time()
    depths = [100_000, 1_000_000, serve.MAX_DEPTH + 1, 1000, 999, 5000] + [rng.randrange(65, 3000) for _ in range(40)]
    for depth in depths:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
            error_of(sent.post(http, path, deep(depth, rng)), 400)
    ok_depth = json.dumps(completions())[:-1] + ', "metadata": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"
    assert sent.post(http, "/v1/completions", ok_depth.encode()).status_code == 200  # deep, within the limit
    garbage = [b"", b" ", b"null", b"[]", b"1", b'"x"', b"NaN", b"Infinity", b"\xff\xfe\x00", b"\xed\xa0\x80",
               b'{"prompt": "\xff"}', b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}",
               b'{"a": 1,}', b"{" * 3, b'{"prompt": "x"' + b" " * 10_000, json.dumps(completions()).encode()[:-1]]
    garbage += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(30)]
    for body in garbage:
        for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            error_of(sent.post(http, path, body), 400)
    records = sent.check_trace()
    assert [t["status"] for t in records].count(200) == 1 and all(t["error"] for t in records if t["status"] == 400)
    print(f"{len(depths) * 3 + 1 + len(garbage) * 4} pathological bodies in {time.time() - t0:.1f}s")


def upload_then_hang_up(url, path, head_only=False, chunked=False):
    """Send a request's headers and part of its body, then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(completions(prompt="x" * 500)).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        framing = b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(body)}\r\n".encode()
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n".encode() + framing +
                  b"\r\n")
        if not head_only:
            part = body[: len(body) // 3]
            s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
        time.sleep(0.05)


def test_client_hanging_up_during_the_upload_is_traced_as_499(server, http, greedy):
    settled(server)
    before = len(read_trace(server.trace))
    kinds = [(path, head_only, chunked) for path in ("/v1/completions", "/v1/chat/completions")
             for head_only in (False, True) for chunked in (False, True)]
    for kind in kinds:
        upload_then_hang_up(server.url, *kind)
    deadline = time.time() + 20
    while time.time() < deadline and len(read_trace(server.trace)) < before + len(kinds):
        time.sleep(0.1)
    records = read_trace(server.trace)[before:]
    assert [t["status"] for t in records] == [499] * len(kinds), records
    assert all(t["error"] == "client disconnected" for t in records)
    upload_then_hang_up(server.url, "/tokenize")  # not traced, but no 500 either (the server says nothing)
    assert "Traceback" not in "".join(server.output) and "ClientDisconnect" not in "".join(server.output)


def test_the_server_is_still_right_after_the_fuzz(server, http, greedy):
    """Run last: the model's greedy text, whole and streamed, and a clean health report."""
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy["completions"]
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 8, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == greedy["chat"]
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["models"]["tiny"]["active"] == 0
    assert health["models"]["tiny"]["waiting"] == 0
    assert server.proc.poll() is None and "Traceback" not in "".join(server.output)
    lines = server.trace.read_text().splitlines()
    assert all(json.loads(line)["status"] for line in lines)


# ----------------------------------------------------------------------------------------------------------------
# the trace writer: never raises, never loses a line, never writes through a link


def test_trace_lines_survive_any_record(tmp_path):
    rng = random.Random(RNG_SEED)
    trace = serve.TraceLog(tmp_path / "t.jsonl")
    records = []
    for i in range(300):
        text = surrogate_texts(rng, 1)[0] if i % 3 else "".join(chr(rng.randrange(1, 0x10FFFF)) for _ in range(5))
        odd = rng.choice([math.nan, math.inf, -math.inf, b"\xff", {1, 2}, object(), text, 1e308, None, [text, {}]])
        record = {"time": float(i), "endpoint": "/v1/completions", "model": text, "error": f"model '{text}'",
                  "status": 400, "extra": odd}
        trace.write(record)
        records.append(record)
    trace.close()
    trace.write({"time": 0.0, "status": 200})  # after close: said on stderr, not raised
    lines = (tmp_path / "t.jsonl").read_bytes().decode("ascii").splitlines()
    assert len(lines) == len(records)
    for line, record in zip(lines, records):
        back = json.loads(line)
        assert back["model"] == record["model"] and back["error"] == record["error"]  # surrogates come back whole
        assert back["time"] == record["time"] and back["status"] == 400


def test_trace_file_rules(tmp_path, ckpt):
    """What --trace_file may name: a new file (folders made), its own trace, a device or pipe; never a link to a
    file, a hard-linked file, a file that is not a trace, a directory, or a path under a file."""
    out = tmp_path / "out"
    (out / "ckpt").mkdir(parents=True)
    weights, config = out / "model.safetensors", out / "ckpt" / "config.json"
    weights.write_bytes(os.urandom(256))
    config.write_text('{"n_layer": 2}')
    own, own2 = tmp_path / "own.jsonl", tmp_path / "own2.jsonl"
    own.write_text('{"time": 1, "status": 200}\n')
    own2.write_text('{"time": 1, "status": 200}\n')
    refused, allowed = [], [tmp_path / "new" / "deeper" / "t.jsonl", own, tmp_path / "empty.jsonl", Path(os.devnull)]
    (tmp_path / "empty.jsonl").write_text("")
    for i, target in enumerate([weights, config, own, ckpt / "config.json", tmp_path / "dangling"]):
        link = tmp_path / f"sym{i}"
        link.symlink_to(target)
        refused.append(link)
    for i, target in enumerate([weights, config, own2]):
        link = tmp_path / f"hard{i}"
        os.link(target, link)
        refused.append(link)
    refused += [weights, config, out, tmp_path, weights / "t.jsonl", config / "a" / "b.jsonl"]
    for name in ("stdout", "stderr"):  # links to this process's pipe or terminal (not a file: pytest's capture)
        if os.path.exists(f"/dev/{name}") and not stat.S_ISREG(os.stat(f"/dev/{name}").st_mode):
            allowed.append(Path(f"/dev/{name}"))
        elif os.path.exists(f"/dev/{name}"):
            refused.append(Path(f"/dev/{name}"))
    before = {p: p.read_bytes() for p in (weights, config, own)}
    for path in refused:
        with pytest.raises(serve.TraceError) as e:
            serve.TraceLog(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    for path in allowed:
        trace = serve.TraceLog(path)
        trace.write({"time": 2.0, "status": 200})
        trace.close()
    assert {p: p.read_bytes() for p in (weights, config)} == {p: before[p] for p in (weights, config)}
    assert [json.loads(line)["time"] for line in own.read_text().splitlines()] == [1, 2.0]


# ----------------------------------------------------------------------------------------------------------------
# class 5: startup flags, in process (many values) and as real runs (one per flag kind)


def bad_flags(tmp, ckpt):
    """argv -> the flag its error must name: every flag, several wrong values each."""
    base = [f"--init_from={ckpt}"]
    cases = {}
    for v in ("70000", "65536", "-1", "-65535", "8e3", "x", "", "1.5"):
        cases[(*base, f"--port={v}")] = "--port"
    for flag in ("--max_batch", "--max_prefill_tokens", "--default_max_tokens"):
        for v in ("0", "-1", "-100", "1.5", "inf", "nan", "", "ten"):
            cases[(*base, f"{flag}={v}")] = flag
    for v in ("-1", "-8", "1e9", str(10**6), "nan", "one"):
        cases[(*base, f"--threads={v}")] = "--threads"
    for v in ("chatml", "", "PLAIN ", "llama3", "harmony\x00"):
        cases[(*base, f"--chat_format={v}")] = "--chat_format"
    for v in ("loud", "", "5"):
        cases[(*base, f"--log_level={v}")] = "--log_level"
    for v in ("float8", "", "int8"):
        cases[(*base, f"--dtype={v}")] = "--dtype"
    for v in ("int4", "INT8", "int8 ", "fp8"):
        cases[(*base, f"--quantize={v}")] = "--quantize"
    for v in ("", " ", "a b", "ключ", "tab\tkey", "\x7f"):
        cases[(*base, f"--api_key={v}")] = "--api_key"
    for v in ("", "ftp://host/v1", "http://", "localhost:8000", "http://host:99999/v1", "http://host:x/v1", "//h/v1"):
        cases[(*base, f"--upstream={v}")] = "--upstream"
    cases[(*base, "--upstream_api_key=k")] = "--upstream_api_key"
    cases[(*base, "--upstream=http://h/v1", "--upstream_api_key=a b")] = "--upstream_api_key"
    for v in ("nope", "", "char", "gpt-2"):
        cases[(*base, f"--tokenizer={v}")] = "--tokenizer"
    for v in ("", " "):
        cases[(*base, f"--model_name={v}")] = "--model_name"
        cases[(*base, f"--trace_file={v}")] = "--trace_file"
        cases[(*base, f"--host={v}")] = "--host"
        cases[(f"--init_from={v}",)] = "--init_from"
    cases[("--model_name=x",)] = "--model_name"
    for v in ("noequals", "=path", "name=", " = "):
        cases[(*base, f"--model={v}")] = "--model"
    cases[(*base, "--fallback=x")] = "--fallback"
    cases[(*base, "--fallback=tiny", "--model=tiny2=x")] = "--fallback"
    cases[(*base, "--model_name=a", "--model=a=elsewhere")] = "--model_name"
    cases[(*base, "--no_such_flag=1")] = "--no_such_flag"
    return cases


def test_bad_flags_are_one_line_naming_the_flag(tmp_path, ckpt, capsys):
    cases = bad_flags(tmp_path, ckpt)
    assert len(cases) > 80
    for argv, flag in cases.items():
        with pytest.raises(SystemExit) as e:
            serve.parse_args(list(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], (argv, err)
    # and what is fine parses
    for argv in ([f"--init_from={ckpt}", "--port=0", "--max_batch=1", "--threads=0", "--log_level=INFO"],
                 [f"--init_from={ckpt}", "--port=65535", "--chat_format=gemma", "--tokenizer=gpt2", "--api_key=k-1"],
                 ["--upstream=https://example.com:443/v1", "--upstream_api_key=sk-x"]):
        serve.parse_args(argv)
        assert capsys.readouterr().err == ""


def test_chat_formats_the_tokenizer_cannot_render(tmp_path):
    """--chat_format or meta.json naming a format the tokenizer lacks: a StartupError naming it; the default
    format failing (a char vocabulary without the letters of "User: "): completions only, chat a 404."""
    import checkpoint
    import torch
    from model import GPT, GPTConfig
    from tokenizer import CharTokenizer, load_tokenizer, make_meta
    digits = CharTokenizer("0123456789 \n")
    torch.manual_seed(0)
    tiny = dict(n_layer=1, n_head=1, n_embd=8, block_size=32)
    checkpoint.save(tmp_path / "digits", GPT(GPTConfig(vocab_size=digits.vocab_size, **tiny)), {}, make_meta(digits))
    gpt2_meta = {**make_meta(load_tokenizer({"tokenizer": "gpt2"})), "chat_format": "harmony"}
    checkpoint.save(tmp_path / "says-harmony", GPT(GPTConfig(vocab_size=50257, **tiny)), {}, gpt2_meta)
    for path, flag, named in ((tmp_path / "digits", "plain", "--chat_format"),
                              (tmp_path / "digits", "gemma", "--chat_format"),
                              (tmp_path / "says-harmony", None, "meta.json"),
                              (tmp_path / "says-harmony", "harmony", "--chat_format")):
        with pytest.raises(serve.StartupError) as e:
            serve.load_local_model("m", path, "cpu", torch.float32, chat_format=flag)
        assert named in str(e.value) and "\n" not in str(e.value)
    lm = serve.load_local_model("digits", tmp_path / "digits", "cpu", torch.float32)
    try:
        assert lm.chat_format is None and "cannot render" in lm.no_chat
        with pytest.raises(serve.APIError) as e:
            serve.parse_request(lm, {"messages": CHAT}, chat=True, default_max_tokens=4)
        assert e.value.status == 404 and e.value.param == "model" and e.value.code == "model_not_chat"
        assert serve.parse_request(lm, {"prompt": "12 34"}, chat=False, default_max_tokens=4).prompts
    finally:
        lm.batcher.stop()
    lm = serve.load_local_model("h", tmp_path / "says-harmony", "cpu", torch.float32, chat_format="plain")
    lm.batcher.stop()  # the flag overrides meta.json's format


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


STARTUP = {  # id -> (extra argv, the flag the one line must name); {ckpt}, {tmp} filled in. One per kind of check
    # (argparse's, a range, what needs the checkpoint, the trace file's rules, the socket): every flag and value
    # goes through the same code in test_bad_flags_are_one_line_naming_the_flag, in process
    "chat_format-unknown": (["--chat_format=chatml"], "--chat_format"),
    "chat_format-tokenizer": (["--chat_format=harmony"], "--chat_format"),
    "max_batch": (["--max_batch=0"], "--max_batch"),
    "max_prefill_tokens": (["--max_prefill_tokens=0"], "--max_prefill_tokens"),
    "default_max_tokens": (["--default_max_tokens=-5"], "--default_max_tokens"),
    "threads": (["--threads=-1"], "--threads"),
    "port": (["--port=70000"], "--port"),
    "host": (["--host=192.0.2.1"], "--host"),  # TEST-NET: an address no interface here has
    "trace-directory": (["--trace_file={tmp}"], "--trace_file"),
    "trace-under-a-file": (["--trace_file={ckpt}/config.json/trace.jsonl"], "--trace_file"),
    "trace-symlink-into-checkpoint": (["--trace_file={tmp}/to-weights"], "--trace_file"),
    "trace-hardlink-into-checkpoint": (["--trace_file={tmp}/config-link.json"], "--trace_file"),
    "init_from": (["--init_from={tmp}/missing"], "--init_from"),
}


@pytest.fixture(scope="module")
def startup_runs(ckpt, tmp_path_factory):
    """Every STARTUP case as a real `python serve.py` run, four at a time; the checkpoint's files hashed around."""
    tmp = tmp_path_factory.mktemp("startup")
    weights = next(ckpt.glob("*.safetensors"))
    (tmp / "to-weights").symlink_to(weights)
    os.link(ckpt / "config.json", tmp / "config-link.json")
    before = digest(ckpt)
    runs, pending, deadline = {}, list(STARTUP.items()), time.time() + 120
    while (pending or any(p.poll() is None for p in runs.values())) and time.time() < deadline:
        while pending and sum(p.poll() is None for p in runs.values()) < 4:
            name, (extra, _) = pending.pop(0)
            argv = [a.format(ckpt=ckpt, tmp=tmp, weights=weights) for a in extra]
            if not any(a.startswith("--init_from") for a in argv):
                argv.insert(0, f"--init_from={ckpt}")
            if not any(a.startswith("--port") for a in argv):
                argv.append("--port=0")
            runs[name] = subprocess.Popen([sys.executable, str(REPO / "serve.py"), *argv], cwd=tmp, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.05)
    for p in runs.values():  # a case the server did not refuse is serving: stop it (the test then fails)
        if p.poll() is None:
            p.kill()
    out = {name: (p.wait(), *p.communicate(timeout=60)) for name, p in runs.items()}
    out["digests"] = before, digest(ckpt)
    return out


@pytest.mark.parametrize("case", list(STARTUP))
def test_startup_flag_is_one_line_exit_2(startup_runs, case):
    code, stdout, stderr = startup_runs[case]
    lines = stderr.strip().splitlines()
    assert code == 2, (case, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert STARTUP[case][1] in lines[0], lines[0]
    assert "listening" not in stdout
    assert startup_runs["digests"][0] == startup_runs["digests"][1]  # the checkpoint is byte-identical
