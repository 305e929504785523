"""
An OpenAI-compatible server for nanoforge checkpoints (trained out_dirs and Hugging Face directories of every
family), with continuous batching: concurrent requests share the model, one token per active row per step.

    python serve.py --init_from=out-shakespeare-char --port=8000 --model_name=shakespeare
    python serve.py --model small=out-small --model gemma=path/to/gemma-3-270m      # several models by name
    python serve.py --init_from=out --upstream http://127.0.0.1:8001/v1 --fallback small   # forward the rest
    python serve.py --init_from=out-small --model_name=gpt-oss-20b --upstream=http://127.0.0.1:8001/v1 \
        --short_prompt_chars=120 --fallback=gpt-oss-20b --trace_redis=redis://127.0.0.1:6379/0   # a gateway

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=50, stop=["\\n\\n"])
    client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Hi"}], stream=True)

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions (both also with
stream: true, as server-sent events ending in `data: [DONE]`), GET /health, and vLLM's tokenizer endpoints
POST /tokenize ({"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}), POST /detokenize
({"tokens": [ids]} -> {"prompt"}) and GET /tokenizer_info (eos_token etc.: lm-eval's remote tokenizer), each with an
optional model (default: the first; local models only). Parameters: model, prompt / messages, max_tokens
(max_completion_tokens), temperature, top_p, top_k (an extension, as vLLM), stop, seed, n, stream,
stream_options.include_usage, and log-probabilities as OpenAI and vLLM define them:
- completions: logprobs (0-20) gives each choice {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}
  of the most likely alternatives and the token itself, as vLLM], "text_offset"}; echo: true puts the prompt first
  in the text and in those lists (its first token's logprob and top_logprobs null); max_tokens 0 with echo scores
  the prompt and generates nothing (finish_reason "length"): the scoring idiom lm-eval's local-completions uses.
- chat: logprobs: true and top_logprobs (0-20) give {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}.
- Log-probabilities are of the model's own distribution (log_softmax of the logits, before temperature, top-k and
  top-p), as vLLM reports them by default; every sampled token has an entry, a stop token too (it ends the text
  and is not part of it), so echo + max_tokens 1 always ends in exactly one generated entry. Streamed chunks carry
  the entries of their tokens. Prompts are scored in the batcher's thread (engine.score), a token's text is
  tokenizer.decode([id]), its bytes its raw bytes.
Every other parameter is a 400 naming it ("unsupported parameter 'logit_bias'"), so a client never silently gets
less than it asked for: OpenAI's parameters this server does not implement (logit_bias, presence_penalty,
frequency_penalty, best_of, suffix, tools, tool_choice, functions, function_call, response_format, store,
service_tier, modalities...) are accepted only with a value that asks for nothing (null, 0, {}, [], best_of 1 or
n, response_format {"type": "text"}, store false; see NOT_IMPLEMENTED), other keys (vLLM's extras such as
repetition_penalty too) not at all. `user` and `metadata` (harmless tags) are accepted and ignored. The implemented
ones are type-checked ("logprobs": "yes" is a 400; top_logprobs needs logprobs: true, as OpenAI's): a boolean is
never a number, a float never an integer (n 2.0), counts have ranges (n 1-128, max_tokens 1-1e9, logprobs 0-20,
seed a 64-bit integer, signed or not). temperature (0-2), top_p (0-1, not 0) and top_k (-1 or 0: off) then go
through engine.sampling, the rule sample.py and GPT.generate apply too: a temperature below engine.GREEDY_BELOW
(1e-40, 5e-324) is greedy, the same text as temperature 0. Every body is checked whole before anything reads it
(check_values): NaN, Infinity and 1e999 (Python's json reads them) anywhere, text with a lone surrogate ("\\ud800",
which no encoding carries) in any value or key, or nesting deeper than MAX_DEPTH is a 400 naming the field's
path (temperature, messages.0.content, stop.1, metadata.run); so is a body nested too deep to parse.
Errors are OpenAI-style: {"error": {"message", "type", "param", "code"}}; every request to /v1/completions and
/v1/chat/completions has its trace line, a client that hangs up (while sending its body, too) as 499.

lm-evaluation-harness scores and generates through it, with no tokenizer of its own (tests/test_serve_eval.py):
    lm_eval --model local-completions --tasks hellaswag --model_args model=NAME,tokenizer_backend=remote,\
        base_url=http://127.0.0.1:8000/v1/completions,max_length=BLOCK_SIZE     # lm-eval's default is 2048
    lm_eval --model local-chat-completions --apply_chat_template --tasks gsm8k \
        --model_args model=NAME,base_url=http://127.0.0.1:8000/v1/chat/completions
tokenizer_info's chat_template is null: the chat format is applied here (render_prompt encodes each piece apart;
a template's text encoded whole by /tokenize would merge tokens across pieces), and lm-eval needs none:
local-chat-completions sends the messages. local-completions with --apply_chat_template and the remote tokenizer
fails in lm-eval 0.4.13 itself (it posts the message list to /tokenize as the prompt, which vLLM refuses too).

Chat renders messages in the model's chat format (tokenizer.render_prompt: plain for GPT-2, gemma, harmony for
GPT-OSS; --chat_format overrides) and stops at the format's stop tokens and strings. A completion without
max_tokens gets 16 tokens (as OpenAI's), a chat reply up to --default_max_tokens (256).

- --api_key KEY: /v1/* and the tokenizer endpoints need `Authorization: Bearer KEY` (401 otherwise; lm-eval
  sends it with auth_token=KEY); /health stays open.
- --upstream URL: requests for models not served here go to that OpenAI-compatible server (vLLM, another
  serve.py), streams passed through as they come; its models join /v1/models. With --short_prompt_chars=N the
  server is a gateway in front of it: a request for a local model whose prompt is longer than N characters
  (completions: the prompt, the longest of a list; chat: the messages' texts concatenated) goes upstream under
  the same model name, so clients do not change; short ones are answered here. When the upstream is down
  (connection refused, --upstream_connect_timeout, no headers within --upstream_timeout, or a 5xx answer),
  --fallback NAME answers from a local model instead (else 503), decided before a byte is sent, streams too;
  for Upstream.CHECK_EVERY_S after that, requests go to the fallback without asking. The route taken (local,
  upstream, fallback) is in the x-route response header and the trace. /health reports "gateway": "ok",
  "upstream_up" and the upstream's last probe (cached: at most one probe every CHECK_EVERY_S seconds).
- Traces: one record per completion request: time, id, endpoint, model (as asked), route, served_by (the local
  model or the upstream URL), stream, prompt_chars, prompt_tokens, completion_tokens, ttft_s (to the first token;
  to the first streamed byte upstream; null for a non-streamed upstream answer), latency_s, status (HTTP status;
  499 = the client hung up and its rows were dropped), finish_reason, error; the prompt and completion texts
  only with --trace_content=True (privacy by default). A forwarded stream is asked for its usage chunk (kept from
  a client that did not ask for it) so the token counts are known. Records go through a bounded queue drained by
  a thread (TraceSink): writing one never delays or fails a response; a full queue drops the record and counts it.
  --trace_redis=redis://HOST:PORT/DB pushes each onto the Redis list `llm_traces`; while Redis is down they go to
  the file instead and /health's "traces" counts them (diverted_to_file, dropped). traces.py ingests either into
  Weights & Biases.
- --trace_file (default out-serve/trace.jsonl): the JSONL trace, a line per record. Lines are ASCII JSON (what a
  client sent comes back whole); a failed write is said on stderr, never fails the request. It appends only to a
  new file or a trace of its own: a symbolic link to a file, a hard-linked file (it might be a checkpoint's), a
  file that is not a trace, a directory: refused at startup (TraceLog).
- Every flag is checked at startup (ranges, choices, a chat format the tokenizer cannot render, a trace file it
  must not write, an address it cannot bind): one line `error: ...` naming the flag, exit 2, before the server
  listens. A model whose tokenizer cannot render its default chat format serves completions only (chat: 404).
- On CPU the model gets one thread fewer than there are cores (--threads) for small steps, so the HTTP side keeps a
  core (oversubscribed, torch's parallel ops stall at their barriers); steps of more than MANY_ROWS rows (a big
  batch, a prefill) take every core, which their matmuls need more.
- --quantize=int8 (CPU): weight-only int8 (ops.quantize_int8), a quarter of the weight bytes each decode step reads:
  for one or a few clients (1 client: 2.1x float32's tokens/s; 8: about even; 32: 0.4x, since prefills and steps
  of more than 8 rows dequantise every weight per forward; bench.py --mode=serve --serve_args=--quantize=int8).

How it works, top to bottom:
- Batcher: one background thread owns a model and runs continuous batching on the engine (engine.py: the KV
  cache's slots, prefill, the decode step, the sampler, the stop-string streamer). Each step it admits waiting
  rows (echoed prompts sent first, scored in one engine.score pass when they asked for log-probabilities; then one
  prefill forward for all that generate, whole prompts up to --max_prefill_tokens in all; a longer prompt is
  prefilled that many tokens a step in a cache of its own and then joins the batch, so the running rows keep
  decoding meanwhile), then decodes one token for every active row at once; the events
  go back to each request's queue. Every row samples with its own settings in one batched pass; a seeded row
  draws its uniforms from its own generator, so its draws do not depend on what else is in the batch.
- ops.BatchedHead (CPU): the output head in the matrix layout that suits the batch size.
- The HTTP layer (FastAPI on uvicorn): validation, chat rendering, SSE, upstream forwarding, a JSONL trace.
"""

import argparse
import asyncio
import codecs
import collections
import hmac
import json
import math
import os
import re
import socket
import stat
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

import checkpoint
import devices
import engine
import ops
import tokenizer as tokenizer_lib
from tokenizer import TokenizerError

# ----------------------------------------------------------------------------------------------------------------
# the batcher: one thread owns the model


@dataclass(eq=False)
class Row:
    """One sequence to decode: one choice of one request."""
    req: "GenRequest"
    index: int                  # the choice's index in the response
    prompt: list
    max_new: int
    temperature: float          # temperature, top_p, top_k: the row's engine.Sampling settings
    top_p: float | None
    top_k: int | None
    generator: torch.Generator | None  # the row's own uniforms, when the request has a seed
    stop_ids: frozenset
    text: engine.TextStream
    echo: bool = False          # the prompt comes first in the text (and in the log-probabilities)
    logprobs: int | None = None  # each token's log-probability with this many top alternatives; None: not asked
    produced: int = 0
    last: int = -1              # the last sampled token, fed at the next step
    done: bool = False
    side: "engine.KVCache | None" = None  # a long prompt's own cache while it is prefilled in chunks
    fed: int = 0                # of its prompt tokens, those prefilled so far


