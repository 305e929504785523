"""
Helpers shared by data/*/prepare.py: flags, raw text, documents, and writing the dataset.

A prepared dataset is a folder of flat token streams, `<split>.bin` (raw numpy arrays, no header:
read with np.memmap(path, dtype=meta["dtype"], mode="r")), plus meta.json (schema: tokenizer.py).
Every prepare.py takes --input=PATH (a local copy instead of downloading) and --out_dir=DIR
(default: the script's own folder); flags are parsed by configurator.py, so --help lists them.
"""
import json
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: configurator.py, tokenizer.py
from configurator import apply_overrides  # noqa: E402
from tokenizer import TokenizerError, dtype_for_vocab, make_meta  # noqa: E402


def fail(message):
    sys.exit(f"error: {message}")


def run(main):
    """A prepare.py's entry point: the tokenizer's errors (TokenizerError) are one-line errors too."""
    try:
        main()
    except TokenizerError as e:
        fail(str(e))


def parse_args(script_file, **defaults):
    """--input, --out_dir and the script's own `defaults`, overridden as --key=value."""
    args = apply_overrides({"input": "", "out_dir": "", **defaults}, sys.argv[1:])
    args["out_dir"] = Path(args["out_dir"] or Path(script_file).resolve().parent)
    args["out_dir"].mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(**args)


def _input_path(args):
    path = Path(args.input)
    if not path.is_file():
        fail(f"--input file {args.input} not found")
    return path


def read_text(args, url):
    """The raw text: --input if given, else `url` downloaded once into out_dir/input.txt."""
    if args.input:
        return _input_path(args).read_text(encoding="utf-8")
    path = args.out_dir / "input.txt"
    if not path.exists():
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                path.write_bytes(response.read())
        except OSError as e:
            fail(f"could not download {url} ({e}): pass --input=PATH to a local copy")
    return path.read_text(encoding="utf-8")


def read_documents(args):
    """Documents of the --input file: JSON Lines ({"text": ...} per line, for .jsonl/.json) or
    plain text with documents separated by blank lines."""
    path = _input_path(args)
    if path.suffix not in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        return [doc.strip("\n") for doc in re.split(r"\n\s*\n", text) if doc.strip()]
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                doc = None
            if not isinstance(doc, str):
                fail(f"{path} line {line_number}: expected a JSON object with a string \"text\" field")
            docs.append(doc)
    return docs


def tokenize_documents(tok, docs, num_threads=1):
    """Each document's ids followed by the end-of-text token, which separates documents in the stream."""
    def encode(doc):
        return tok.encode(doc) + [tok.eot_token]
    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # tiktoken releases the GIL while encoding
        return list(pool.map(encode, docs))


def write_bin(path, chunks, dtype, total=None):
    """Write token-id chunks back to back as one flat array; through np.memmap, so `chunks` may be a
    generator (then pass `total`) and the whole stream never has to fit in memory."""
    if total is None:
        total = sum(len(chunk) for chunk in chunks)
    if total == 0:
        fail(f"{path.name} would be empty: give more input text")
    arr = np.memmap(path, dtype=dtype, mode="w+", shape=(total,))
    idx = 0
    for chunk in chunks:
        arr[idx: idx + len(chunk)] = chunk
        idx += len(chunk)
    arr.flush()
    print(f"{path.name}: {total:,} tokens")


def write_meta(out_dir, tok):
    meta = make_meta(tok)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_dataset(out_dir, tok, splits):
    """`splits` maps a split name ("train", "val", ...) to its token-id chunks: <name>.bin each, then meta.json."""
    for name, chunks in splits.items():
        write_bin(out_dir / f"{name}.bin", chunks, dtype_for_vocab(tok.vocab_size))
    write_meta(out_dir, tok)
