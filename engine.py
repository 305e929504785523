"""
Generation, written once: the KV cache, the sampler, the stop-string streamer, prefill and the decode step.
GPT.generate / generate_stream, sample.py, serve.py's continuous batcher and evaluation all run through here.

    cache = KVCache(model, rows=2, width=64)                  # preallocated keys and values of every layer
    logits = prefill(model, cache, [[1, 2, 3], [4, 5]])       # new rows: their prompts in one forward
    tokens = sample(logits, [Sampling(temperature=0.8)] * 2, uniforms(2))
    logits = decode_one_token(model, cache, tokens)           # one new token for every active row
    text, stopped = TextStream(tokenizer.decode, ["\\n\\n"]).push(token)

The cache (gpt-fast's static cache, with slots for continuous batching): rows share one column clock `col`;
row b's tokens sit in columns start[b] .. col - 1 (position = column - start[b]), so rows of different lengths
stay aligned at their newest token and decode in lockstep. New rows are prefilled right-aligned to end at the
clock; a decode step writes column col for every row, then col += 1. Sliding-window layers keep a ring buffer
of the last `window` columns (column c in slot c % window), so their memory stays flat however long a row runs.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import ops


class KVCache:
    """Keys and values (rows, kv_heads, columns, head_dim) per layer: `width` columns for full-attention layers, a
    ring of `window` columns for sliding ones. Active rows are slots 0..n-1 (a finished row's slot takes the last
    row, so the active rows stay a prefix and a decode step works on views). Columns before start[b] (padding,
    or what an earlier occupant of the slot left there) are masked out.

    One forward: begin_prefill(first_row, lengths) or begin_append(T), then the model's attention layers call
    update(layer, k, v) for the keys, values and mask to attend over, then advance(). When the columns run out,
    reserve() slides the live span left (the same shift for every row, so alignment holds) or grows the tensors.

    static=True (a decode step compiled by compile_decode): a one-token step attends over every full-layer column,
    those past the newest masked out, and its column counter is a tensor (col_t), so nothing the compiled step
    sees changes shape from step to step: it compiles once.
    """

    def __init__(self, model, rows=4, width=256, max_width=None, static=False):
        cfg, p = model.config, model.lm_head.weight
        self.sliding = [cfg.layer_kind(i) == "S" for i in range(cfg.n_layer)]
        self.kv_heads, self.hd, self.window = cfg.kv_heads, cfg.hd, cfg.sliding_window
        self.dtype, self.device, self.static = p.dtype, p.device, static
        self.max_width = max_width or width
        self.ring = min(self.window, self.max_width) if any(self.sliding) else 0
        self.k, self.v = [], []
        self.start = torch.zeros(0, dtype=torch.long, device=self.device)
        self.rows = self.width = self.col = self.n = 0  # allocated rows and columns, the clock, active rows
        self.col_t = torch.zeros(1, dtype=torch.long, device=self.device)
        self._alloc(rows, min(width, self.max_width))

    def _alloc(self, rows, width):
        """(Re)allocate to rows x width, keeping the active rows' live columns where they are."""
        for store in (self.k, self.v):
            for i, sliding in enumerate(self.sliding):
                new = torch.zeros(rows, self.kv_heads, self.ring if sliding else width, self.hd, dtype=self.dtype,
                                  device=self.device)
                if len(store) < len(self.sliding):
                    store.append(new)
                    continue
                live = slice(None) if sliding else slice(0, self.col)
                new[:self.n, :, live] = store[i][:self.n, :, live]
                store[i] = new
            if self.static:  # one compiled step for every generation length (else a compile per length)
                for t, sliding in zip(store, self.sliding):
                    if not sliding:
                        torch._dynamo.maybe_mark_dynamic(t, 2)
        start = torch.zeros(rows, dtype=torch.long, device=self.device)
        start[:self.n] = self.start[:self.n]
        self.start, self.rows, self.width = start, rows, width
        self.full_cols = torch.arange(width, device=self.device)

    def memory_bytes(self):
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def span(self):
        """Columns the longest active row occupies (0 when there are none)."""
        return self.col - int(self.start[:self.n].min()) if self.n else 0

    def reserve(self, new_rows, prompt_len, need):
        """Make room for new_rows rows whose prompts (up to prompt_len tokens) will end at the clock, and for every
        row to write `need` more columns. The clock moves back to the longest row's length (compaction) when a
        prompt does not fit before it, the run does not fit after it, or most columns are dead."""
        if self.n == 0:
            self.col = 0
        longest = max(self.span(), prompt_len)
        col = self.col
        if col < prompt_len or col + need > self.width or col > 2 * longest + 64:
            col = longest
        rows, width = max(self.rows, 1), self.width
        while rows < self.n + new_rows:
            rows *= 2
        if col + need > width:
            width = max(min(2 * width, self.max_width), col + need)
        if (rows, width) != (self.rows, self.width):
            self._alloc(rows, width)
        self._shift(col)

    def _shift(self, new_col):
        """Move every active row's columns by new_col - col (rows stay right-aligned at the clock)."""
        shift, span = new_col - self.col, self.span()
        if self.static:
            self.col_t.fill_(new_col)
        if shift == 0:
            return
        for store in (self.k, self.v):
            for t, sliding in zip(store, self.sliding):
                if not self.n:
                    continue
                if sliding:  # column c lives in slot c % ring: moving every column rolls the ring
                    t[:self.n] = torch.roll(t[:self.n], shift, dims=2)
                elif span:
                    t[:self.n, :, new_col - span:new_col] = t[:self.n, :, self.col - span:self.col].clone()
        self.start[:self.n] += shift
        self.col = new_col

    def move_row(self, src, dst):
        """Copy slot src into slot dst (a finished row's slot gets the last row)."""
        for store in (self.k, self.v):
            for t, sliding in zip(store, self.sliding):
                t[dst, :, :(self.ring if sliding else self.col)] = t[src, :, :(self.ring if sliding else self.col)]
        self.start[dst] = self.start[src]

    def adopt(self, other, need):
        """Make `other`'s one row a new active row here, its columns ending at the clock like a prefilled row's,
        with room for `need` more tokens each (serve.py prefills a long prompt in chunks in a cache of its own)."""
        L = other.span()
        self.reserve(1, L, need)
        b, shift = self.n, self.col - other.col
        for store, theirs in ((self.k, other.k), (self.v, other.v)):
            for t, s, sliding in zip(store, theirs, self.sliding):
                if sliding:  # column c sits in ring slot c % ring in both: moving the columns rolls the ring
                    t[b] = torch.roll(s[0], shift, dims=1)
                else:
                    t[b, :, self.col - L:self.col] = s[0, :, other.col - L:other.col]
        self.start[b] = self.col - L
        self.n += 1

    # -- one forward --------------------------------------------------------------------------------------------

    def begin_prefill(self, first_row, lengths):
        """The next forward feeds new rows first_row.. their prompts (of these lengths), left-padded to the
        longest and ending at the clock; they attend only among themselves (they have no past)."""
        L = max(lengths)
        self.rows_slice, self.T, self.past = slice(first_row, first_row + len(lengths)), L, False
        self.start[self.rows_slice] = self.col - torch.tensor(lengths, device=self.device)
        self.n = max(self.n, first_row + len(lengths))
        q = torch.arange(self.col - L, self.col, device=self.device)
        self.pos = self._positions(q)
        self.full_mask = self._mask(q, q)
        self.sliding_mask = self._mask(q, q, self.window)
        if self.ring:  # the new rows' last columns go to their ring slots
            self.ring_slots = q[-self.ring:] % self.ring
        return self

    def begin_append(self, T):
        """The next forward feeds T new tokens to every active row, at columns col .. col + T - 1."""
        self.rows_slice, self.T, self.past = slice(0, self.n), T, True
        q = self.col_t if self.static and T == 1 else torch.arange(self.col, self.col + T, device=self.device)
        self.pos = self._positions(q)
        if self.static and T == 1:  # every column, masked past the newest: fixed shapes
            self.full_mask = self._mask(self.full_cols, q)
            torch._dynamo.maybe_mark_dynamic(self.full_mask, 3)  # the cache's width: one graph for every length
        else:
            self.full_mask = self._mask(self.full_cols[:self.col + T], q)
        if self.ring:
            self.ring_slots = q[-self.ring:] % self.ring
            # one token: write it into the ring, then attend over the ring; several: attend over ring + new
            newest = q[-1:] if T == 1 else q[:1] - 1
            ring_cols = newest - (newest - torch.arange(self.ring, device=self.device)) % self.ring
            keys = ring_cols if T == 1 else torch.cat([ring_cols, q])
            self.sliding_mask = self._mask(keys, q, self.window)
        return self

    def _positions(self, q):
        return (q.view(1, -1) - self.start[self.rows_slice].view(-1, 1)).clamp(min=0)  # (B, T)

    def _mask(self, key_cols, query_cols, window=0):
        """(B, 1, T, S): key column visible to query column, within the row's own tokens (and window)."""
        k, q = key_cols.view(1, 1, 1, -1), query_cols.view(1, 1, -1, 1)
        ok = (k <= q) & (k >= self.start[self.rows_slice].view(-1, 1, 1, 1))
        if window:
            ok = ok & (k > q - window)
        return ok | (k == q)  # a padding query sees itself, so its (unused) output stays finite

    def update(self, layer, k, v):
        """Store this layer's new keys/values (B, Hkv, T, D); return the keys, values and mask to attend over."""
        K, V, T = self.k[layer][self.rows_slice], self.v[layer][self.rows_slice], self.T
        if self.sliding[layer]:
            if self.past and T == 1:
                K.index_copy_(2, self.ring_slots, k)
                V.index_copy_(2, self.ring_slots, v)
                return K, V, self.sliding_mask
            keys = (torch.cat([K, k], dim=2), torch.cat([V, v], dim=2)) if self.past else (k, v)
            n = len(self.ring_slots)
            K.index_copy_(2, self.ring_slots, k[:, :, -n:])
            V.index_copy_(2, self.ring_slots, v[:, :, -n:])
            return keys[0], keys[1], self.sliding_mask
        if not self.past:
            K[:, :, self.col - T:self.col] = k
            V[:, :, self.col - T:self.col] = v
            return k, v, self.full_mask
        if self.static and T == 1:
            K.index_copy_(2, self.col_t, k)
            V.index_copy_(2, self.col_t, v)
            return K, V, self.full_mask
        K[:, :, self.col:self.col + T] = k
        V[:, :, self.col:self.col + T] = v
        return K[:, :, :self.col + T], V[:, :, :self.col + T], self.full_mask

    def advance(self):
        if self.past:
            self.col += self.T
            if self.static:
                self.col_t += self.T


