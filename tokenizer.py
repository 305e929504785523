"""
Tokenizers for nanoforge datasets, chosen by the dataset's meta.json.

    meta = read_meta("data/shakespeare_char")
    tok = load_tokenizer(meta)
    ids = tok.encode("To be")          # list[int]; encode(text, allow_special=True) reads <|endoftext|> etc.
    text = tok.decode(ids)             # also takes numpy arrays and tensors
    tok.vocab_size, tok.eot_token, tok.name

meta.json, written by data/*/prepare.py (make_meta below):
    tokenizer   "char", or a tiktoken encoding name: "gpt2", "r50k_base", "o200k_base", "o200k_harmony", ...
    vocab_size  number of token ids; ids are 0 .. vocab_size-1
    dtype       element type of the .bin token streams: "uint16" if vocab_size <= 65536, else "uint32"
    eot_token   id of <|endoftext|> (datasets of documents end each one with it), or null for "char"
    chars       "char" only: the vocabulary as one string of the sorted unique characters; id i is chars[i]
Chat datasets (data/chat/prepare.py, whose docstring gives the layout) add chat_format, block_size,
row_len, packed and pad_token.

Chat formats (the section at the end): render_chat(tok, messages, fmt) -> (ids, loss_mask) for SFT,
render_prompt(tok, messages, fmt) -> ids for generation, stop_tokens / stop_strings, default_chat_format.

tiktoken needs its vocabulary files: offline, set TIKTOKEN_CACHE_DIR to a cache. When it is unset
and ../shared/tiktoken_cache exists beside the repo, that cache is used.
"""
import json
import os
from pathlib import Path

SHARED_TIKTOKEN_CACHE = Path(__file__).resolve().parent.parent / "shared" / "tiktoken_cache"


class TokenizerError(ValueError):
    """A tokenizer or meta.json that cannot be used, or text it cannot encode; the message is one line naming the
    fix. Scripts print it as their one-line error; the server answers 400."""


def dtype_for_vocab(vocab_size):
    """The smallest unsigned type that holds every token id."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _as_list(ids):
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, tensors


class CharTokenizer:
    """One token per character; the vocabulary is a dataset's sorted unique characters."""
    name = "char"
    eot_token = None

    def __init__(self, chars):
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}

    def encode(self, text, allow_special=False):  # no special tokens at character level
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(f"character {e.args[0]!r} is not in this dataset's "
                                 f"{self.vocab_size}-character vocabulary: remove it from the text") from None

    def decode(self, ids):
        return "".join(self.chars[i] for i in _as_list(ids))

    def token_bytes(self, id):
        """The token's raw bytes: its character in UTF-8."""
        return self.chars[id].encode("utf-8")


class TiktokenTokenizer:
    """A tiktoken BPE encoding; encode() treats special-token text as plain text unless asked."""

    def __init__(self, name):
        import tiktoken
        if SHARED_TIKTOKEN_CACHE.is_dir():
            os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN_CACHE))
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # usually: offline without a cache
            raise TokenizerError(f"could not load tiktoken encoding {name!r} ({type(e).__name__}: {e}): "
                                 f"set TIKTOKEN_CACHE_DIR to a tiktoken cache, or connect to the internet") from None
        self.name = name
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text, allow_special=False):
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(_as_list(ids))

    def token_bytes(self, id):
        """The token's raw bytes (a token may hold part of a UTF-8 character)."""
        return self.enc.decode_single_token_bytes(id)


def _tiktoken_names():
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError("BPE tokenizers need tiktoken: pip install tiktoken") from None
    return tiktoken.list_encoding_names()


def load_tokenizer(meta):
    """The tokenizer a dataset's meta.json names (see the schema above)."""
    name = meta.get("tokenizer")
    if name == "char":
        if not isinstance(meta.get("chars"), str):
            raise TokenizerError("meta.json of a char-level dataset needs \"chars\": re-run its prepare.py")
        tok = CharTokenizer(meta["chars"])
    elif name in _tiktoken_names():
        tok = TiktokenTokenizer(name)
    else:
        raise TokenizerError(f"unknown tokenizer {name!r}: use 'char' or a tiktoken encoding "
                             f"({', '.join(_tiktoken_names())})")
    if meta.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        raise TokenizerError(f"meta.json says vocab_size {meta['vocab_size']} but tokenizer {name!r} has "
                             f"{tok.vocab_size}: re-run the dataset's prepare.py")
    return tok


