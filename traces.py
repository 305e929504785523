"""
Ingest serve.py's request traces into a Weights & Biases run: a table with a row per trace, and summary metrics.

$ python traces.py --from=out-serve/trace.jsonl --wandb_project=serving
$ python traces.py --from=redis://localhost:6379/0 --wandb_project=serving --follow=True
$ WANDB_MODE=offline python traces.py --from=out-serve/trace.jsonl --wandb_project=serving   # then `wandb sync`

Sources: the JSONL file serve.py writes (--trace_file, default out-serve/trace.jsonl), or the Redis list it RPUSHes
its records onto with --trace_redis (`llm_traces`, or --redis_key). The source is only ever read: the file from a
byte offset, the list with LRANGE from an index (nothing is popped, so other readers still see every trace). While
Redis is down serve.py writes to its file instead: ingest that file too (its own state file keeps them apart).

Batches and resuming: it reads up to --batch_size traces, logs them, then records how far it got in a small JSON
state file, and repeats. A second run of the same command resumes the same W&B run (the state keeps its id:
wandb.init(id=..., resume="allow")) and ingests only the traces added since: every trace lands in the run once. In
the file only complete lines count: a line still being written (no newline yet) is left for the next pass.
--follow=True keeps polling every --interval seconds; Ctrl-C (or SIGTERM) stops once the batch in hand is logged
and recorded (a second Ctrl-C stops at once; that batch may then be ingested again by the next run). Progress is
recorded right after a batch is handed to wandb, so a crash in between repeats that batch, never loses it.

The state file (default: <trace file>.wandb-state.json beside the file; for Redis
out-serve/redis-HOST-PORT-DB-KEY.wandb-state.json; or --state=PATH) is JSON:
  {"version": 1, "source": "file:/abs/trace.jsonl" or "redis://HOST:PORT/DB#KEY" (never a password),
   "position": byte offset after the last complete line / the next list index,
   "head": sha256 of the source's first min(position, 4096) bytes / of its first element (a source that was
           truncated, replaced or trimmed since is refused, not silently mis-read),
   "run_id", "project", "entity", "step": the next W&B step, "columns": the table's columns (fixed per run),
   "stats": the running aggregates below}
A file <state>.lock beside it keeps two ingesters off one state (they would log the same traces twice).

The table ("traces"): one row per trace, columns time, id, endpoint, model, route, served_by, stream,
prompt_chars, prompt_tokens, completion_tokens, ttft_s, latency_s, status, finish_reason, error, then prompt and
completion when the run's first batch has them (serve.py --trace_content=True), then extra: the record's other
fields as JSON text (fields of newer servers, or content when the columns have none), null if none. A field a
record lacks is null. Lists and objects (finish_reason, chat messages, completion texts per choice) are JSON text.
It is a wandb.Table(log_mode="INCREMENTAL"): a logged Table cannot change, and INCREMENTAL is wandb's way to grow
one: each log writes only the rows added since the last as a new increment (a file under media/table/ and an
artifact), and the W&B app shows the increments as one table. A resumed run continues the increments (wandb reads
the last one from the run's summary), so each invocation starts a new Table object. Logging one IMMUTABLE table per
batch under the same key would store the same rows, but the app would show one batch at a time. Caveats: the app
shows the latest 100 increments of a run (all stay stored: prefer large batches and a long --interval); one log
holds at most wandb.Table.MAX_ROWS (10000) rows, so --batch_size is at most that; the Table object keeps the rows
this process logged in memory (restart a --follow that ran for days: it resumes); offline runs cannot read an
earlier invocation's summary, so each offline-run-* directory holds its own increments (together, every trace once).

Summary metrics, logged with each batch (so also charts over time), are over every trace ingested into the run so
far, earlier invocations included (the state keeps the aggregates):
  requests: traces ingested; requests_local / _upstream / _fallback / _other (route missing or unknown)
  errors: traces with status >= 400 (499: the client hung up); skipped: entries that were not a JSON object
  latency_p50_s, latency_p95_s, ttft_p50_s, ttft_p95_s: numpy.percentile (linear) of latency_s / ttft_s over the
      successful requests (status < 400) that have the value; the state keeps every such value, so they are exact
  completion_tokens: the sum over all traces
  tokens_per_s: completion tokens over the summed latency_s of the successful requests that have both: the mean
      generation speed a client saw (queueing and prompt included), time-weighted. Not the server's throughput:
      concurrent requests overlap in time.
A number counts only when it is an int or float (not a bool), >= 0 and < 1e12 (NaN, strings and the like do not).
Blank lines are ignored; a line or element that is not JSON or not an object is skipped, counted and reported.

Errors a user can fix (a missing trace file, an unreachable Redis, a bad --from, a state file of another source
or project, a source that shrank, wandb or redis not installed) print one line on stderr starting "error: " and
exit with status 2.
"""
import argparse
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