# ----------------------------------------------------------------------------------------------------------------
# prefill and the decode step


def forward(model, idx, cache):
    """The logits (B, V) of the last position after feeding idx (B, T) through the cache."""
    x, _ = model.hidden_states(idx, cache.pos, cache)
    return model.head(x[:, -1, :])


def prefill(model, cache, prompts, need=0):
    """Admit new rows with these prompts (token id lists) in one forward, room made for `need` more tokens each;
    returns the logits of their last positions."""
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    cache.reserve(len(prompts), L, need)
    idx = torch.tensor([[0] * (L - len(p)) + list(p) for p in prompts], device=cache.device)
    cache.begin_prefill(cache.n, lengths)
    return forward(model, idx, cache)


def append(model, cache, idx):
    """Feed idx (n, T): T more tokens to every active row; the logits of the last position. A one-token step on a
    static cache runs the compiled step when there is one (compile_decode)."""
    cache.begin_append(idx.size(1))
    step = getattr(model, "compiled_decode", None) if cache.static and idx.size(1) == 1 else None
    logits = (step or forward)(model, idx, cache)
    cache.advance()
    return logits


def decode_one_token(model, cache, tokens):
    """One new token per active row (a list or a tensor of n ids); the next logits (n, V)."""
    idx = torch.as_tensor(tokens, device=cache.device).view(-1, 1)
    return append(model, cache, idx)