def make_meta(tok):
    """meta.json's contents for a dataset tokenized by `tok`."""
    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "dtype": dtype_for_vocab(tok.vocab_size), "eot_token": tok.eot_token}
    if isinstance(tok, CharTokenizer):
        meta["chars"] = tok.chars
    return meta


def read_meta(data_dir):
    """A dataset's meta.json as a dict."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise TokenizerError(f"{path} not found: prepare the dataset first (python {Path(data_dir) / 'prepare.py'})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}): re-run the dataset's prepare.py") from None


# ---------------------------------------------------------------------------------------------
# Chat formats: how a conversation becomes tokens, for SFT data (data/chat/prepare.py) and for
# prompting a chat model (a server). One place for all three families' formats.
#
# A conversation is a list of {"role": ..., "content": str} messages; roles are CHAT_ROLES. Each
# message is one turn rendered as   header  content  end  after   (pieces below; "" = nothing):
#
#   format    role              header                                           end            after
#   harmony   system/developer  <|start|>{role}<|message|>                       <|end|>
#   (GPT-OSS) user              <|start|>user<|message|>                         <|end|>
#             assistant         <|start|>assistant<|channel|>final<|message|>    <|return|> if it is the last
#                                                                                message, else <|end|>
#   gemma     user              "<start_of_turn>user\n"                          "<end_of_turn>"  "\n"
#             assistant         "<start_of_turn>model\n"                         "<end_of_turn>"  "\n"
#             system/developer  only as the first message: its content + "\n\n" is prepended to the
#                               first user turn's content (as Gemma 3's chat template does)
#   plain     system/developer  "System: " / "Developer: "                       "\n"
#   (GPT-2)   user              "User: "                                         "\n"
#             assistant         "Assistant: "                                    <|endoftext|> (the eot token);
#                                                                                "\n\n" for "char" (no eot)
#
# <|...|> are single special tokens of o200k_harmony (ids in ARCHITECTURES.md; harmony needs that
# tokenizer). Quoted pieces are text: Gemma's real tokenizer (SentencePiece) has <start_of_turn> and
# <end_of_turn> as special tokens, but we only have tiktoken/char tokenizers, so our Gemma-style
# models (trained on GPT-2 BPE) see the markers as ordinary text, several tokens each.
#
# Tokenization: every piece (each header/end/after text or special token, and each message's content)
# is encoded on its own and the ids concatenated, so no token spans two pieces and the same
# conversation prefix always gives the same ids (render_prompt's ids are a prefix of render_chat's).
# Content is encoded as ordinary text: "<|end|>" typed by a user is never a special token.
#
# Loss mask (render_chat): True exactly on each assistant turn's content tokens and its end tokens
# (<|end|>/<|return|>, "<end_of_turn>", <|endoftext|>/"\n\n"), so the model learns to answer and to
# stop. False on everything else: system/developer/user turns, every header (the prompt supplies it:
# render_prompt ends with the assistant header) and gemma's "\n" after <end_of_turn>.
#
# Not covered: tool calls and tool messages (harmony's <|call|>, recipients, <|constrain|>), the
# analysis (reasoning) and commentary channels, and gpt-oss's default system message (model
# identity, dates, "Reasoning: medium", valid channels) and "# Instructions" developer wrapper:
# pass those as system/developer messages yourself. Assistant replies always use the final channel,
# which the prompt's header supplies. Gemma: no <bos>, content is not trimmed, and roles are not
# checked to alternate.
# ---------------------------------------------------------------------------------------------

CHAT_ROLES = ("system", "developer", "user", "assistant")
CHAT_FORMATS = ("plain", "gemma", "harmony")


def check_messages(messages):
    """Raise ValueError (saying which message) unless `messages` is a non-empty list of
    {"role": one of CHAT_ROLES, "content": str} dicts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not a JSON object")
        if m.get("role") not in CHAT_ROLES:
            raise ValueError(f"message {i} has unknown role {m.get('role')!r} "
                             f"(expected one of {', '.join(CHAT_ROLES)})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}) needs a string \"content\"")