FIELDS = ["time", "id", "endpoint", "model", "route", "served_by", "stream", "prompt_chars", "prompt_tokens",
          "completion_tokens", "ttft_s", "latency_s", "status", "finish_reason", "error"]
CONTENT = ["prompt", "completion"]  # only with serve.py --trace_content=True
ROUTES = ("local", "upstream", "fallback")
TABLE_KEY = "traces"
STATE_VERSION = 1
HEAD_BYTES = 4096  # how much of a file's start the state fingerprints
MAX_BATCH = 10000  # wandb.Table.MAX_ROWS: a table file holds at most this many rows per log
STOP = False  # set by Ctrl-C / SIGTERM: stop after the batch in hand


# ----------------------------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        fail(f"{message} (python traces.py --help)")


def fail(message, code=2):
    print("error: " + " ".join(_printable(message).split()), file=sys.stderr, flush=True)
    sys.exit(code)


def _printable(text):
    """Text any encoder can write: a lone surrogate (a client's "\\ud800" in a trace) as \\ud800."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _bool(text):
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"must be True or False, got {text!r}")
    return value


def _number(kind, lo, hi):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not lo <= value <= hi:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {text!r}")
        return value
    return parse


def parse_args(argv):
    p = _Parser(description="Ingest serve.py's traces into a W&B run (see the docstring of traces.py).")
    p.add_argument("--from", dest="source", required=True, metavar="FILE|URL",
                   help="a JSONL trace file (serve.py --trace_file) or redis://HOST:PORT/DB (serve.py --trace_redis)")
    p.add_argument("--wandb_project", required=True)
    p.add_argument("--wandb_entity", default=None)
    p.add_argument("--run_name", default=None, help="the W&B run's name (when it is created)")
    p.add_argument("--batch_size", type=_number(int, 1, MAX_BATCH), default=500, help="traces per logged batch")
    p.add_argument("--state", default=None, metavar="PATH", help="the progress file (default: see the docstring)")
    p.add_argument("--follow", type=_bool, default=False, help="True: keep polling for new traces until Ctrl-C")
    p.add_argument("--interval", type=_number(float, 0.1, 86400), default=30.0,
                   help="--follow: seconds between polls once caught up")
    p.add_argument("--redis_key", default="llm_traces", help="the Redis list serve.py pushes onto")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# sources: read-only, addressed by a position (a byte offset, a list index)


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


class FileSource:
    """A JSONL trace file, read from a byte offset; only complete lines (ending in a newline) are consumed."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            if not self.path.is_file():
                fail(f"--from {path}: {'not a file' if self.path.exists() else 'no such file'}: give serve.py's "
                     f"trace file (its --trace_file, default out-serve/trace.jsonl) or redis://HOST:PORT/DB")
            with open(self.path, "rb"):
                pass
        except OSError as e:
            fail(f"--from {path}: cannot read it: {e.strerror or e}")
        self.name = f"file:{self.path.resolve()}"

    def default_state(self):
        return Path(f"{self.path}.wandb-state.json")

    def read(self, position, n):
        """Up to n raw lines from `position`, and the position after them."""
        lines = []
        with open(self.path, "rb") as f:
            f.seek(position)
            while len(lines) < n:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break  # the end, or a line serve.py is still writing: next time
                lines.append(line)
                position += len(line)
        return lines, position

    def size(self):
        return os.path.getsize(self.path)

    def head(self, position):
        with open(self.path, "rb") as f:
            return _sha256(f.read(min(position, HEAD_BYTES)))