def compile_decode(model, **compile_kwargs):
    """torch.compile the one-token step (gpt-fast style); caches made for the model afterwards are static (see
    KVCache), so it compiles once. Prompts (several tokens per row) run uncompiled. Mixture-of-experts models stay
    uncompiled: their tokens are grouped by expert in sizes known only at run time, which would break the graph at
    every layer and recompile for every new grouping. Returns whether it compiled."""
    if model.config.n_expert:
        return False
    model.compiled_decode = torch.compile(forward, **compile_kwargs)
    return True


def prepare_for_decoding(model):
    """On CPU, the weight layout that suits one-token matmuls (ops.decode_layout: same values, faster steps)."""
    if model.lm_head.weight.device.type == "cpu":
        ops.decode_layout(model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# the sampler: every row with its own settings, in one batched pass


GREEDY_BELOW = 1e-5  # temperatures below this are greedy: logits / 1e-40 overflow float32 and sample garbage


@dataclass
class Sampling:
    """A row's sampling settings: temperature 0 is greedy; top_k / top_p None are off."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def sampling(temperature=1.0, top_k=None, top_p=None):
    """Sampling settings checked by the one rule every entry point applies (sample.py, its interactive commands,
    serve.py, GPT.generate): finite numbers; temperature >= 0, greedy (0) below GREEDY_BELOW; top_k an integer >= 0
    (0 or None: off); top_p in (0, 1] (1 or None: off). A bad value is a ValueError naming it and the rule."""
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return value
    temperature = number("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if top_p is not None and not 0 < number("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    return Sampling(0.0 if temperature < GREEDY_BELOW else float(temperature), top_k or None,
                    None if top_p is None or top_p >= 1 else float(top_p))


def uniforms(n, generator=None, device="cpu"):
    """n uniforms in [0, 1) for the sampler: from generator (a torch.Generator) or torch's global one."""
    return torch.rand(n, generator=generator, device=device)


def sample(logits, rows, u):
    """One token id per row of logits (B, V), as a list. rows[b] (temperature, top_k, top_p, see Sampling): the
    distribution softmax(logits / temperature), cut to the top_k likeliest tokens, then to the nucleus (tokens whose
    preceding mass is at most top_p); the token where its CDF passes u[b] * total. Temperature 0: the argmax.
    u: (B,) uniforms, one per row (see uniforms), so a row's draw does not depend on the others in the batch."""
    temps = [0.0 if r.temperature < GREEDY_BELOW else r.temperature for r in rows]
    if all(t == 0 for t in temps):
        return logits.argmax(dim=-1).tolist()
    B, V = logits.shape
    device = logits.device
    z = logits.float() / torch.tensor([t or 1.0 for t in temps], device=device).unsqueeze(1)
    top_ks = [r.top_k if r.top_k and r.top_k < V else V for r in rows]
    if min(top_ks) < V:
        values = torch.topk(z, max(k for k in top_ks if k < V), dim=-1).values
        kth = values.gather(1, torch.tensor([min(k, values.size(1)) - 1 for k in top_ks], device=device).unsqueeze(1))
        keep_all = torch.tensor([k >= V for k in top_ks], device=device).unsqueeze(1)
        z = z.masked_fill(~keep_all & (z < kth), float("-inf"))
    # u < 1 - 2^-22 keeps u * total below the float32 total, so the pick is a token of nonzero probability
    u = u.to(device=device, dtype=torch.float32).clamp(max=1 - 2**-22).view(B, 1)
    if any(r.top_p is not None and r.top_p < 1.0 for r in rows):
        z, order = z.sort(dim=-1, descending=True)
        probs = z.softmax(dim=-1)
        p = torch.tensor([r.top_p if r.top_p is not None else float("inf") for r in rows], device=device)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > p.unsqueeze(1), 0.0)
    else:  # unnormalised: the pick below scales u by the total instead of dividing every probability. In place
        # on z (a fresh tensor): new (B, V) buffers cost page faults, several times the arithmetic on CPU
        order, probs = None, z.sub_(z.amax(dim=-1, keepdim=True)).exp_()
    cdf = probs.cumsum_(dim=-1)  # probs is a fresh tensor on every path
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=V - 1)
    tokens = (pick if order is None else order.gather(1, pick))[:, 0]
    if any(t == 0 for t in temps):
        tokens = torch.where(torch.tensor([t == 0 for t in temps], device=device), logits.argmax(dim=-1), tokens)
    return tokens.tolist()