def _special(tok, text):
    ids = tok.encode(text, allow_special=True) if tok.name != "char" else []
    if len(ids) != 1:
        raise ValueError(f"the harmony chat format needs the o200k_harmony tokenizer: "
                         f"tokenizer {tok.name!r} has no {text} token")
    return ids[0]


def _turn(tok, chat_format, role, last):
    """(header, end, after) of one turn, each a list of pieces: text, or a token id."""
    if chat_format == "harmony":
        start, message, end = (_special(tok, s) for s in ("<|start|>", "<|message|>", "<|end|>"))
        if role == "assistant":
            close = _special(tok, "<|return|>") if last else end
            return [start, "assistant", _special(tok, "<|channel|>"), "final", message], [close], []
        return [start, role, message], [end], []
    if chat_format == "gemma":
        return [f"<start_of_turn>{'model' if role == 'assistant' else role}\n"], ["<end_of_turn>"], ["\n"]
    if chat_format == "plain":
        if role == "assistant":
            return ["Assistant: "], [tok.eot_token if tok.eot_token is not None else "\n\n"], []
        return [f"{role.capitalize()}: "], ["\n"], []
    raise ValueError(f"unknown chat format {chat_format!r} (expected one of {', '.join(CHAT_FORMATS)})")


def _gemma_messages(messages):
    """Gemma has no system turn: the first message, if system/developer, prefixes the first user turn."""
    if any(m["role"] in ("system", "developer") for m in messages[1:]):
        raise ValueError("the gemma chat format takes a system message only as the first message")
    if messages[0]["role"] not in ("system", "developer"):
        return messages
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ValueError("the gemma chat format needs a user message right after the system message")
    first_user = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
    return [first_user] + messages[2:]


def _render(tok, messages, chat_format, add_assistant_header):
    check_messages(messages)
    if chat_format == "gemma":
        messages = _gemma_messages(messages)
    ids, mask = [], []

    def add(pieces, trained):
        for piece in pieces:
            new = [piece] if isinstance(piece, int) else tok.encode(piece)
            ids.extend(new)
            mask.extend([trained] * len(new))

    for i, m in enumerate(messages):
        last = i == len(messages) - 1 and not add_assistant_header
        header, end, after = _turn(tok, chat_format, m["role"], last)
        trained = m["role"] == "assistant"
        add(header, False)
        add([m["content"]], trained)
        add(end, trained)
        add(after, False)
    if add_assistant_header:
        add(_turn(tok, chat_format, "assistant", True)[0], False)
    return ids, mask


def render_chat(tok, messages, chat_format):
    """A whole conversation, for training: (ids, loss_mask), two lists of the same length; loss_mask[i]
    is True when ids[i] is a token the model must learn to produce (see the table above)."""
    return _render(tok, messages, chat_format, add_assistant_header=False)


def render_prompt(tok, messages, chat_format):
    """The conversation so far, then the header that opens the assistant's reply: the ids to generate
    from. Earlier assistant turns end as in training (harmony: <|end|>). Sample until stop_tokens or
    stop_strings."""
    return _render(tok, messages, chat_format, add_assistant_header=True)[0]


def stop_tokens(tok, chat_format):
    """Token ids that end an assistant reply: the format's end tokens (harmony: <|return|>, <|call|>,
    <|end|>) and the tokenizer's <|endoftext|>, if it has one. Drop the stop token from the reply."""
    ids = [_special(tok, s) for s in ("<|return|>", "<|call|>", "<|end|>")] if chat_format == "harmony" else []
    return ids + ([tok.eot_token] if tok.eot_token is not None else [])


def stop_strings(tok, chat_format):
    """Text that ends an assistant reply when no single token does: gemma's "<end_of_turn>" (several
    tokens in our tokenizers) and plain's "\\n\\n" for "char". Cut the reply where one first appears."""
    if chat_format == "gemma":
        return ["<end_of_turn>"]
    if chat_format == "plain" and tok.eot_token is None:
        return ["\n\n"]
    return []