@dataclass
class Event:
    """What a request's queue receives: text of a choice, its end, an error (from the batcher), or "gone" (from
    the request's watchdog, when the client hangs up). A text event of a row that asked for log-probabilities
    carries its tokens, (token id, logprob, top) each: top the row's `logprobs` likeliest alternatives as
    (token id, logprob), likeliest first; logprob and top are None for a prompt's first token (nothing predicts
    it). Tokens come when sampled, their text may come later (held back by the stop-string streamer); a stop token
    has an entry but no text."""
    kind: str                   # "text" | "done" | "error" | "gone"
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    tokens: list = field(default_factory=list)


class GenRequest:
    """A request's rows and the asyncio queue their events go to."""

    def __init__(self, loop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.rows, self.cancelled = [], False

    def cancel(self):
        self.cancelled = True  # the worker drops this request's rows at its next step


def _deliver(events):
    for req, event in events:
        req.queue.put_nowait(event)


def deliver(events):
    """Hand a step's events to their event loops: one wake-up per loop and step, not one per token."""
    by_loop = collections.defaultdict(list)
    for req, event in events:
        by_loop[req.loop].append((req, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            for req, _ in items:
                req.cancelled = True


MANY_ROWS = 16  # rows (decoding rows + prompt tokens) in a step from which it runs on every core (Batcher)


class Batcher:
    """Continuous batching over an engine.KVCache. Each step: drop cancelled rows, admit waiting rows (echoed
    prompts first, scored in one engine.score pass when they asked for log-probabilities; then one prefill forward
    for all that generate, their first tokens sampled from it), then one decode forward for every active row. A
    row leaves the batch as soon as it finishes, and its slot is reused at the next step.

    Chunked prefill: a step prefills whole prompts of up to max_prefill_tokens tokens in all. A longer prompt is
    prefilled max_prefill_tokens at a time, one chunk per step, in a cache of its own (the oldest such prompt
    first), and joins the batch (KVCache.adopt) after its last chunk; the running rows keep decoding a token every
    step meanwhile, instead of stalling for the whole prompt's forward."""

    def __init__(self, model, name="model", max_batch=64, max_prefill_tokens=512, threads=None):
        self.model, self.name = model, name
        self.threads = threads  # (few rows, many rows): CPU threads by the size of a step (Batcher._set_threads)
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        # the longest row (<= block_size) plus the longest remaining run (<= block_size)
        self.cache = engine.KVCache(model, rows=min(4, max_batch), width=256, max_width=2 * model.config.block_size)
        self.active, self.waiting = [], collections.deque()
        self.partial = collections.deque()  # admitted rows whose long prompts are being prefilled in chunks
        self.cond = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)  # unseeded rows
        self.outbox = []  # (request, event) pairs of the current step
        self.thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self.thread.start()

    def submit(self, req):
        with self.cond:
            self.waiting.extend(req.rows)
            self.cond.notify()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def load(self):
        return {"active": len(self.active), "waiting": len(self.waiting), "prefilling": len(self.partial),
                "cache_columns": self.cache.width, "cache_rows": self.cache.rows}

    # -- the worker ------------------------------------------------------------------------------------------

    def _run(self):
        while True:
            with self.cond:
                while not self.stopping and not (self.waiting or self.active or self.partial):
                    self.cond.wait()
                if self.stopping:
                    break
                admit = self._take()
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    rows = self._echo(admit)
                    whole = [r for r in rows if not self._chunked(r)]
                    self.partial.extend(r for r in rows if self._chunked(r))
                    self._set_threads(len(self.active) + sum(len(r.prompt) for r in whole)
                                      + (self.max_prefill_tokens if self.partial else 0))
                    if whole:
                        self._prefill(whole)
                        self._flush()  # the new rows' first tokens go out now, not after the decode step below
                    if self.partial:
                        self._prefill_chunk()
                        self._flush()
                    if self.active:
                        self._decode()
                self.steps += 1
            except Exception as e:  # a failed forward fails the rows in flight, not the server
                message = f"generation failed: {type(e).__name__}: {e}"
                print(f"serve: {self.name}: {message}", file=sys.stderr, flush=True)
                for row in {*self.active, *admit, *self.partial}:
                    if not row.done:
                        row.done = True
                        self.outbox.append((row.req, Event("error", row.index, text=message)))
                self.active, self.cache.n, self.cache.col = [], 0, 0
                self.partial.clear()
            self._flush()

    def _set_threads(self, rows):
        """A step of few rows (decoding a small batch) runs fastest on one thread fewer than the cores, which keeps a
        core for the HTTP side; past MANY_ROWS rows (a big batch, a prefill) the matmuls need every core."""
        if self.threads:
            wanted = self.threads[rows > MANY_ROWS]
            if wanted != torch.get_num_threads():
                torch.set_num_threads(wanted)

    def _flush(self):
        if self.outbox:
            deliver(self.outbox)
            self.outbox = []

    def _take(self):
        """Waiting rows that fit this step, first come first served: free slots, and whole prompts of up to
        max_prefill_tokens tokens in all; a longer prompt takes its slot now and is prefilled in chunks."""
        taken, tokens, slots = [], 0, 0
        while self.waiting and len(self.active) + len(self.partial) + slots < self.max_batch:
            row = self.waiting[0]
            if row.req.cancelled:
                self.waiting.popleft()
                continue
            whole = not self._chunked(row)
            if whole and tokens + len(row.prompt) > self.max_prefill_tokens:
                break
            taken.append(self.waiting.popleft())
            tokens += len(row.prompt) if whole else 0
            slots += row.max_new > 0  # a row with nothing to generate (echo, max_tokens 0) takes no slot
        return taken

    def _chunked(self, row):
        """Whether the row's prompt is too long for one step's prefill (it is prefilled in chunks)."""
        return len(row.prompt) > self.max_prefill_tokens

    def _drop_cancelled(self):
        for row in [r for r in self.partial if r.req.cancelled]:
            row.done = True
            self.partial.remove(row)
        for i in reversed(range(len(self.active))):
            if self.active[i].req.cancelled:
                self.active[i].done = True
                self._remove(i)

    def _remove(self, i):
        last = len(self.active) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.active[i] = self.active[last]
        self.active.pop()
        self.cache.n -= 1

    def _echo(self, rows):
        """Admission's first part: each echo row's prompt goes out as its first text (with the prompt's
        log-probabilities when it asked); rows with nothing to generate end here. Returns the rows to prefill."""
        scores = self._score_prompts([r for r in rows if r.echo and r.logprobs is not None])
        for row in rows:
            if row.echo:
                tokens = scores[tuple(row.prompt)] if row.logprobs is not None else []
                tokens = [(t, lp, top if top is None else top[:row.logprobs]) for t, lp, top in tokens]
                self.outbox.append((row.req, Event("text", row.index, row.text.decode(row.prompt), tokens=tokens)))
            if row.max_new == 0:
                row.done = True
                self.outbox.append((row.req, Event("done", row.index, finish_reason="length")))
        return [r for r in rows if not r.done]

    def _score_prompts(self, rows):
        """{prompt: its tokens as Event entries} for these rows, in one engine.score pass (each distinct prompt
        once): every token after the first given the ones before it, with the most alternatives any row asked for."""
        prompts = list(dict.fromkeys(tuple(r.prompt) for r in rows))
        scored = [p for p in prompts if len(p) > 1]
        top_n = max((r.logprobs for r in rows), default=0)
        results = engine.score(self.model, [(list(p[:1]), list(p[1:])) for p in scored], top_n) if scored else []
        out = {p: [(p[0], None, None)] for p in prompts}
        for p, s in zip(scored, results):
            out[p] += list(zip(p[1:], s.logprobs, s.top))
        return out

    def _prefill(self, rows):
        if not rows:
            return
        need = max(row.max_new - row.produced for row in self.active + rows)
        first = self.cache.n
        logits = engine.prefill(self.model, self.cache, [r.prompt for r in rows], need)
        self.active.extend(rows)
        self._sample_and_emit(logits, list(range(first, first + len(rows))))

    def _prefill_chunk(self):
        """The next max_prefill_tokens tokens of the oldest long prompt, into its own cache; after its last chunk
        its row joins the batch and samples its first token."""
        row = self.partial[0]
        chunk = row.prompt[row.fed:row.fed + self.max_prefill_tokens]
        if row.side is None:
            row.side = engine.KVCache(self.model, rows=1, width=len(row.prompt), max_width=self.cache.max_width)
            logits = engine.prefill(self.model, row.side, [chunk], need=len(row.prompt) - len(chunk))
        else:
            logits = engine.append(self.model, row.side, torch.tensor([chunk], device=row.side.device))
        row.fed += len(chunk)
        if row.fed < len(row.prompt):
            return
        self.partial.popleft()
        self.cache.adopt(row.side, max(r.max_new - r.produced for r in self.active + [row]))
        row.side = None
        self.active.append(row)
        self._sample_and_emit(logits, [len(self.active) - 1])

    def _decode(self):
        logits = engine.decode_one_token(self.model, self.cache, [r.last for r in self.active])
        self._sample_and_emit(logits, list(range(len(self.active))))

    def _sample(self, logits, rows):
        u = torch.tensor([torch.rand((), generator=r.generator or self.generator).item() for r in rows])
        return engine.sample(logits, rows, u)

    def _sampled_logprobs(self, logits, rows, tokens):
        """Each row's Event entry for its sampled token, None for rows that did not ask: one log_softmax over the
        logits of the rows that did (the model's distribution, before temperature, top-k and top-p)."""
        want = [k for k, row in enumerate(rows) if row.logprobs is not None]
        out = [None] * len(rows)
        if not want:
            return out
        top_n = max(rows[k].logprobs for k in want)
        chosen, (values, ids) = engine.logprobs(logits[want], [tokens[k] for k in want], top_n)
        chosen, values, ids = chosen.tolist(), values.tolist() if top_n else [], ids.tolist() if top_n else []
        for j, k in enumerate(want):
            n = rows[k].logprobs
            out[k] = (tokens[k], chosen[j], list(zip(ids[j][:n], values[j][:n])) if n else [])
        return out

    def _sample_and_emit(self, logits, slots):
        rows = [self.active[s] for s in slots]
        tokens = self._sample(logits, rows)
        finished = []
        for slot, row, token, entry in zip(slots, rows, tokens, self._sampled_logprobs(logits, rows, tokens)):
            row.produced += 1
            row.last = token
            if token in row.stop_ids:  # a stop token ends the text; it is not part of it
                text, reason = row.text.flush(), "stop"
            else:
                text, hit = row.text.push(token)
                reason = "stop" if hit else "length" if row.produced >= row.max_new else None
                if reason == "length":
                    text += row.text.flush()
            if text or entry:
                self.outbox.append((row.req, Event("text", row.index, text, tokens=[entry] if entry else [])))
            if reason is not None:
                row.done = True
                self.outbox.append((row.req, Event("done", row.index, finish_reason=reason,
                                                   completion_tokens=row.produced)))
                finished.append(slot)
        for slot in sorted(finished, reverse=True):
            self._remove(slot)
        self._flush()


# ----------------------------------------------------------------------------------------------------------------
# models: load a checkpoint, its tokenizer and its chat format


@dataclass(eq=False)
class LocalModel:
    name: str
    path: str
    model: object
    tokenizer: object
    chat_format: str | None          # None: not a chat model here (its tokenizer cannot render the default format)
    batcher: Batcher
    completion_stop_ids: frozenset   # <|endoftext|> ends a plain completion
    chat_stop_ids: frozenset
    chat_stop_strings: list
    created: int = field(default_factory=lambda: int(time.time()))
    no_chat: str | None = None       # why chat_format is None

    @property
    def block_size(self):
        return self.model.config.block_size


def _family(model, path):
    """The model's Hugging Face family (gpt2, gemma3_text, gpt_oss), which picks the default chat format."""
    import hf
    try:
        return hf.family_of(model.config)
    except ValueError:  # a config no HF architecture expresses: let the path speak
        return str(path)


class StartupError(Exception):
    """A setting the server cannot honour, found while loading; the message names the flag (exit 2)."""


CHAT_PROBE = [{"role": "system", "content": ""}, {"role": "user", "content": ""},
              {"role": "assistant", "content": ""}, {"role": "user", "content": ""}]


def chat_format_problem(tok, chat_format):
    """Why `tok` cannot render chat_format (None when it can): each role's turn is rendered once, with empty
    content, so a format the tokenizer lacks (harmony's special tokens, a character its char vocabulary lacks)
    is found at startup, not in every request."""
    if chat_format not in tokenizer_lib.CHAT_FORMATS:
        return f"unknown chat format {chat_format!r} (expected one of {', '.join(tokenizer_lib.CHAT_FORMATS)})"
    probe = CHAT_PROBE if chat_format == "gemma" else CHAT_PROBE[:1] + [{"role": "developer", "content": ""}] + \
        CHAT_PROBE[1:]
    try:
        tokenizer_lib.render_prompt(tok, probe, chat_format)
        tokenizer_lib.render_chat(tok, probe[:-1], chat_format)
        tokenizer_lib.stop_tokens(tok, chat_format)
        tokenizer_lib.stop_strings(tok, chat_format)
    except ValueError as e:  # TokenizerError too
        return str(e)
    return None


def load_local_model(name, path, device, dtype, chat_format=None, tokenizer=None, max_batch=64,
                     max_prefill_tokens=512, quantize="", threads=None):
    """A checkpoint (out_dir or Hugging Face directory / hub id, via checkpoint.load_model) with its tokenizer,
    chat format and a batcher of its own. A chat format the tokenizer cannot render is a StartupError when
    --chat_format or the checkpoint's meta.json names it; the default one (plain, gemma or harmony by family and
    tokenizer) makes the model a completions-only one instead (chat requests: 404, as OpenAI's for such models)."""
    model, meta = checkpoint.load_for_inference(path, device, dtype, tokenizer=tokenizer, quantize=quantize)
    if torch.device(device).type == "cpu" and not quantize:
        engine.prepare_for_decoding(model)  # faster one-token matmuls on CPU
        model.lm_head = ops.BatchedHead(model.lm_head)
    tok = tokenizer_lib.load_tokenizer(meta)
    flag = chat_format
    chat_format = flag or tokenizer_lib.default_chat_format(meta, _family(model, path))  # meta.json's, if it names one
    problem, no_chat = chat_format_problem(tok, chat_format), None
    if problem and flag:
        raise StartupError(f"--chat_format {chat_format!r} cannot be used with model {name!r} ({path}): {problem}")
    if problem and meta.get("chat_format"):
        raise StartupError(f"model {name!r} ({path}): its meta.json names chat format {chat_format!r}, which it "
                           f"cannot use: {problem} (override it with --chat_format)")
    if problem:
        chat_format, no_chat = None, f"its tokenizer cannot render its default chat format: {problem}"
    chat_stop_ids = tokenizer_lib.stop_tokens(tok, chat_format) if chat_format else []
    chat_stop_strings = tokenizer_lib.stop_strings(tok, chat_format) if chat_format else []
    eot = frozenset([tok.eot_token] if tok.eot_token is not None else [])
    batcher = Batcher(model, name, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens, threads=threads)
    return LocalModel(name, _printable(path), model, tok, chat_format, batcher, eot, frozenset(chat_stop_ids),
                      list(chat_stop_strings), no_chat=no_chat)


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-style errors and request validation


def _printable(text):
    """Text any encoder can write: a lone surrogate (from a client's "\\ud800", or a non-UTF-8 path) as \\ud800."""
    return text if text is None else str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _show(value, limit=80):
    """A client's value for an error message: its repr, cut to `limit` characters (a 10 MB string is not echoed)."""
    text = {math.inf: "Infinity", -math.inf: "-Infinity"}.get(value, "NaN") if isinstance(value, float) and \
        not math.isfinite(value) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class APIError(Exception):
    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        message, param = _printable(message), _printable(param)  # the response and the trace can always carry it
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body, key, default, lo, hi, integer=False, name=None):
    """body[key] (default when absent or null): a number (an integer when `integer`; never a boolean, never a
    float for an integer, NaN and infinities never) in [lo, hi], else a 400 naming the parameter."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not lo <= value <= hi:  # NaN fails every comparison
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name or key}' must be {kind} between {lo} and {hi}, got {_show(value)}",
                       param=name or key, code="invalid_value")
    return value


def _boolean(body, key, default=False, name=None):
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name or key}' must be a boolean, got {_show(value)}", param=name or key,
                       code="invalid_value")
    return value


def _sampling(temperature, top_k, top_p):
    """The request's engine.Sampling, by engine.sampling's rule (the one sample.py and GPT.generate apply: finite
    numbers, a temperature below engine.GREEDY_BELOW is greedy, top_k 0 / top_p 1 are off); a value it refuses is a
    400 naming that parameter."""
    for key, kwargs in (("temperature", {"temperature": temperature}), ("top_k", {"top_k": top_k}),
                        ("top_p", {"top_p": top_p})):
        try:
            engine.sampling(**kwargs)
        except ValueError as e:
            raise APIError(400, str(e), param=key, code="invalid_value") from None
    return engine.sampling(temperature, top_k, top_p)


# Every key of a request is read or refused, so no client silently gets less than it asked for. Read: the keys of
# each endpoint below. Accepted and ignored: `user` (an end-user id for a provider's abuse monitoring) and `metadata`
# (tags for stored completions; nothing is stored here). Refused (400 "unsupported parameter 'KEY'"): every other
# key, except the parameters OpenAI defines that this server does not implement when they carry a value that asks
# for nothing (their default, listed in NOT_IMPLEMENTED).
METADATA = {"user", "metadata"}
SAMPLING_KEYS = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
                 "stream_options", "logprobs"}
COMPLETION_KEYS = SAMPLING_KEYS | {"prompt", "echo"}
CHAT_KEYS = SAMPLING_KEYS | {"messages", "max_completion_tokens", "top_logprobs"}
TOKENIZE_KEYS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
NOT_IMPLEMENTED = {  # parameter: the values that ask for nothing (best_of also equal to n)
    "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, True, False),  # without tools it means nothing
    "store": (None, False), "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]),
}


def check_parameters(body, known, endpoint):
    """400 naming the first key of body that is neither read (`known`), metadata, nor an unimplemented parameter
    that asks for nothing."""
    for key, value in body.items():
        if key in known or key in METADATA:
            continue
        if key not in NOT_IMPLEMENTED:
            raise APIError(400, f"unsupported parameter {_show(key)}: {endpoint} here takes "
                           f"{', '.join(sorted(known))}", param=key, code="unsupported_parameter")
        if key == "best_of" and value is not None and not _is_int(value):
            raise APIError(400, f"'best_of' must be an integer, got {_show(value)}", param=key, code="invalid_value")
        if not any(_same(value, nothing) for nothing in NOT_IMPLEMENTED[key]) and \
                not (key == "best_of" and _same(value, body.get("n", 1))):
            raise APIError(400, f"unsupported parameter '{key}': this server does not implement it (leave it out, or "
                           f"send {NOT_IMPLEMENTED[key][1]!r})", param=key, code="unsupported_parameter")


def _same(a, b):
    """a == b, where a boolean equals only a boolean (True is not best_of 1, 0 is not store: false)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _logprobs_asked(body, chat):
    """How many top alternatives come with each token's log-probability (0-20), or None when none are asked for:
    completions' `logprobs` (a count), chat's `logprobs` (a boolean) with `top_logprobs` (a count; OpenAI refuses
    it without logprobs: true)."""
    if not chat:
        return _number(body, "logprobs", None, 0, 20, integer=True)
    wanted = _boolean(body, "logprobs")
    top = _number(body, "top_logprobs", None, 0, 20, integer=True)
    if top is not None and not wanted:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    return (top or 0) if wanted else None


def _tokenize(param, fn, *args, **kwargs):
    """Run a tokenizer call on client text; its complaints (a character outside a char tokenizer's vocabulary,
    a conversation the chat format cannot render: ValueErrors) become a 400 naming `param`."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None


@dataclass
class GenSpec:
    prompts: list          # token id lists, one per prompt
    n: int
    max_tokens: list       # per prompt
    temperature: float
    top_p: float | None
    top_k: int | None
    stops: list
    stop_ids: frozenset
    seed: int | None
    stream: bool
    include_usage: bool
    echo: bool = False          # completions: the prompt first, in the text and the log-probabilities
    logprobs: int | None = None  # top alternatives per token (see _logprobs_asked); None: no log-probabilities


def _message_text(content, i):
    """A message's content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if content is None:
        return ""
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages.{i}.content", code="invalid_value")


def parse_messages(body):
    """The request's messages as {"role", "content": str} dicts (render_prompt checks the roles)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages", code="invalid_value")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param=f"messages.{i}", code="invalid_value")
        msgs.append({"role": m.get("role"), "content": _message_text(m.get("content"), i)})
    return msgs


def encode_text(tok, text):
    """A prompt string's ids: special-token text such as <|endoftext|> is the special token (as vLLM's and Hugging
    Face's tokenizers read it); a char tokenizer has none."""
    return _tokenize("prompt", tok.encode, text, allow_special=tok.name != "char")


def _chat_model(lm):
    """404 for a model served without a chat format, as OpenAI's for a completions-only model."""
    if lm.chat_format is None:
        raise APIError(404, f"'{lm.name}' is not a chat model here ({lm.no_chat}): use /v1/completions, or restart "
                       f"the server with a --chat_format its tokenizer can render", param="model",
                       code="model_not_chat")


def parse_request(lm, body, chat, default_max_tokens):
    """Validate an OpenAI request body against a local model; raises APIError (400) on bad input."""
    check_parameters(body, *((CHAT_KEYS, "/v1/chat/completions") if chat else (COMPLETION_KEYS, "/v1/completions")))
    tok, block = lm.tokenizer, lm.block_size
    if chat:
        _chat_model(lm)
        prompts = [_tokenize("messages", tokenizer_lib.render_prompt, tok, parse_messages(body), lm.chat_format)]
        param = "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            prompt = [prompt]  # one prompt of token ids
        if not isinstance(prompt, list) or not prompt:
            raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt",
                           code="invalid_value")
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                ids = encode_text(tok, p)
            elif isinstance(p, list) and all(_is_int(t) for t in p):
                if any(not 0 <= t < lm.model.config.vocab_size for t in p):
                    raise APIError(400, "prompt token ids must be in [0, vocab_size)", param="prompt",
                                   code="invalid_value")
                ids = list(p)
            else:
                raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt",
                               code="invalid_value")
            if not ids:  # an empty prompt starts a new document
                if tok.eot_token is None:
                    raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
                ids = [tok.eot_token]
            prompts.append(ids)
        param = "prompt"
    echo = _boolean(body, "echo")
    # 0: score the prompt (echo); chat's max_completion_tokens (OpenAI's newer name) wins, both are checked
    lowest = 0 if echo else 1
    requested = _number(body, "max_tokens", None, lowest, 10**9, integer=True)
    key = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        newer = _number(body, "max_completion_tokens", None, lowest, 10**9, integer=True)
        if requested is not None and requested != newer:
            raise APIError(400, f"'max_tokens' ({requested}) and 'max_completion_tokens' ({newer}) disagree: give one",
                           param="max_completion_tokens", code="invalid_value")
        requested, key = newer, "max_completion_tokens"
    longest = max(len(p) for p in prompts)
    if longest + (requested != 0) > block:
        raise APIError(400, f"This model's maximum context length is {block} tokens, but the {param} has "
                       f"{longest} tokens" + (", leaving no room for a completion." if requested != 0 else "."),
                       param=param, code="context_length_exceeded")
    if requested is not None and longest + requested > block:
        raise APIError(400, f"This model's maximum context length is {block} tokens. However, you requested "
                       f"{longest + requested} tokens ({longest} in the {param}, {requested} in the completion). "
                       f"Please reduce the {param} or the completion length.", param=key,
                       code="context_length_exceeded")
    default = default_max_tokens if chat else 16
    max_tokens = [requested if requested is not None else min(default, block - len(p)) for p in prompts]
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = list(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of up to 16 strings", param="stop", code="invalid_value")
    stops = [s for s in stops if s]
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_value")
    for option in options:
        if option != "include_usage":
            raise APIError(400, f"unsupported stream option {_show(option)}: stream_options here takes "
                           f"include_usage", param=f"stream_options.{option}", code="unsupported_parameter")
    include_usage = _boolean(options, "include_usage", name="stream_options.include_usage")
    seed = _number(body, "seed", None, -2**63, 2**64 - 1, integer=True)  # a choice's generator: (seed + index) mod 2^64
    # sampling: OpenAI's ranges (temperature 0-2, top_p 0-1; top_k -1 is vLLM's "off"), then engine.sampling's rule
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1)
    top_k = _number(body, "top_k", None, -1, 10**9, integer=True)
    sampling = _sampling(temperature, 0 if top_k == -1 else top_k, top_p)
    stop_ids = lm.chat_stop_ids if chat else lm.completion_stop_ids
    n = _number(body, "n", 1, 1, 128, integer=True)
    if len(prompts) * n > 256:
        raise APIError(400, f"{len(prompts)} prompts x n={n} asks for more than 256 completions in one request",
                       param="n", code="invalid_value")
    return GenSpec(prompts=prompts, n=n, max_tokens=max_tokens, temperature=sampling.temperature,
                   top_p=sampling.top_p, top_k=sampling.top_k, stops=stops + (lm.chat_stop_strings if chat else []),
                   stop_ids=stop_ids, seed=seed, stream=stream, include_usage=include_usage, echo=echo,
                   logprobs=_logprobs_asked(body, chat))