def logprobs(logits, tokens, top_n=0):
    """Log-probabilities of the model's distribution (before temperature, top-k and top-p, as vLLM reports them):
    (B,) of tokens under logits (B, V), and the top_n likeliest alternatives per row as (values, ids), (B, top_n)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.as_tensor(tokens, device=logits.device).view(-1, 1))[:, 0]
    top = logp.topk(top_n, dim=-1) if top_n else None
    return chosen, (top.values, top.indices) if top is not None else (None, None)


# ----------------------------------------------------------------------------------------------------------------
# scoring: log-probabilities of given tokens (evaluation, the server's echo)


class PackedRows:
    """Attention masks for rows that each pack one context and several continuations of it: every continuation
    sees the context and its own earlier tokens, with positions that go on from the context, so a multiple-choice
    question costs one pass over its context. Stands where a KVCache goes (the attention layers call update) but
    keeps nothing. segments: (B, T) 0 for context tokens, i > 0 for continuation i, -1 for padding."""

    def __init__(self, model, pos, segments):
        cfg = model.config
        self.sliding = [cfg.layer_kind(i) == "S" for i in range(cfg.n_layer)]
        pq, pk = pos.unsqueeze(2), pos.unsqueeze(1)  # (B, T, 1), (B, 1, T)
        sq, sk = segments.unsqueeze(2), segments.unsqueeze(1)
        same = ((sk == sq) | (sk == 0)) & (sk >= 0) & (pk <= pq)
        self_only = torch.eye(pos.size(1), dtype=torch.bool, device=pos.device)  # padding sees itself: finite
        self.full_mask = (same | self_only).unsqueeze(1)
        window = cfg.sliding_window
        self.sliding_mask = ((same & (pq - pk < window)) | self_only).unsqueeze(1) if window else self.full_mask

    def update(self, layer, k, v):
        return k, v, self.sliding_mask if self.sliding[layer] else self.full_mask


@dataclass
class Scored:
    """A continuation's log-probabilities under the model, token by token: logprobs[i] of its token i, greedy[i]
    whether that token was the model's argmax, top[i] the top_n alternatives as (token id, log-probability)."""
    logprobs: list
    greedy: list
    top: list