def default_chat_format(meta_or_tokenizer, family=None):
    """The chat format for a dataset's meta.json (its "chat_format" if it has one), a tokenizer or a
    tokenizer name: "gemma" when `family` names a Gemma model (e.g. "gemma3-compact", "google/gemma-3-270m"),
    else "harmony" for o200k_harmony, else "plain"."""
    m = meta_or_tokenizer
    if isinstance(m, dict) and m.get("chat_format"):
        return m["chat_format"]
    if family and "gemma" in str(family).lower():
        return "gemma"
    name = m.get("tokenizer") if isinstance(m, dict) else getattr(m, "name", m)
    return "harmony" if name == "o200k_harmony" else "plain"


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer files, for export.py: tokenizer.json (the `tokenizers` library's format),
# tokenizer_config.json and generation_config.json, so that transformers' AutoTokenizer, lm-eval's hf
# backend and vLLM encode text to exactly our ids. Plain JSON: writing them needs neither library.
#
# tiktoken -> byte-level BPE: the vocabulary is tiktoken's mergeable ranks, each byte written as GPT-2's
# printable stand-in character; the merges are every split of a token into two tokens, in the token's rank
# order (tiktoken merges the adjacent pair whose concatenation ranks lowest); the pre-tokenizer is the
# encoding's own regex; special tokens are added tokens with their ids. "char" -> a BPE model without merges
# and without a pre-tokenizer: each character is its token, and the decoder joins tokens as they are.
# ---------------------------------------------------------------------------------------------

# A Unicode noncharacter (reserved for a program's internal use): the chat templates of BPE exports put it
# after each piece that _render encodes on its own, and the pre-tokenizer splits there and drops it
PIECE_MARK = "\ufdd0"

# The template reads turns {role: [header, end, after]} (render's pieces as text, each followed by mark),
# last_end (harmony: <|return|> ends a finished chat) and merge_system (gemma: a first system/developer message
# prefixes the first user turn), which _chat_template sets in front of it.
CHAT_TEMPLATE = """
{%- set ns = namespace(prefix="", messages=messages) -%}
{%- if merge_system and messages and messages[0].role in ["system", "developer"] -%}
    {%- if messages | length < 2 or messages[1].role != "user" -%}
        {{- raise_exception("the gemma chat format needs a user message right after the system message") -}}
    {%- endif -%}
    {%- set ns.prefix = messages[0].content ~ "\\n\\n" -%}
    {%- set ns.messages = messages[1:] -%}
{%- endif -%}
{%- for m in ns.messages -%}
    {%- if m.role not in turns -%}
        {{- raise_exception("role " ~ m.role ~ " is not one this chat format takes here") -}}
    {%- endif -%}
    {%- set finished = m.role == "assistant" and loop.last and not add_generation_prompt -%}
    {%- set end = last_end if finished else turns[m.role][1] -%}
    {{- turns[m.role][0] ~ (ns.prefix if loop.first else "") ~ m.content ~ mark ~ end ~ turns[m.role][2] -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- turns["assistant"][0] -}}
{%- endif -%}
"""


def _byte_chars():
    """GPT-2's byte -> character map: printable bytes stand for themselves, the others for chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _bpe_vocab_merges(ranks):
    """vocab {token text: id} and merges ["left right", ...] of tiktoken's mergeable ranks {bytes: rank}."""
    chars = _byte_chars()
    text = {token: "".join(chars[b] for b in token) for token in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [f"{text[a]} {text[b]}" for a, b in sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]]))]
    return {text[token]: rank for token, rank in ranks.items()}, merges


def _piece_mark(tok, chat_format):
    """PIECE_MARK where joined text would tokenize differently from _render's pieces: a BPE tokenizer merges
    across them ("User: " + "Hi": " Hi", not " " "Hi"). Not for harmony (special tokens keep its pieces apart)
    nor for "char" (characters never merge)."""
    return PIECE_MARK if chat_format in ("plain", "gemma") and tok.name != "char" else ""