def make_rows(lm, spec, req):
    """A row per (prompt, choice); choice index = prompt_index * n + j, as OpenAI numbers them."""
    rows = []
    for p, (ids, max_new) in enumerate(zip(spec.prompts, spec.max_tokens)):
        for j in range(spec.n):
            index = p * spec.n + j
            generator = None if spec.seed is None else torch.Generator().manual_seed((spec.seed + index) % 2**64)
            rows.append(Row(req, index, ids, max_new, spec.temperature, spec.top_p, spec.top_k, generator,
                            spec.stop_ids, engine.TextStream(lm.tokenizer.decode, spec.stops), spec.echo,
                            spec.logprobs))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# the trace: one JSON line per request, flushed as written


class TraceError(Exception):
    """A --trace_file the server must not write to; the message names the path and why."""


class TraceLog:
    """The JSONL trace: one line per request, flushed as written. It appends only to a file of its own: a new
    file, or an existing trace (one whose first line is a record of ours). It never writes through a link or
    into a file it did not make (a --trace_file pointing into a checkpoint would corrupt it): a symbolic link to a
    file, a file with more than one hard link, or a file that is not a trace is refused (TraceError, the server's
    one-line startup error). Character devices and pipes (/dev/null, /dev/stdout) take the lines as they come.
    write() never raises and never drops a record for its content: lines are ASCII JSON (a lone surrogate a
    client sent is written as \\ud800, which reads back as the same string), values JSON cannot hold as their
    repr; a failed write (disk full) is said once on stderr."""

    MAGIC = b'{"time": '  # how every record starts (App.generate's record: "time" first)

    @classmethod
    def check(cls, path):
        """Refuse a path the trace must not be written to, without creating anything; TraceError says why."""
        path = Path(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except NotADirectoryError:
            st = None  # under a file: found below
        except OSError as e:
            raise TraceError(f"{path}: {e.strerror or e}") from None
        if st is not None and stat.S_ISLNK(st.st_mode):
            try:
                target = os.stat(path)
            except OSError:
                target = None
            if target is None or stat.S_ISREG(target.st_mode) or stat.S_ISDIR(target.st_mode):
                raise TraceError(f"{path} is a symbolic link (to {os.readlink(path)}): the trace is written only to "
                                 f"a file of its own, never through a link; give a new file's path")
            return  # a link to a device or a pipe, such as /dev/stdout
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise TraceError(f"{path} is a directory: give a file path, e.g. {path / 'trace.jsonl'}")
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    raise TraceError(f"{path} has {st.st_nlink} hard links: the trace is never written through a "
                                     f"link into another file; give a new file's path")
                if st.st_size:
                    try:
                        with open(path, "rb") as f:
                            head = f.read(len(cls.MAGIC))
                    except OSError as e:
                        raise TraceError(f"cannot read {path}: {e.strerror or e}") from None
                    if head != cls.MAGIC:
                        raise TraceError(f"{path} is not a trace of this server (it does not start with a trace "
                                         f"record): the trace appends only to its own file; give a new file's path")
            return
        for parent in path.absolute().parents:  # a new file: its nearest existing folder must be a folder
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise TraceError(f"{path} cannot be created: {parent} is not a directory")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise TraceError(f"{path} cannot be created: {parent} is not writable")
                return

    def __init__(self, path):
        self.path = Path(path)
        self.check(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_symlink():  # checked: to a device or a pipe (O_NONBLOCK: a pipe without a reader fails)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
            else:  # O_NOFOLLOW: a link put here since the check is refused by the kernel
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise TraceError(f"cannot open {self.path}: {e.strerror or e}") from None
        st = os.fstat(fd)
        self.newline_first = False
        problem = None
        if stat.S_ISREG(st.st_mode):  # the file now held, checked again: no race with the path checks
            if self.path.is_symlink():
                problem = f"{self.path} is a symbolic link to a file: give a new file's path"
            elif st.st_nlink > 1:
                problem = f"{self.path} has {st.st_nlink} hard links: give a new file's path"
            elif st.st_size and os.pread(fd, len(self.MAGIC), 0) != self.MAGIC:
                problem = f"{self.path} is not a trace of this server: give a new file's path"
            elif st.st_size:  # a line cut short (a crash mid-write) is not continued by the next record
                self.newline_first = os.pread(fd, 1, st.st_size - 1) != b"\n"
        else:
            os.set_blocking(fd, True)
        if problem:
            os.close(fd)
            raise TraceError(problem)
        self.fd, self.failing = fd, False
        self.lock = threading.Lock()

    @staticmethod
    def line(record):
        """The record as one line of ASCII JSON, whatever its values hold."""
        try:
            return json.dumps(record, ensure_ascii=True, allow_nan=False, default=repr) + "\n"
        except (ValueError, TypeError, RecursionError):  # NaN or a cycle: such values as their repr
            def plain(v):
                return v is None or isinstance(v, (str, int, bool)) or isinstance(v, float) and math.isfinite(v)
            try:
                return json.dumps({str(k): v if plain(v) else repr(v) for k, v in record.items()},
                                  ensure_ascii=True) + "\n"
            except Exception as e:
                return json.dumps({"time": time.time(), "trace_error": f"{type(e).__name__}: {e}"},
                                  ensure_ascii=True) + "\n"

    def write(self, record):
        self.write_line(self.line(record))

    def write_line(self, line):
        data = line.encode("ascii")
        with self.lock:
            if self.newline_first:
                data = b"\n" + data
            try:
                view = memoryview(data)
                if self.fd is None:
                    raise OSError("the trace is closed")
                while view:  # O_APPEND: each write lands at the end
                    view = view[os.write(self.fd, view):]
                self.newline_first = self.failing = False
            except OSError as e:
                self.newline_first = self.newline_first or len(view) < len(data)  # a part went out: end it
                if not self.failing:
                    print(f"serve: cannot write the trace {_printable(self.path)}: {e.strerror or e} "
                          f"(said once until a write succeeds)", file=sys.stderr, flush=True)
                self.failing = True

    def close(self):
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


class TraceSink:
    """Where trace records go, off the request path: put() only appends to a bounded queue (a full queue drops the
    record and counts it in /health), and one thread writes the records, in order, to Redis (--trace_redis: RPUSH
    onto the `llm_traces` list, as JSON strings) or to the JSONL file (TraceLog). While Redis cannot be reached the
    file takes them (said once on stderr) and Redis is tried again every REDIS_RETRY_S seconds."""

    REDIS_KEY, REDIS_RETRY_S, BATCH = "llm_traces", 2.0, 256

    def __init__(self, file, redis_url=None, max_queued=10000):
        self.file, self.redis_url, self.max_queued = file, redis_url, max_queued
        self.queue, self.cond, self.closing = collections.deque(), threading.Condition(), False
        self.redis, self.redis_error, self.retry_at = None, None, 0.0
        self.accepted = self.to_redis = self.to_file = self.diverted = self.dropped = 0
        self.thread = threading.Thread(target=self._drain, name="trace-sink", daemon=True)
        self.thread.start()

    def put(self, record):
        with self.cond:
            if len(self.queue) >= self.max_queued or self.closing:
                self.dropped += 1
                return
            self.queue.append(record)
            self.accepted += 1
            self.cond.notify()

    def _drain(self):
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if not self.queue:
                    return
                batch = [self.queue.popleft() for _ in range(min(len(self.queue), self.BATCH))]
            lines = [TraceLog.line(record) for record in batch]
            if self.redis_url is None or not self._push(lines):
                for line in lines:
                    self.file.write_line(line)
                self.to_file += len(lines)
                self.diverted += len(lines) if self.redis_url else 0

    def _push(self, lines):
        """RPUSH the lines in one command; False (the file takes them) while Redis cannot be reached."""
        if time.monotonic() < self.retry_at:
            return False
        try:
            if self.redis is None:
                import redis
                self.redis = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
            self.redis.rpush(self.REDIS_KEY, *(line.rstrip("\n") for line in lines))
        except Exception as e:  # redis.RedisError, OSError: down, restarting, refusing writes
            if self.redis_error is None:
                print(f"serve: cannot write traces to Redis ({type(e).__name__}: {e}): they go to "
                      f"{_printable(self.file.path)} until it is back", file=sys.stderr, flush=True)
            self.redis_error, self.retry_at = f"{type(e).__name__}: {e}", time.monotonic() + self.REDIS_RETRY_S
            return False
        if self.redis_error is not None:
            print("serve: Redis is back: traces go to it again", file=sys.stderr, flush=True)
            self.redis_error = None
        self.to_redis += len(lines)
        return True

    def state(self):
        out = {"sink": "redis" if self.redis_url else "file", "file": str(self.file.path), "queued": len(self.queue),
               "pending": self.accepted - self.to_file - self.to_redis,  # queued, or being written now
               "written_file": self.to_file, "dropped": self.dropped}
        if self.redis_url:
            out.update(redis="down" if self.redis_error else "up", redis_error=self.redis_error,
                       written_redis=self.to_redis, diverted_to_file=self.diverted)
        return out

    def close(self, timeout=10.0):
        """Write what is queued (up to `timeout` seconds), then close the file."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join(timeout)
        self.file.close()


# ----------------------------------------------------------------------------------------------------------------
# the HTTP layer


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def watch(req, request, poll=0.5):
    """Runs beside a request: every `poll` seconds, asks whether the client is still there; when it is not,
    queues a "gone" event so the handler stops (and its rows leave the batch)."""
    while not req.cancelled:
        await asyncio.sleep(poll)
        if await request.is_disconnected():
            req.queue.put_nowait(Event("gone"))
            return


class Logprobs:
    """One choice's log-probabilities in OpenAI's shape, built from Event entries as they come: completions' four
    parallel lists (tokens, token_logprobs, top_logprobs: {token: logprob} of the alternatives and the token itself,
    as vLLM gives them; text_offset), chat's content list (token, logprob, bytes, top_logprobs). A token's text is
    tok.decode([id]); its offset counts the characters of the text before it, decoding the tokens' bytes as they
    come (a token may end in the middle of a character)."""

    def __init__(self, tok, chat):
        self.tok, self.chat = tok, chat
        self.utf8, self.offset = codecs.getincrementaldecoder("utf-8")("replace"), 0
        self.all = self.empty()

    def empty(self):
        return {"content": []} if self.chat else {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                  "text_offset": []}

    def add(self, entries):
        """The part for these entries (a stream chunk's); the whole response's grows by it too."""
        part = self.empty()
        for token, logprob, top in entries:
            if self.chat:
                part["content"].append({**self.item(token, logprob), "top_logprobs": [self.item(*t) for t in top]})
            else:
                text = self.tok.decode([token])
                part["tokens"].append(text)
                part["token_logprobs"].append(_finite(logprob))
                if top is not None:  # the token first: an alternative of the same text (as likely or more) wins
                    top = {text: _finite(logprob), **{self.tok.decode([t]): _finite(v) for t, v in top}}
                part["top_logprobs"].append(top)
                part["text_offset"].append(self.offset)
            self.offset += len(self.utf8.decode(self.tok.token_bytes(token)))
        for key, values in part.items():
            self.all[key] += values
        return part

    def item(self, token, logprob):
        return {"token": self.tok.decode([token]), "logprob": _finite(logprob),
                "bytes": list(self.tok.token_bytes(token))}


def _finite(logprob):
    """JSON has no -Infinity: a token the model rules out gets -9999.0, as vLLM reports it."""
    return logprob if logprob is None else max(logprob, -9999.0)


class Reply:
    """One local completion request's answer as it builds up: OpenAI's response and chunk shapes, and the tallies
    the usage and the trace need."""

    def __init__(self, model_name, chat, n_choices, prompt_tokens, tok=None, logprobs=False):
        self.chat, self.prompt_tokens, self.closed = chat, prompt_tokens, False
        self.head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                     "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                     "model": model_name}
        self.texts, self.finishes, self.completion_tokens = [""] * n_choices, [None] * n_choices, 0
        self.first_text_at = None  # the trace's time to first token
        self.logprobs = [Logprobs(tok, chat) for _ in range(n_choices)] if logprobs else None

    def add(self, event):
        """Tally an event; a text event's log-probabilities part (None when not asked for)."""
        if event.kind == "text":
            if self.first_text_at is None:
                self.first_text_at = time.time()
            self.texts[event.index] += event.text
            return self.logprobs[event.index].add(event.tokens) if self.logprobs else None
        self.finishes[event.index] = event.finish_reason
        self.completion_tokens += event.completion_tokens
        return None

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def chunk(self, index, text=None, finish=None, role=False, logprobs=None):
        """A streamed event: a role announcement (chat), new text (with its tokens' log-probabilities), or a
        choice's finish."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return sse({**self.head, "choices": [choice]})

    def body(self):
        """The whole (not streamed) response."""
        logprobs = [lp.all for lp in self.logprobs] if self.logprobs else [None] * len(self.texts)
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp,
                        "finish_reason": f} for i, (t, f, lp) in enumerate(zip(self.texts, self.finishes, logprobs))]
        else:
            choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f}
                       for i, (t, f, lp) in enumerate(zip(self.texts, self.finishes, logprobs))]
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "usage": self.usage()}


async def events(req, n_choices):
    """A request's events until every choice is done. Raises ClientGone when the client hung up, APIError (500)
    when generation failed."""
    left = n_choices
    while left:
        event = await req.queue.get()
        if event.kind == "gone":
            raise ClientGone()
        if event.kind == "error":
            raise APIError(500, event.text, type="server_error")
        left -= event.kind == "done"
        yield event


async def stream(reply, req, include_usage, close):
    """The server-sent events of a streamed request; close() runs however it ends."""
    status, error = 200, None
    try:
        if reply.chat:
            for i in range(len(reply.texts)):
                yield reply.chunk(i, role=True)
        try:
            async for event in events(req, len(reply.texts)):
                logprobs = reply.add(event)
                yield reply.chunk(event.index, event.text, logprobs=logprobs) if event.kind == "text" else \
                    reply.chunk(event.index, finish=event.finish_reason)
        except APIError as e:
            status, error = e.status, e.message
            yield sse(e.body())
        if include_usage and status == 200:
            yield sse({**reply.head, "choices": [], "usage": reply.usage()})
        yield "data: [DONE]\n\n"
    except (ClientGone, asyncio.CancelledError, GeneratorExit, OSError):
        status, error = 499, "client disconnected"
        raise
    finally:
        await close(status, error)


def EventStream(events, close, media_type="text/event-stream", headers=None):
    """A StreamingResponse of server-sent events that always runs close() when it ends: normally the
    generator's own `finally` does, but a client that hangs up before the first event is sent leaves the
    generator unstarted, and then only the response knows."""
    from starlette.responses import StreamingResponse

    class _EventStream(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                await close()

    return _EventStream(events, media_type=media_type, headers={"cache-control": "no-cache",
                                                                 "x-accel-buffering": "no", **(headers or {})})


class Upstream:
    """An OpenAI-compatible server (vLLM, another serve.py) for the models not served here."""

    CHECK_EVERY_S = 2.0  # /health probes the upstream at most this often; a request that found it down skips it
    # that long too (and falls back at once), so a host that swallows connections costs one connect timeout

    def __init__(self, url, api_key=None, connect_timeout=3.0, timeout=600.0):
        import httpx
        base = url.rstrip("/")
        self.url = base.removesuffix("/v1")
        self.api_key = api_key
        # timeout: for each read, the response's headers included (a non-streamed answer comes whole)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=connect_timeout), trust_env=False)
        self.state = {"url": url, "status": "unknown", "checked": None, "error": None}

    def fresh(self):
        """Whether the last word on the upstream's state is recent enough to act on without asking again."""
        return self.state["checked"] is not None and time.time() - self.state["checked"] < self.CHECK_EVERY_S

    def mark(self, up, error=None):
        self.state.update(status="up" if up else "down", checked=time.time(), error=error)

    def headers(self, request):
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        elif request is not None and request.headers.get("authorization"):
            headers["authorization"] = request.headers["authorization"]
        return headers

    async def check(self, timeout=2.0):
        """Ask the upstream for its models: the health probe, and its model list."""
        import httpx
        try:
            r = await self.client.get(f"{self.url}/v1/models", headers=self.headers(None), timeout=timeout)
        except httpx.HTTPError as e:
            self.mark(False, f"{type(e).__name__}: {e}")
            return None
        self.mark(r.status_code < 500, None if r.status_code < 500 else f"HTTP {r.status_code}")
        try:
            return r.json().get("data") if r.status_code == 200 else None
        except ValueError:
            return None

    async def open(self, path, body_bytes, request):
        """Send the request on; returns the httpx response (headers read, body not yet), or None when the
        upstream cannot be reached."""
        import httpx
        req = self.client.build_request("POST", f"{self.url}{path}", content=body_bytes,
                                        headers=self.headers(request))
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.TransportError as e:
            self.mark(False, f"{type(e).__name__}: {e}")
            return None
        if resp.status_code >= 500:  # it answered, but cannot serve: down, as far as a fallback is concerned
            self.mark(False, f"HTTP {resp.status_code}")
        else:
            self.mark(True)  # errors it sends back (4xx) are the client's to see
        return resp


class App:
    """The server's state: local models, the upstream, the trace, the settings."""

    def __init__(self, models, upstream=None, fallback=None, api_key=None, trace=None, default_max_tokens=256,
                 short_prompt_chars=None, trace_content=False):
        self.models = {lm.name: lm for lm in models}
        self.default = models[0].name if models else None
        self.upstream, self.fallback, self.api_key = upstream, fallback, api_key
        self.trace, self.default_max_tokens = trace, default_max_tokens
        self.short_prompt_chars, self.trace_content = short_prompt_chars, trace_content

    def log(self, record):
        if self.trace is not None:
            self.trace.put(record)

    def check_auth(self, request):
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def goes_upstream(self, name, chars):
        """Models not served here go upstream; with --short_prompt_chars, so do local models' long prompts (the
        upstream serves the same name: the client cannot tell which answered, but for the x-route header)."""
        if self.upstream is None:
            return False
        return name not in self.models or self.short_prompt_chars is not None and chars > self.short_prompt_chars

    # -- POST /v1/completions and /v1/chat/completions -----------------------------------------------------------

    async def generate(self, request, chat):
        from fastapi.responses import JSONResponse, Response
        t0 = time.time()
        record = {"time": t0, "id": "trace-" + uuid.uuid4().hex, "endpoint": request.url.path, "model": None,
                  "route": "local", "served_by": None, "stream": False, "prompt_chars": None, "prompt_tokens": None,
                  "completion_tokens": None, "ttft_s": None, "latency_s": None, "status": None}

        def done(status, error=None, **extra):
            record.update(status=status, latency_s=round(time.time() - t0, 4), **extra)
            if error:
                record["error"] = error
            self.log(record)

        try:
            self.check_auth(request)
            raw = await read_body(request)
            body = json_object(raw)
            name = body.get("model", self.default)
            if not isinstance(name, str):
                raise APIError(400, "'model' must be a string", param="model", code="invalid_value")
            record["model"], record["stream"] = name, body.get("stream") is True
            lm = self.models.get(name)
            record["prompt_chars"] = prompt_chars(body, chat, lm.tokenizer if lm else None)
            if self.trace_content:
                record["prompt"] = body.get("messages" if chat else "prompt")
            if self.goes_upstream(name, record["prompt_chars"]):
                response = await self.forward(request, raw, body, record, done)
                if response is not None:
                    return response
                if self.fallback is None:
                    raise APIError(503, f"The upstream server {self.upstream.state['url']} is unreachable "
                                   f"({self.upstream.state['error']})", type="upstream_error", code="upstream_down")
                record["route"] = "fallback"
                lm = self.models[self.fallback]
            elif lm is None:
                raise APIError(404, f"The model '{name}' does not exist (served here: "
                               f"{', '.join(self.models) or 'none'})", param="model", code="model_not_found")
            record["served_by"] = lm.name
            return await self.local(request, lm, body, chat, record, done)
        except APIError as e:
            done(e.status, e.message)
            return JSONResponse(e.body(), status_code=e.status, headers=route_header(record))
        except ClientGone:
            done(499, "client disconnected")
            return Response(status_code=499)
        except Exception as e:  # a bug: the handler below answers 500; the trace says so too
            if record["status"] is None:
                done(500, f"{type(e).__name__}: {e}")
            raise

    async def local(self, request, lm, body, chat, record, done):
        from fastapi.responses import JSONResponse
        spec = parse_request(lm, body, chat, self.default_max_tokens)
        req = GenRequest(asyncio.get_running_loop())
        req.rows = make_rows(lm, spec, req)
        reply = Reply(lm.name, chat, len(req.rows), sum(len(p) for p in spec.prompts), lm.tokenizer,
                      spec.logprobs is not None)
        record["prompt_tokens"] = reply.prompt_tokens
        lm.batcher.submit(req)
        watchdog = asyncio.ensure_future(watch(req, request))

        def finished(status, error=None):
            content = {"completion": reply.texts} if self.trace_content else {}
            ttft = None if reply.first_text_at is None else round(reply.first_text_at - record["time"], 4)
            done(status, error, completion_tokens=reply.completion_tokens, finish_reason=reply.finishes,
                 ttft_s=ttft, **content)

        async def close(status=499, error="client disconnected"):
            """Once per stream, however it ends: the rows leave the batch, the trace gets its line."""
            if not reply.closed:
                reply.closed = True
                req.cancel()
                watchdog.cancel()
                finished(status, error)

        if spec.stream:
            return EventStream(stream(reply, req, spec.include_usage, close), close, headers=route_header(record))
        try:  # an error or a client gone: generate() answers and traces it
            async for event in events(req, len(req.rows)):
                reply.add(event)
        finally:
            req.cancel()  # a no-op when every row is done; else (client gone, error) they leave the batch
            watchdog.cancel()
        finished(200)
        return JSONResponse(reply.body(), headers=route_header(record))

    async def forward(self, request, raw, body, record, done):
        """Pass the request to the upstream, streaming included; None when it is down (cannot be reached, timed
        out before its headers, or answered 5xx) and a fallback can answer instead: decided before a byte is sent."""
        from fastapi.responses import Response
        record.update(route="upstream", served_by=self.upstream.state["url"])
        if self.fallback is not None and self.upstream.state["status"] == "down" and self.upstream.fresh():
            return None
        hide_usage = False
        if body.get("stream") is True and not (isinstance(body.get("stream_options"), dict)
                                               and body["stream_options"].get("include_usage") is True):
            # the trace needs the token counts: ask for the usage chunk, and keep it from the client
            raw = json.dumps({**body, "stream_options": {**(body.get("stream_options") or {}),
                                                         "include_usage": True}}).encode()
            hide_usage = True
        resp = await self.upstream.open(request.url.path, raw, request)
        if resp is None or resp.status_code >= 500 and self.fallback is not None:
            if resp is not None:
                await resp.aclose()
            return None
        media_type = resp.headers.get("content-type", "application/json")
        if body.get("stream") is True and resp.status_code == 200:
            close = self.closer(resp, record, done)
            return EventStream(self.passthrough(resp, record, close, hide_usage), close, media_type=media_type,
                               headers=route_header(record))
        content = await resp.aread()
        await resp.aclose()
        try:
            answer = json.loads(content)
            u = answer.get("usage") or {}
            record.update(prompt_tokens=u.get("prompt_tokens"), completion_tokens=u.get("completion_tokens"))
            if self.trace_content:
                record["completion"] = [c.get("text") if "text" in c else (c.get("message") or {}).get("content")
                                        for c in answer.get("choices") or []]
        except (ValueError, AttributeError, TypeError):
            pass
        done(resp.status_code, None if resp.status_code < 400 else content[:500].decode("utf-8", "replace"))
        return Response(content, status_code=resp.status_code, media_type=media_type, headers=route_header(record))

    def closer(self, resp, record, done):
        """A forwarded stream's close(): once, however it ends."""
        closed = False

        async def close(status=499, error="client disconnected"):
            nonlocal closed
            if not closed:
                closed = True
                await resp.aclose()
                done(status, error)
        return close

    async def passthrough(self, resp, record, close, hide_usage):
        """The upstream's server-sent events as they come, event by event: their usage chunk fills the trace's
        token counts (and is dropped when only the trace asked for it), their texts the trace's completion."""
        rest, texts, status, error = b"", {}, 200, None
        try:
            async for piece in resp.aiter_raw():
                if record["ttft_s"] is None:
                    record["ttft_s"] = round(time.time() - record["time"], 4)
                complete, rest = sse_events(rest + piece)
                for event in complete:
                    data = sse_json(event)
                    if isinstance(data, dict):
                        usage, choices = data.get("usage"), data.get("choices")
                        if isinstance(usage, dict):
                            record.update(prompt_tokens=usage.get("prompt_tokens"),
                                          completion_tokens=usage.get("completion_tokens"))
                            if hide_usage and not choices:
                                continue
                        if self.trace_content:
                            add_texts(texts, choices)
                    yield event
            if rest:
                yield rest
        except (asyncio.CancelledError, GeneratorExit, OSError):
            status, error = 499, "client disconnected"
            raise
        except Exception as e:  # the upstream broke off mid-stream
            status, error = 502, f"upstream stream failed: {type(e).__name__}: {e}"
        finally:
            if self.trace_content:
                record["completion"] = [texts[i] for i in sorted(texts)]
            await close(status, error)

    # -- GET /v1/models and /health ------------------------------------------------------------------------------

    async def list_models(self, request):
        self.check_auth(request)
        data = [{"id": lm.name, "object": "model", "created": lm.created, "owned_by": "nanoforge",
                 "max_model_len": lm.block_size} for lm in self.models.values()]
        if self.upstream is not None:
            for m in await self.upstream.check() or []:
                if isinstance(m, dict) and m.get("id") not in self.models:
                    data.append(m)
        return {"object": "list", "data": data}

    async def get_model(self, request, model_id):
        for m in (await self.list_models(request))["data"]:
            if m.get("id") == model_id:
                return m
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    # -- vLLM's tokenizer endpoints: /tokenize, /detokenize, /tokenizer_info (lm-eval's remote tokenizer) ----------

    def local_model(self, name):
        """A local model by name (None: the first); tokenizing is not forwarded upstream."""
        if name is None:
            name = self.default
        if not isinstance(name, str) or name not in self.models:
            raise APIError(404, f"The model {name!r} is not served here (local: {', '.join(self.models) or 'none'})",
                           param="model", code="model_not_found")
        return self.models[name]

    async def tokenize(self, request):
        """{"prompt": str} (read as a completion prompt is) or {"messages": [...]} (rendered in the chat format,
        with the assistant header unless add_generation_prompt is false) -> {"count", "max_model_len", "tokens"}.
        add_special_tokens is accepted either way: our tokenizers add none (no BOS)."""
        self.check_auth(request)
        body = json_object(await read_body(request))
        check_parameters(body, TOKENIZE_KEYS, "/tokenize")
        lm = self.local_model(body.get("model"))
        _boolean(body, "add_special_tokens", True)
        if ("prompt" in body) == ("messages" in body):
            raise APIError(400, "give either 'prompt' (a string) or 'messages'", param="prompt", code="invalid_value")
        if "messages" in body:
            _chat_model(lm)
            msgs = parse_messages(body)
            if _boolean(body, "add_generation_prompt", True):
                ids = _tokenize("messages", tokenizer_lib.render_prompt, lm.tokenizer, msgs, lm.chat_format)
            else:
                ids = _tokenize("messages", tokenizer_lib.render_chat, lm.tokenizer, msgs, lm.chat_format)[0]
        elif isinstance(body["prompt"], str):
            ids = encode_text(lm.tokenizer, body["prompt"])
        else:
            raise APIError(400, "'prompt' must be a string", param="prompt", code="invalid_value")
        return {"count": len(ids), "max_model_len": lm.block_size, "tokens": ids}

    async def detokenize(self, request):
        """{"tokens": [ids]} -> {"prompt": their text}."""
        self.check_auth(request)
        body = json_object(await read_body(request))
        check_parameters(body, {"model", "tokens"}, "/detokenize")
        tok = self.local_model(body.get("model")).tokenizer
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < tok.vocab_size for t in ids):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {tok.vocab_size})", param="tokens",
                           code="invalid_value")
        return {"prompt": tok.decode(ids)}

    async def tokenizer_info(self, request):
        """What lm-eval's remote tokenizer reads (eos_token, bos_token, pad_token, chat_template) and a little
        more. eos_token is <|endoftext|>, null for a char tokenizer (it has none); there is no BOS or pad token;
        chat_template is null (see the module docstring): clients send messages to /v1/chat/completions (or
        /tokenize) and the server renders them in the model's chat format."""
        self.check_auth(request)
        lm = self.local_model(request.query_params.get("model"))
        tok = lm.tokenizer
        return {"tokenizer_class": f"nanoforge.{type(tok).__name__}", "name": tok.name,
                "eos_token": tok.decode([tok.eot_token]) if tok.eot_token is not None else None,
                "bos_token": None, "pad_token": None, "chat_template": None, "chat_format": lm.chat_format,
                "vocab_size": tok.vocab_size, "model_max_length": lm.block_size}

    async def health(self):
        """The gateway's state: "status" ok or degraded (the upstream down), "upstream_up", each model's load, the
        upstream's last probe (at most every Upstream.CHECK_EVERY_S seconds) and the trace sink's counters."""
        out = {"status": "ok", "gateway": "ok",
               "models": {name: {"path": lm.path, "chat_format": lm.chat_format, **lm.batcher.load()}
                          for name, lm in self.models.items()}}
        if self.upstream is not None:
            if not self.upstream.fresh():
                await self.upstream.check()
            up = self.upstream.state["status"] == "up"
            out.update(upstream_up=up, upstream=dict(self.upstream.state), fallback=self.fallback,
                       short_prompt_chars=self.short_prompt_chars)
            if not up:
                out["status"] = "degraded"
        if self.trace is not None:
            out["traces"] = self.trace.state()
        return out