def _pack(requests, max_tokens):
    """Rows of (context, [(request index, continuation), ...]): requests with the same context share a row while
    its packed length (the context plus each continuation but its last token) stays within max_tokens."""
    by_context = {}
    for i, (context, continuation) in enumerate(requests):
        by_context.setdefault(tuple(context), []).append((i, list(continuation)))
    rows = []
    for context, items in by_context.items():
        row, length = [], len(context)
        for i, continuation in items:
            extra = len(continuation) - 1
            if row and length + extra > max_tokens:
                rows.append((list(context), row))
                row, length = [], len(context)
            row.append((i, continuation))
            length += extra
        rows.append((list(context), row))
    return rows


@torch.no_grad()
def score(model, requests, top_n=0, batch_rows=16, batch_tokens=16384):
    """Log-probabilities of each request's continuation tokens given its context ((context ids, continuation ids)
    pairs, context non-empty, len(context) + len(continuation) - 1 <= block_size): one Scored per request.
    Requests that share a context share its computation (PackedRows); rows are batched by length (up to batch_rows
    rows and batch_tokens tokens a forward), and the head runs only at the positions that predict a continuation
    token."""
    block = model.config.block_size
    for context, continuation in requests:
        if not context or not continuation or len(context) + len(continuation) - 1 > block:
            raise ValueError(f"score needs a context and a continuation of at most {block} tokens together, got "
                             f"{len(context)} + {len(continuation)}")
    device = model.lm_head.weight.device
    rows = sorted(_pack(requests, max(block, 512)), key=lambda r: len(r[0]) + sum(len(c) - 1 for _, c in r[1]))
    out = [None] * len(requests)
    while rows:
        T = len(rows[-1][0]) + sum(len(c) - 1 for _, c in rows[-1][1])
        batch = [rows.pop()]  # the longest first; then as many of the next as fit batch_tokens at that length
        while rows and len(batch) < batch_rows and (len(batch) + 1) * T <= batch_tokens:
            batch.append(rows.pop())
        _score_rows(model, batch, T, top_n, device, out)
    return out