class RedisSource:
    """serve.py's Redis list, read with LRANGE from an index: nothing is removed (RPUSH only appends, so an index
    keeps naming the same element)."""

    def __init__(self, url, key):
        try:
            import redis
        except ImportError:
            fail("reading traces from Redis needs the redis client: pip install redis")
        self.redis, self.key = redis, key
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        db = parts.path.lstrip("/") if parts.scheme != "unix" else "0"
        if parts.scheme in ("redis", "rediss") and (not parts.hostname or port == -1 or db and not db.isdigit()) \
                or parts.scheme == "unix" and not parts.path:
            fail(f"--from must be a trace file or redis://HOST:PORT/DB (or rediss://, unix://), got {url!r}")
        try:
            self.client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=60)
        except ValueError as e:
            fail(f"--from must be a trace file or redis://HOST:PORT/DB, got {url!r}: {e}")
        kw = self.client.connection_pool.connection_kwargs
        self.where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        self.name = f"redis://{self.where}/{kw.get('db', 0)}#{key}"  # no password: the state file is plain text
        try:
            kind = self.client.type(key)
        except redis.RedisError as e:
            fail(f"cannot reach Redis at {self.where} ({type(e).__name__}: {e}): start it, or fix --from")
        if kind not in (b"list", b"none"):  # "none": nothing pushed yet
            fail(f"Redis key {key!r} at {self.where} is a {kind.decode()}, not serve.py's trace list: fix --redis_key")

    def default_state(self):
        return Path("out-serve") / (re.sub(r"[^A-Za-z0-9_.-]+", "-", f"redis-{self.name[8:]}") + ".wandb-state.json")

    def read(self, position, n):
        items = self.client.lrange(self.key, position, position + n - 1)
        return items, position + len(items)

    def size(self):
        return self.client.llen(self.key)

    def head(self, position):
        return _sha256(self.client.lindex(self.key, 0) or b"") if position else _sha256(b"")


def open_source(spec, key):
    if not spec:
        fail("--from is empty: give a trace file or redis://HOST:PORT/DB")
    if "://" in spec:
        if urlsplit(spec).scheme.lower() not in ("redis", "rediss", "unix"):
            fail(f"--from must be a trace file or redis://HOST:PORT/DB (or rediss://, unix://), got {spec!r}")
        return RedisSource(spec, key)
    return FileSource(spec)


# ----------------------------------------------------------------------------------------------------------------
# the state file


def lock(path):
    """Hold <state>.lock for this process's life: a second ingester on the same state would log traces twice."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, run one ingester per state
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        fail(f"cannot create the state file's lock {path}.lock: {e.strerror or e}: give a writable --state=PATH")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail(f"another traces.py is ingesting with the state file {path}: stop it first (or give another --state)")
    return fd


def load_state(path, source, args):
    fresh = {"version": STATE_VERSION, "source": source.name, "position": 0, "head": source.head(0),
             "run_id": None, "project": args.wandb_project, "entity": args.wandb_entity, "step": 0,
             "columns": None, "stats": new_stats()}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return fresh
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the state file {path}: {getattr(e, 'strerror', None) or e}")
    try:
        state = json.loads(text)
        assert state["version"] == STATE_VERSION and set(fresh) <= set(state)
        assert set(new_stats()) <= set(state["stats"])
    except (ValueError, TypeError, KeyError, AssertionError):
        fail(f"{path} is not a traces.py state file: give another --state=PATH (or remove it to start over)")
    if state["source"] != source.name:
        fail(f"the state file {path} records the progress of {state['source']}, not {source.name}: give this source "
             f"its own --state=PATH")
    if state["project"] != args.wandb_project or args.wandb_entity and state["entity"] not in (None, args.wandb_entity):
        fail(f"the state file {path} belongs to the W&B run {state['run_id']} in project {state['project']}"
             f"{' of ' + state['entity'] if state['entity'] else ''}: use --wandb_project={state['project']}, or "
             f"give another --state=PATH to ingest into a new run")
    check_source(source, state, path)
    return state


def check_source(source, state, path):
    """The source must still begin with what the state says was ingested: a truncated, rotated or trimmed source
    would otherwise be read from the wrong place (traces skipped or repeated)."""
    if source.size() < state["position"] or source.head(state["position"]) != state["head"]:
        unit = "bytes" if isinstance(source, FileSource) else "elements"
        fail(f"{source.name} no longer starts with the {state['position']} {unit} {path} records as ingested "
             f"(truncated, replaced or trimmed): give another --state=PATH (or remove it) to ingest it into a new run")


def save_state(path, state):
    """Atomically: a crash leaves the old state or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# records: table rows and running aggregates


