"""
Helpers shared by data/*/prepare.py: flags, raw text, documents, and writing the dataset.

A prepared dataset is a folder of flat token streams, `<split>.bin` (raw numpy arrays, no header:
read with np.memmap(path, dtype=meta["dtype"], mode="r")), plus meta.json (schema: tokenizer.py).
Every prepare.py takes --input=PATH (a local copy instead of downloading) and --out_dir=DIR
(default: the script's own folder); flags are parsed by configurator.py, so --help lists them.

Writing never costs data (staged_dataset): every file of the new dataset is written into a fresh
temporary folder inside out_dir, and only when all of them are complete does the old dataset give way:
its meta.json is removed first, then each new file is renamed into place, meta.json last. A failure
before that (bad input, a full disk, an exception) leaves the old dataset exactly as it was; a kill -9
during the renames leaves a folder without meta.json, which every reader refuses, never a silent mix
of two datasets. Renaming replaces a link rather than writing through it, so a meta.json hard-linked
into a checkpoint is never changed. An out_dir that holds a model (a train.py checkpoint, an export) or
a dataset of the other kind (chat rows vs. token streams) is refused unless --overwrite=True; a
re-run over a dataset of the same kind is fine.

A user's mistake (missing or non-UTF-8 input, an out_dir that is a file or cannot be created or
written, malformed input) is one line on stderr starting "error: ", exit status 2.
"""
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: configurator.py, tokenizer.py
from configurator import apply_overrides  # noqa: E402
from tokenizer import TokenizerError, dtype_for_vocab, make_meta  # noqa: E402

SPLITS = ("train", "val", "test")
# what marks a folder as a model's: a train.py out_dir (checkpoint.py's names) or a Hugging Face / export folder
MODEL_DIRS = ("ckpt", "ckpt.tmp", "ckpt.old")
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
               "adapter_config.json", "train_state.pt")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main):
    """A prepare.py's entry point: the tokenizer's errors (TokenizerError), out of memory and failed writes are
    one-line errors too."""
    try:
        main()
    except TokenizerError as e:
        fail(str(e))
    except MemoryError:
        fail("out of memory: the input or --block_size is too large for this machine")
    except OSError as e:  # a full disk or a folder gone while writing; the old dataset is as it was
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        fail(f"could not write the dataset: {_reason(e)}{where}; a dataset already in --out_dir is as it was: "
             f"free some space, or choose another --out_dir")


def _reason(error):
    return error.strerror or " ".join(str(error).split()) or type(error).__name__


def parse_args(script_file, chat=False, **defaults):
    """--input, --out_dir, --overwrite and the script's own `defaults`, overridden as --key=value. out_dir is
    checked (and created) here, before any work: see check_out_dir. chat: the script writes chat rows."""
    args = apply_overrides({"input": "", "out_dir": "", "overwrite": False, **defaults}, sys.argv[1:])
    args["out_dir"] = Path(args["out_dir"] or Path(script_file).resolve().parent)
    check_out_dir(args["out_dir"], chat, args["overwrite"])
    return SimpleNamespace(**args)


def holds_model(folder):
    """What in `folder` says a model lives there (a checkpoint, an export), or None."""
    for name in MODEL_DIRS:
        if (folder / name).is_dir():
            return f"{name}/"
    for name in MODEL_FILES:
        if os.path.lexists(folder / name):
            return name
    shards = sorted(folder.glob("model-*.safetensors"))
    return shards[0].name if shards else None


def dataset_kind(folder):
    """"chat" or "tokens" for the dataset in `folder` (by its meta.json), None when it holds none."""
    meta = folder / "meta.json"
    if not os.path.lexists(meta) and not any(os.path.lexists(folder / f"{s}.bin") for s in SPLITS):
        return None
    try:
        loaded = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a broken dataset, or bins without meta.json: nothing good to keep
        return "unreadable"
    return "chat" if isinstance(loaded, dict) and "row_len" in loaded else "tokens"


def file_in_the_way(path):
    """`path` or the nearest of its parents that exists but is not a folder (a file, a dangling link), or None."""
    path = Path(path)
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return None if p.is_dir() else p
    return None