MAX_DEPTH = 64  # objects and lists in a request body nest at most this deep (OpenAI's own need a handful)


def json_object(raw):
    """A request body that must be a JSON object, checked whole by check_values: every later step (validation,
    tokenizers, the trace, the response) can take any value in it. Nesting too deep for the parser (a 100k '[')
    is a 400 too."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"The request body nests too deeply (objects and lists at most {MAX_DEPTH} levels "
                       f"deep)", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_json")
    check_values(body)
    return body


def check_values(body):
    """Refuse (400 naming the field's path, e.g. messages.0.content) what no parameter can mean and what would
    break later: numbers that are not finite (Python's json reads NaN, Infinity and 1e999), text that cannot be
    encoded (a lone surrogate such as "\\ud800", in a value or a key), nesting deeper than MAX_DEPTH. Walked
    with a stack, not recursion."""
    stack = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"'{path}' must be a finite number, got {_show(value)} (JSON has no NaN or Infinity)",
                           param=path, code="invalid_value")
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise APIError(400, f"'{path}' nests deeper than {MAX_DEPTH} levels", param=path.split(".")[0],
                               code="invalid_value")
            children = []
            for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
                child = f"{path}.{key}" if path else str(key)
                if isinstance(key, str):
                    _check_text(key, child)
                children.append((item, child, depth + 1))
            stack.extend(reversed(children))  # the first bad field is named first


def _check_text(text, path):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"'{path}' is not valid Unicode text: it holds a lone surrogate "
                       f"(U+{ord(text[e.start]):04X} at character {e.start}), which no encoding can carry",
                       param=path, code="invalid_value") from None


async def read_body(request):
    """The request's body; ClientGone when the client hangs up before it is all sent (traced as 499)."""
    from starlette.requests import ClientDisconnect
    try:
        return await request.body()
    except ClientDisconnect:
        raise ClientGone() from None


def route_header(record):
    """Which way a request went (local, upstream, fallback): the client's only sign of it."""
    return {"x-route": record["route"]}


def prompt_chars(body, chat, tok=None):
    """The prompt's size in characters, as --short_prompt_chars routes by it: a chat request's message texts
    concatenated, a completion's prompt (the longest of a list; token ids as the local tokenizer decodes them).
    A body too malformed to measure counts 0: it stays here and gets its 400."""
    try:
        if chat:
            return sum(len(m["content"]) for m in parse_messages(body))
        prompt = body.get("prompt")
        if isinstance(prompt, str) or isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            prompt = [prompt]
        return max((len(p) if isinstance(p, str) else len(tok.decode(list(p))) if tok else len(p)
                    for p in prompt), default=0)
    except Exception:  # APIError, a decode of ids out of range, a prompt of the wrong type
        return 0


def sse_events(buffer):
    """Split the complete server-sent events off a buffer: (events, the rest); each keeps its blank-line end."""
    events, start = [], 0
    for m in re.finditer(rb"\r\n\r\n|\n\n|\r\r", buffer):
        events.append(buffer[start:m.end()])
        start = m.end()
    return events, buffer[start:]


def sse_json(event):
    """An event's `data: {...}` as a dict (None for [DONE], comments, anything else)."""
    text = event.decode("utf-8", "replace").strip()
    if not text.startswith("data: {"):
        return None
    try:
        return json.loads(text[6:])
    except ValueError:
        return None


def add_texts(texts, choices):
    """Add a chunk's choices' texts (completions' text, chat's delta content) to texts[index]."""
    for c in choices if isinstance(choices, list) else []:
        if isinstance(c, dict):
            piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            if isinstance(piece, str):
                texts[c.get("index", 0)] = texts.get(c.get("index", 0), "") + piece


def build_app(state):
    """The FastAPI application around an App."""
    from contextlib import asynccontextmanager
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        yield
        for lm in state.models.values():
            lm.batcher.stop()
        if state.upstream is not None:
            await state.upstream.client.aclose()

    app = FastAPI(title="nanoforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(ClientGone)
    async def client_gone(request, e):  # nobody reads it: the status is for the access log
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def server_error(request, e):
        print(f"serve: {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await state.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await state.generate(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        return await state.list_models(request)

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        return await state.get_model(request, model_id)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await state.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await state.detokenize(request)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        return await state.tokenizer_info(request)

    @app.get("/health")
    async def health():
        return await state.health()

    return app


# ----------------------------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        fail(f"{message} (python serve.py --help)", code=2)


def fail(message, code=1):
    """Startup errors: one line on stderr (text any terminal takes: a non-UTF-8 path as \\udcff), a non-zero exit:
    2 for a setting the user can fix."""
    print("error: " + " ".join(_printable(message).split()), file=sys.stderr, flush=True)
    sys.exit(code)


def say(line):
    print(_printable(line), flush=True)


def _int_in(lo, hi=None):
    """An argparse type: an integer in [lo, hi] (argparse names the flag in its one-line error)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < lo or hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be {f'between {lo} and {hi}' if hi is not None else f'>= {lo}'}, "
                                             f"got {value}")
        return value
    return parse


def _seconds(text):
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= 86400):
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds (not 0), got {text!r}")
    return value


def _bool(text):
    """An argparse type for --flag=True/False, as configurator.py spells booleans."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"must be True or False, got {text!r}")
    return value


def check_redis_url(url):
    """A --trace_redis URL redis-py can connect with (redis://, rediss://, unix://); a one-line reason if not."""
    try:
        import redis
    except ImportError:
        return "needs the redis client: pip install redis"
    try:
        redis.connection.ConnectionPool.from_url(url)
    except Exception as e:  # ValueError for a scheme, port or db it cannot read
        return f"must be redis://HOST:PORT/DB (or rediss://, unix://), got {url!r}: {e}"
    return None


MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))  # far past the cores torch only slows down (and 1e5 crashes it)


def parse_args(argv):
    """The flags, each checked here (or, for what needs the checkpoint, while loading), so a setting the server
    cannot honour fails at startup in one line naming the flag (exit 2), never in every request."""
    p = _Parser(description="OpenAI-compatible server for nanoforge checkpoints (see the docstring of serve.py).")
    p.add_argument("--init_from", help="a checkpoint to serve: an out_dir, or a Hugging Face directory or hub id")
    p.add_argument("--model_name", help="the name clients ask for (default: the checkpoint's folder name)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="serve another checkpoint under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_int_in(0, 65535), default=8000,
                   help="0: any free port (the ready line says which)")
    p.add_argument("--api_key", default=None, help="require 'Authorization: Bearer <key>' on /v1")
    p.add_argument("--upstream", default=None, metavar="URL",
                   help="OpenAI-compatible server (e.g. vLLM at http://host:8000/v1) for other models")
    p.add_argument("--upstream_api_key", default=None, help="key for the upstream (default: the client's own)")
    p.add_argument("--fallback", default=None, metavar="NAME",
                   help="local model that answers when the upstream is down")
    p.add_argument("--short_prompt_chars", type=_int_in(0), default=None, metavar="N",
                   help="with --upstream: prompts (chat: the messages' text) of at most N characters are answered "
                   "by the local model, longer ones upstream under the same model name (e.g. 120)")
    p.add_argument("--upstream_connect_timeout", type=_seconds, default=3.0,
                   help="seconds to connect to the upstream before it counts as down (then --fallback answers)")
    p.add_argument("--upstream_timeout", type=_seconds, default=600.0,
                   help="seconds the upstream may take for its headers, and between streamed pieces")
    p.add_argument("--trace_redis", default=None, metavar="URL",
                   help="redis://HOST:PORT/DB: push each trace onto the llm_traces list (the file while it is down)")
    p.add_argument("--trace_content", type=_bool, default=False,
                   help="True: traces hold the prompt and completion texts (default: only sizes and timings)")
    p.add_argument("--trace_file", default=None, help="JSONL, a line per request (default: out-serve/trace.jsonl); "
                   "a new file or a trace of this server's, never a link")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--chat_format", default=None, choices=tokenizer_lib.CHAT_FORMATS,
                   help="override the models' chat format")
    p.add_argument("--tokenizer", default=None,
                   help="override the checkpoints' tokenizer (e.g. gpt2 for a Hugging Face gemma3-compact)")
    p.add_argument("--max_batch", type=_int_in(1), default=64,
                   help="rows decoded together, per model (more wait, first come first served; the KV cache "
                   "grows with the rows in use, not with this)")
    p.add_argument("--max_prefill_tokens", type=_int_in(1), default=512,
                   help="prompt tokens prefilled per step: whole prompts up to this many in all; a longer prompt "
                        "is prefilled this many tokens a step while the running rows keep decoding")
    p.add_argument("--quantize", default="", choices=checkpoint.QUANTIZE,
                   help="int8: weight-only int8 on CPU, for one or a few clients (1 client: ~2x float32's "
                        "tokens/s; prefills and steps of more than 8 rows dequantise each weight: slower); '' = off")
    p.add_argument("--default_max_tokens", type=_int_in(1), default=256,
                   help="chat max_tokens when the request has none")
    p.add_argument("--threads", type=_int_in(0, MAX_THREADS), default=0,
                   help="torch CPU threads; 0: one fewer than the CPU count for small steps (a core stays free "
                        "for HTTP), all of them for steps of more than 16 rows")
    p.add_argument("--log_level", default="warning", type=str.lower,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (info shows every request)")
    args = p.parse_args(argv)
    for flag in ("init_from", "model_name", "host", "trace_file", "tokenizer", "api_key", "upstream",
                 "upstream_api_key", "fallback", "device", "trace_redis"):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            fail(f"--{flag} is empty: give a value or leave the flag out", code=2)
    for flag in ("api_key", "upstream_api_key"):  # sent and compared as an HTTP header: visible ASCII
        value = getattr(args, flag)
        if value is not None and not (value.isascii() and value.isprintable() and " " not in value):
            fail(f"--{flag} must be printable ASCII without spaces (it travels in an HTTP header)", code=2)
    if args.upstream_api_key and not args.upstream:
        fail("--upstream_api_key needs --upstream", code=2)
    specs = []
    if args.init_from:
        specs.append((args.model_name or Path(args.init_from.rstrip("/")).name or args.init_from, args.init_from,
                      "--init_from"))
    elif args.model_name:
        fail("--model_name names the --init_from checkpoint: give --init_from too", code=2)
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            fail(f"--model takes NAME=PATH, got {item!r}", code=2)
        specs.append((name, path, f"--model {name}=..."))
    for name, *_ in specs:  # clients send it in JSON: it must be text
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            fail(f"model name {name!r} is not UTF-8 text: give --model_name (or --model NAME=PATH)", code=2)
    names = [n for n, *_ in specs]
    if len(set(names)) != len(names):
        fail(f"two models are named {sorted(n for n in names if names.count(n) > 1)[0]!r}: give --model_name",
             code=2)
    if not specs and not args.upstream:
        fail("nothing to serve: give --init_from=PATH, --model NAME=PATH or --upstream URL", code=2)
    if args.fallback and args.fallback not in names:
        fail(f"--fallback {args.fallback!r} is not a local model (local: {', '.join(names) or 'none'})", code=2)
    if args.fallback and not args.upstream:
        fail("--fallback needs --upstream", code=2)
    if args.short_prompt_chars is not None and not (args.upstream and specs):
        fail("--short_prompt_chars routes long prompts to --upstream and short ones to a local model: give both "
             "--upstream URL and --init_from (or --model)", code=2)
    if args.trace_redis and (problem := check_redis_url(args.trace_redis)):
        fail(f"--trace_redis {problem}", code=2)
    if args.upstream:
        from urllib.parse import urlsplit
        try:
            url = urlsplit(args.upstream)
            url.port  # noqa: B018 (a ValueError when the port is not a number in range)
            ok = url.scheme in ("http", "https") and bool(url.hostname)
        except ValueError:
            ok = False
        if not ok:
            fail(f"--upstream must be an http(s) URL with a host (http://host:port/v1), got {args.upstream!r}",
                 code=2)
    if args.tokenizer:
        try:
            tokenizer_lib.load_tokenizer({"tokenizer": args.tokenizer})
        except TokenizerError as e:
            fail(f"--tokenizer {args.tokenizer!r}: {e}", code=2)
    return args, specs


def bind(host, port):
    """Bind the listening socket before loading anything, so a taken port fails at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of a socket that says so; without
        # it a response's body waits for the ACK of its headers (a delayed ACK: 40 ms a request on Linux)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.set_inheritable(True)
        return sock
    except (OSError, ValueError, UnicodeError, OverflowError) as e:  # taken, not ours, no such host, bad text
        fail(f"cannot listen on --host {host} --port {port}: {getattr(e, 'strerror', None) or e}", code=2)


def main(argv=None):
    args, specs = parse_args(sys.argv[1:] if argv is None else argv)
    trace_path = args.trace_file or os.path.join("out-serve", "trace.jsonl")
    try:
        TraceLog.check(trace_path)  # before anything loads; opened (and checked again) once the models are up
    except TraceError as e:
        fail(f"--trace_file: {e}", code=2)
    sock = bind(args.host, args.port)
    try:
        device, dtype = devices.resolve(args.device, args.dtype)
    except devices.DeviceError as e:
        fail(str(e), code=2)
    if checkpoint.quantize_error(args.quantize, device):
        fail(checkpoint.quantize_error(args.quantize, device), code=2)
    threads = None
    if device == "cpu":  # the model's threads and the event loop share the cores: a small batch leaves the HTTP side
        # a core (oversubscribed, every parallel op waits at a barrier for a thread that is not running); big steps
        # need all of them (bench.py --mode=serve: 32 clients, 1.34x the tokens/s on 2 cores than with one thread)
        cores = os.cpu_count() or 2
        threads = (args.threads, args.threads) if args.threads else (max(1, cores - 1), cores)
        torch.set_num_threads(threads[0])
    models = []
    for name, path, flag in specs:
        try:
            models.append(load_local_model(name, path, device, dtype, args.chat_format, args.tokenizer,
                                           args.max_batch, args.max_prefill_tokens, args.quantize, threads))
        except StartupError as e:
            fail(str(e), code=2)
        except (TokenizerError, checkpoint.CheckpointError) as e:
            fail(f"{flag}: cannot load model {name!r} from {path}: {e}", code=2)
        except (OSError, ValueError) as e:  # a path that is not there or not a checkpoint
            fail(f"{flag}: cannot load model {name!r} from {path}: {type(e).__name__}: {e}", code=2)
        except Exception as e:
            fail(f"{flag}: cannot load model {name!r} from {path}: {type(e).__name__}: {e}")
    try:
        trace = TraceSink(TraceLog(trace_path), args.trace_redis)
    except TraceError as e:
        fail(f"--trace_file: {e}", code=2)
    upstream = Upstream(args.upstream, args.upstream_api_key, args.upstream_connect_timeout,
                        args.upstream_timeout) if args.upstream else None
    state = App(models, upstream, args.fallback, args.api_key, trace, args.default_max_tokens,
                args.short_prompt_chars, args.trace_content)
    import uvicorn
    config = uvicorn.Config(build_app(state), log_level=args.log_level, timeout_graceful_shutdown=3,
                            access_log=args.log_level in ("debug", "info", "trace"))
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    summary = ", ".join(f"{lm.name} ({lm.path}, {lm.chat_format or 'completions only'})" for lm in models) or "none"
    if args.trace_redis:
        import redis
        try:
            redis.Redis.from_url(args.trace_redis, socket_connect_timeout=1, socket_timeout=1).ping()
        except Exception as e:  # not fatal: the traces go to the file until it is up
            say(f"serve: note: Redis at {args.trace_redis} cannot be reached ({type(e).__name__}): traces go to "
                f"{trace_path} until it is up")
    routing = f" (prompts over {args.short_prompt_chars} characters)" if args.short_prompt_chars is not None else ""
    traces = f"redis {args.trace_redis} (else {trace_path})" if args.trace_redis else trace_path
    say(f"serve: {summary} on {device}; upstream {args.upstream or 'none'}{routing}; traces {traces}")
    for lm in models:
        if lm.chat_format is None:
            say(f"serve: note: {lm.name} is not a chat model here: {lm.no_chat} (give --chat_format)")
    say(f"serve: listening on http://{shown}:{port}/v1")
    try:
        server.run(sockets=[sock])
    finally:
        trace.close()


if __name__ == "__main__":
    main()
