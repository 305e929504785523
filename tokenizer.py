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

tiktoken needs its vocabulary files: offline, set TIKTOKEN_CACHE_DIR to a cache. When it is unset
and ../shared/tiktoken_cache exists beside the repo, that cache is used.
"""
import json
import os
import sys
from pathlib import Path

SHARED_TIKTOKEN_CACHE = Path(__file__).resolve().parent.parent / "shared" / "tiktoken_cache"


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
            sys.exit(f"error: character {e.args[0]!r} is not in this dataset's "
                     f"{self.vocab_size}-character vocabulary: remove it from the text")

    def decode(self, ids):
        return "".join(self.chars[i] for i in _as_list(ids))


class TiktokenTokenizer:
    """A tiktoken BPE encoding; encode() treats special-token text as plain text unless asked."""

    def __init__(self, name):
        import tiktoken
        if SHARED_TIKTOKEN_CACHE.is_dir():
            os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN_CACHE))
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:  # usually: offline without a cache
            sys.exit(f"error: could not load tiktoken encoding {name!r} ({type(e).__name__}: {e}): "
                     f"set TIKTOKEN_CACHE_DIR to a tiktoken cache, or connect to the internet")
        self.name = name
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text, allow_special=False):
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(_as_list(ids))


def _tiktoken_names():
    try:
        import tiktoken
    except ImportError:
        sys.exit("error: BPE tokenizers need tiktoken: pip install tiktoken")
    return tiktoken.list_encoding_names()


def load_tokenizer(meta):
    """The tokenizer a dataset's meta.json names (see the schema above)."""
    name = meta.get("tokenizer")
    if name == "char":
        if not isinstance(meta.get("chars"), str):
            sys.exit("error: meta.json of a char-level dataset needs \"chars\": re-run its prepare.py")
        tok = CharTokenizer(meta["chars"])
    elif name in _tiktoken_names():
        tok = TiktokenTokenizer(name)
    else:
        sys.exit(f"error: unknown tokenizer {name!r}: use 'char' or a tiktoken encoding "
                 f"({', '.join(_tiktoken_names())})")
    if meta.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        sys.exit(f"error: meta.json says vocab_size {meta['vocab_size']} but tokenizer {name!r} has "
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
        sys.exit(f"error: {path} not found: prepare the dataset first (python {Path(data_dir) / 'prepare.py'})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        sys.exit(f"error: {path} is not valid JSON ({e}): re-run the dataset's prepare.py")