def check_out_dir(out_dir, chat=False, overwrite=False):
    """Create out_dir, or fail in one line: it is a file, cannot be created or written, or holds what this script
    did not make (a model, or a dataset of the other kind) and overwrite is False."""
    blocker = file_in_the_way(out_dir)
    if blocker:
        what = "a file" if blocker.is_file() else "a broken link" if blocker.is_symlink() else "no folder"
        fail(f"--out_dir {out_dir} is {what}, not a folder: choose a folder for the dataset" if blocker == out_dir
             else f"--out_dir {out_dir} cannot be created: {blocker} is {what}, not a folder; choose another --out_dir")
    if out_dir.is_dir() and not overwrite:  # refused before anything is written there
        model = holds_model(out_dir)
        if model:
            fail(f"--out_dir {out_dir} holds a model ({model}): a dataset there would mix with it; choose another "
                 f"--out_dir, or pass --overwrite=True")
        kind, ours = dataset_kind(out_dir), "chat" if chat else "tokens"
        if kind in ("chat", "tokens") and kind != ours:
            what = "chat dataset (rows and masks)" if kind == "chat" else "token-stream dataset"
            fail(f"--out_dir {out_dir} holds a {what} that this script did not make: choose another --out_dir, or "
                 f"pass --overwrite=True to replace it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".prepare-", dir=out_dir)  # can we write there?
        os.rmdir(probe)
    except OSError as e:
        fail(f"--out_dir {out_dir} cannot be created or written ({_reason(e)}): choose a writable folder")


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _is_dataset_file(name):
    return name == "meta.json" or any(name in (f"{s}.bin", f"{s}_mask.bin") for s in SPLITS)


@contextlib.contextmanager
def staged_dataset(out_dir):
    """Yields a fresh temporary folder inside out_dir to write the whole dataset into (<split>.bin, masks,
    meta.json). On success its files replace the dataset in out_dir (meta.json removed first, renamed in last;
    split files of the old dataset that the new one lacks are removed); on any failure the folder goes and
    out_dir is untouched."""
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        yield staging
        names = sorted(os.listdir(staging))
        if "meta.json" not in names:
            raise RuntimeError("staged_dataset: the dataset has no meta.json")
        for name in names:
            _fsync(staging / name)
        old_meta = out_dir / "meta.json"
        if os.path.lexists(old_meta):
            os.unlink(old_meta)  # from here until the new one is in, out_dir is no dataset (readers refuse it)
        for old in os.listdir(out_dir):
            if _is_dataset_file(old) and old not in names:
                os.unlink(out_dir / old)  # a split the new dataset does not have
        for name in [n for n in names if n != "meta.json"] + ["meta.json"]:
            os.replace(staging / name, out_dir / name)
        _fsync(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _input_path(args):
    path = Path(args.input)
    if not path.is_file():
        fail(f"--input file {args.input} not found" if not path.is_dir() else
             f"--input {args.input} is a folder: give the path of a file")
    return path


def not_utf8(path, error, line_number=None):
    where = f"line {line_number}, " if line_number else ""
    fail(f"{path} is not UTF-8 text ({where}byte {error.start}: {error.reason}): convert it to UTF-8")


def read_utf8(path):
    """The text of a UTF-8 file, or a one-line error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        not_utf8(path, e)
    except OSError as e:
        fail(f"cannot read {path} ({_reason(e)})")


def check_text(text, where):
    """Fail when `text` (from a JSON string) holds a lone surrogate, which is no character and has no UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        fail(f"{where}: the text holds {text[e.start]!r}, a lone surrogate that is no Unicode character: remove it")


def read_text(args, url):
    """The raw text: --input if given, else `url` downloaded once into out_dir/input.txt."""
    if args.input:
        return read_utf8(_input_path(args))
    path = args.out_dir / "input.txt"
    if not path.exists():
        print(f"downloading {url}")
        tmp = path.with_name(f".input.txt.{os.getpid()}.tmp")
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                tmp.write_bytes(response.read())
            os.replace(tmp, path)  # a download cut short never passes for the text
        except OSError as e:
            fail(f"could not download {url} ({e}): pass --input=PATH to a local copy")
        finally:
            tmp.unlink(missing_ok=True)
    return read_utf8(path)


def read_documents(args):
    """Documents of the --input file: JSON Lines ({"text": ...} per line, for .jsonl/.json) or
    plain text with documents separated by blank lines."""
    path = _input_path(args)
    if path.suffix not in (".jsonl", ".json"):
        text = read_utf8(path)
        return [doc.strip("\n") for doc in re.split(r"\n\s*\n", text) if doc.strip()]
    docs = []
    for line_number, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            doc = None
        if not isinstance(doc, str):
            fail(f"{path} line {line_number}: expected a JSON object with a string \"text\" field")
        check_text(doc, f"{path} line {line_number}")
        docs.append(doc)
    return docs


def utf8_lines(path):
    """(line number, text) of each line of a UTF-8 file; a line that is not UTF-8 is a one-line error naming it."""
    try:
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    not_utf8(path, e, line_number)
                yield line_number, line
    except OSError as e:
        fail(f"cannot read {path} ({_reason(e)})")


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
    del arr
    print(f"{path.name}: {total:,} tokens")


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_meta(out_dir, tok):
    write_json(out_dir / "meta.json", make_meta(tok))


def write_dataset(out_dir, tok, splits):
    """`splits` maps a split name ("train", "val", ...) to its token-id chunks: <name>.bin each, then meta.json,
    all staged (staged_dataset) so the old dataset is replaced only when the new one is complete."""
    with staged_dataset(out_dir) as staging:
        for name, chunks in splits.items():
            write_bin(staging / f"{name}.bin", chunks, dtype_for_vocab(tok.vocab_size))
        write_meta(staging, tok)