def _score_rows(model, rows, T, top_n, device, out):
    B = len(rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    where, targets, owners = [], [], []  # (row, column) of each predicting position, its target, (request, i)
    for b, (context, items) in enumerate(rows):
        c = len(context)
        idx[b, :c], pos[b, :c], segments[b, :c] = torch.tensor(context), torch.arange(c), 0
        col = c
        for seg, (i, continuation) in enumerate(items, 1):
            body = continuation[:-1]  # the inputs; each predicts the next continuation token
            n = len(body)
            idx[b, col:col + n] = torch.tensor(body, dtype=torch.long)
            pos[b, col:col + n], segments[b, col:col + n] = torch.arange(c, c + n), seg
            cols = [c - 1] + list(range(col, col + n))
            where += [(b, k) for k in cols]
            targets += continuation
            owners += [(i, j) for j in range(len(continuation))]
            col += n
    idx, pos, segments = idx.to(device), pos.to(device), segments.to(device)
    x, _ = model.hidden_states(idx, pos, PackedRows(model, pos, segments))
    rows_idx, cols_idx = torch.tensor(where, device=device).T
    logp = F.log_softmax(model.head(x[rows_idx, cols_idx]).float(), dim=-1)
    targets = torch.tensor(targets, device=device)
    chosen = logp.gather(1, targets.unsqueeze(1))[:, 0].tolist()
    greedy = (logp.argmax(dim=-1) == targets).tolist()
    top = logp.topk(top_n, dim=-1) if top_n else None
    top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top_n else (None, None)
    for k, (i, j) in enumerate(owners):
        if out[i] is None:
            out[i] = Scored([], [], [])
        out[i].logprobs.append(chosen[k])
        out[i].greedy.append(greedy[k])
        out[i].top.append(list(zip(top_ids[k], top_values[k])) if top_n else [])


# ----------------------------------------------------------------------------------------------------------------
# generation for one batch of prompts (GPT.generate, sample.py)


@torch.no_grad()
def generate_stream(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
                    generator=None):
    """Decode a batch of prompts (lists of token ids, any lengths) with a KV cache: one pass over the prompts, then
    one token per step. Yields, per step, a list with each row's new token id, or None for rows that have stopped
    (a row stops after yielding one of stop_tokens). Uniforms for sampling come from generator (or torch's global
    one), one per row and step."""
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    longest = max(lengths)
    if longest + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's block_size {model.config.block_size}")
    if max_new_tokens <= 0:
        return
    rows = [sampling(temperature, top_k, top_p)] * len(prompts)
    prepare_for_decoding(model)
    cache = KVCache(model, len(prompts), longest + max_new_tokens, static=hasattr(model, "compiled_decode"))
    logits = prefill(model, cache, prompts, need=max_new_tokens)
    stop_tokens, running = set(stop_tokens), [True] * len(prompts)
    for step in range(max_new_tokens):
        u = uniforms(len(prompts), generator, "cpu" if generator is None else generator.device)
        tokens = sample(logits, rows, u)
        out = []
        for row, token in enumerate(tokens):
            out.append(token if running[row] else None)
            running[row] = running[row] and token not in stop_tokens
        yield out
        if not any(running) or step == max_new_tokens - 1:
            return
        logits = decode_one_token(model, cache, tokens)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Continue idx (B, T) by max_new_tokens tokens (nanoGPT's signature); temperature 0 is greedy."""
    steps = list(generate_stream(model, idx.tolist(), max_new_tokens, temperature, top_k, top_p,
                                 generator=generator))
    return torch.cat([idx, torch.tensor(steps, dtype=idx.dtype, device=idx.device).view(-1, idx.size(0)).T], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# text out of tokens, with stop strings


class TextStream:
    """Incremental detokenization of one row: push token ids, get the text that is safe to send. Text that could
    still grow into a stop string, or an unfinished UTF-8 character (decoded as U+FFFD), is held back until it is
    settled; a stop string ends the text exactly before its first occurrence."""

    def __init__(self, decode, stops=()):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids, self.text, self.sent = [], "", 0  # sent: characters of the text already returned

    def push(self, token):
        """Returns (new text, whether a stop string was hit); after a hit, push no more."""
        self.ids.append(token)
        self.text = text = self.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            cut = max(min(hits), self.sent)
            out, self.sent, self.text = text[self.sent:cut], cut, text[:cut]
            return out, True
        end = max(self.sent, len(text.rstrip("\ufffd")))
        hold = 0  # the longest tail that is the start of a stop string: a stop can only begin there
        for s in self.stops:
            for n in range(min(len(s) - 1, end - self.sent), hold, -1):
                if text.startswith(s[:n], end - n):
                    hold = n
                    break
        out, self.sent = text[self.sent:end - hold], end - hold
        return out, False

    def flush(self):
        """The text held back, at the end of the row (no stop string came)."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