def parse(raw):
    """A trace record (dict) from a raw line or list element; None if it is not a JSON object."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return record if isinstance(record, dict) else None


def cell(value):
    """A value as a table cell: text, booleans and plain numbers as they are; lists, objects and numbers JSON tools
    mangle (NaN, ints past 2**53) as JSON text."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _printable(value)
    if isinstance(value, int) and abs(value) < 2**53 or isinstance(value, float) and abs(value) < float("inf"):
        return value
    try:
        return _printable(json.dumps(value, ensure_ascii=False))
    except (ValueError, RecursionError):
        return f"<{type(value).__name__} too deep to show>"


def row(record, columns):
    extra = {k: v for k, v in record.items() if k not in columns[:-1]}
    return [cell(record.get(c)) for c in columns[:-1]] + [cell(extra) if extra else None]


def number(value):
    """A value the aggregates count: an int or float (not a bool), >= 0 and < 1e12 (not NaN); else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e12
    return value if ok else None


def new_stats():
    return {"requests": 0, "routes": {r: 0 for r in (*ROUTES, "other")}, "errors": 0, "skipped": 0,
            "completion_tokens": 0, "speed_tokens": 0, "speed_seconds": 0.0, "latency_s": [], "ttft_s": []}


def count(stats, record):
    stats["requests"] += 1
    route = record.get("route")
    stats["routes"][route if isinstance(route, str) and route in ROUTES else "other"] += 1
    status, tokens = number(record.get("status")), number(record.get("completion_tokens"))
    latency, ttft = number(record.get("latency_s")), number(record.get("ttft_s"))
    stats["errors"] += status is not None and status >= 400
    stats["completion_tokens"] += tokens or 0
    if status is not None and status < 400:
        if latency is not None:
            stats["latency_s"].append(latency)
        if ttft is not None:
            stats["ttft_s"].append(ttft)
        if tokens is not None and latency is not None:
            stats["speed_tokens"] += tokens
            stats["speed_seconds"] += latency


def metrics(stats):
    m = {"requests": stats["requests"], **{f"requests_{r}": n for r, n in stats["routes"].items()},
         "errors": stats["errors"], "skipped": stats["skipped"], "completion_tokens": stats["completion_tokens"]}
    for name in ("latency", "ttft"):
        values = stats[f"{name}_s"]
        if values:  # no value yet: no metric (not a 0 that would read as a measurement)
            p50, p95 = np.percentile(values, [50, 95])
            m[f"{name}_p50_s"], m[f"{name}_p95_s"] = float(p50), float(p95)
    if stats["speed_seconds"] > 0:
        m["tokens_per_s"] = stats["speed_tokens"] / stats["speed_seconds"]
    return m


# ----------------------------------------------------------------------------------------------------------------
# W&B


def import_wandb():
    try:
        import wandb
    except ImportError:
        fail("wandb is not installed: pip install wandb")
    return wandb


def start_run(wandb, args, state, source):
    entity = args.wandb_entity or state["entity"]
    try:
        run = wandb.init(project=args.wandb_project, entity=entity, name=args.run_name, id=state["run_id"],
                         resume="allow", config={"trace_source": source.name})
    except Exception as e:  # wandb's UsageError, CommError...: no key, no network, a bad entity
        fail(f"wandb.init failed ({type(e).__name__}: {e}): run `wandb login`, check --wandb_project/--wandb_entity, "
             f"or set WANDB_MODE=offline")
    state.update(run_id=run.id, entity=entity, step=max(state["step"], run.step))  # steps only go forward
    # a new Table per invocation: on a resumed run wandb continues the increments from the run's summary
    table = wandb.Table(columns=state["columns"], log_mode="INCREMENTAL", allow_mixed_types=True)
    return run, table


# ----------------------------------------------------------------------------------------------------------------


def _stop(signum, frame):
    global STOP
    if STOP:
        raise KeyboardInterrupt  # the second Ctrl-C: now
    STOP = True
    print("traces: stopping after this batch (Ctrl-C again to stop now)", file=sys.stderr, flush=True)


def wait(seconds):
    """Sleep, waking early for Ctrl-C (a signal handler that only sets a flag does not end time.sleep)."""
    end = time.monotonic() + seconds
    while not STOP and time.monotonic() < end:
        time.sleep(max(0.0, min(0.2, end - time.monotonic())))


def main(argv):
    args = parse_args(argv)
    source = open_source(args.source, args.redis_key)
    state_path = Path(args.state) if args.state else source.default_state()
    if isinstance(source, FileSource) and state_path.exists() and state_path.resolve() == source.path.resolve():
        fail(f"--state {state_path} is the trace file itself: give another path")
    lock_fd = lock(state_path)  # noqa: F841 (held until exit)
    state = load_state(state_path, source, args)
    wandb = import_wandb()
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    stats, run, table = state["stats"], None, None
    ingested = skipped = 0
    interrupted = False
    try:
        while True:
            try:
                raws, position = source.read(state["position"], args.batch_size)
                if not raws and args.follow:  # idle: or did the source shrink under us (it would stay idle)?
                    check_source(source, state, state_path)
            except Exception as e:  # Redis went away, the file vanished: progress is recorded, say why
                if not args.follow:
                    fail(f"cannot read {source.name} ({type(e).__name__}: {e}); progress so far is recorded")
                print(f"traces: cannot read {source.name} ({type(e).__name__}: {e}); retrying", file=sys.stderr)
                raws, position = [], state["position"]
            records, bad = [], 0
            for raw in raws:
                if not raw.strip():
                    continue  # a blank line is no record, and no error either
                record = parse(raw)
                if record is None:
                    bad += 1
                else:
                    records.append(record)
            if records and state["columns"] is None:  # fixed for the run's life: increments must agree
                state["columns"] = FIELDS + [c for c in CONTENT if any(c in r for r in records)] + ["extra"]
            if records and run is None:
                run, table = start_run(wandb, args, state, source)
            for record in records:
                table.add_data(*row(record, state["columns"]))
                count(stats, record)
            stats["skipped"] += bad
            skipped += bad
            if run is not None and (records or bad):
                run.log({TABLE_KEY: table, **metrics(stats)} if records else metrics(stats), step=state["step"])
                state["step"] += 1
            if raws:
                state.update(position=position, head=source.head(position))
                save_state(state_path, state)
                ingested += len(records)
                if args.follow or len(raws) == args.batch_size:
                    print(f"traces: +{len(records)} ({stats['requests']} in the run), position {position}", flush=True)
            if STOP or len(raws) < args.batch_size and not args.follow:
                break
            if len(raws) < args.batch_size:
                wait(args.interval)  # caught up: poll again later
    except KeyboardInterrupt:
        print("traces: interrupted; progress is recorded up to the last completed batch", file=sys.stderr)
        interrupted = True
    finally:
        if run is not None:
            run.finish()
    where = f"W&B run {state['run_id']} (project {args.wandb_project})" if state["run_id"] else "no W&B run yet"
    print(f"traces: ingested {ingested} new traces from {source.name} into {where}; {stats['requests']} in all; "
          f"{skipped} entries skipped (not a JSON object; {stats['skipped']} in all); position {state['position']}",
          flush=True)
    if interrupted:
        sys.exit(130)  # as a shell reports Ctrl-C


if __name__ == '__main__':
    main(sys.argv[1:])