def _chat_template(tok, chat_format):
    """A Jinja chat template that renders the text of render_chat (render_prompt with add_generation_prompt)."""
    mark = _piece_mark(tok, chat_format)

    def text(pieces):
        return "".join((tok.decode([p]) if isinstance(p, int) else p) + mark for p in pieces)

    roles = ("user", "assistant") if chat_format == "gemma" else CHAT_ROLES
    turns = {role: [text(part) for part in _turn(tok, chat_format, role, last=False)] for role in roles}
    settings = dict(turns=turns, last_end=text(_turn(tok, chat_format, "assistant", last=True)[1]), mark=mark,
                    merge_system=chat_format == "gemma")
    return "".join(f"{{%- set {k} = {json.dumps(v)} -%}}\n" for k, v in settings.items()) + CHAT_TEMPLATE.strip()


def _bpe(vocab, merges, ignore_merges):
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges}


def hf_tokenizer_files(tok, chat_format=None, model_max_length=None):
    """{file name: text} of the Hugging Face files for our tokenizer `tok` (the one a run's meta.json names):
    tokenizer.json, tokenizer_config.json (with the chat template of `chat_format`, if given) and
    generation_config.json (the ids that end generation, which transformers and vLLM stop at)."""
    if isinstance(tok, CharTokenizer):
        specials, pre_tokenizers = {}, []
        model, decoder = _bpe({c: i for i, c in enumerate(tok.chars)}, [], False), {"type": "Fuse"}
    else:
        # one name per id (the library keeps one): o200k_harmony's 200018 is both <|endofprompt|> and
        # <|reserved_200018|>; we keep the one tiktoken decodes it to
        specials = {tok.decode([i]): i for i in sorted(set(tok.enc._special_tokens.values()))}
        vocab, merges = _bpe_vocab_merges(tok.enc._mergeable_ranks)
        # The library gives an added token the id the model's vocabulary has for it, else the next free one, so
        # the special tokens go in the vocabulary too, and so do the ids that no token has (o200k_base's 199998
        # and 200000-200017), named with a space, which byte-level text never holds: nothing encodes to them.
        vocab.update(specials)
        vocab.update({f"<unused {i}>": i for i in sorted(set(range(tok.vocab_size)) - set(vocab.values()))})
        model = _bpe(vocab, merges, True)  # ignore_merges: a pre-token that is a token is that token, as in tiktoken
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        pre_tokenizers = [{"type": "Split", "pattern": {"Regex": tok.enc._pat_str}, "behavior": "Isolated",
                           "invert": False}, byte_level]
        decoder = byte_level
    if chat_format and _piece_mark(tok, chat_format):
        pre_tokenizers.insert(0, {"type": "Split", "pattern": {"String": PIECE_MARK}, "behavior": "Removed",
                                  "invert": False})
    tokenizer = {"version": "1.0", "truncation": None, "padding": None,
                 "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                                   "normalized": False, "special": True} for s, i in specials.items()],
                 "normalizer": None,
                 "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers} if pre_tokenizers else None,
                 "post_processor": None, "decoder": decoder, "model": model}

    # special tokens as the Hugging Face models of each family name them: GPT-2's are all <|endoftext|>, gpt-oss
    # has <|startoftext|> and ends chat replies with <|return|>
    eot = tok.decode([tok.eot_token]) if tok.eot_token is not None else None
    bos = "<|startoftext|>" if "<|startoftext|>" in specials else eot if tok.name in ("gpt2", "r50k_base") else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length or int(1e30), "bos_token": bos,
              "eos_token": "<|return|>" if chat_format == "harmony" else eot,
              "unk_token": eot if tok.name in ("gpt2", "r50k_base") else None,
              "chat_template": _chat_template(tok, chat_format) if chat_format else None}
    eos = stop_tokens(tok, chat_format) if chat_format else [tok.eot_token] if eot else []
    # written even when empty: the model's config.json defaults (GPT2Config's 50256, Gemma's 1) are not our ids
    generation = {"bos_token_id": specials.get(bos), "eos_token_id": (eos[0] if len(eos) == 1 else eos) or None}
    return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
            "tokenizer_config.json": json.dumps({k: v for k, v in config.items() if v is not None}, indent=2,
                                                ensure_ascii=False) + "\n",
            "generation_config.json": json.dumps(generation, indent=2) + "\n"}
