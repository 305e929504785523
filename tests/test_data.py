"""data/*/prepare.py outputs and tokenizer.py, checked against independently computed expectations."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")  # offline tiktoken, here and in subprocesses

import tiktoken  # noqa: E402

sys.path.insert(0, str(REPO))
from tokenizer import TokenizerError, load_tokenizer, read_meta  # noqa: E402


def prepare(name, *args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "data" / name / "prepare.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def prepared(name, out_dir, *args, cwd=REPO):
    result = prepare(name, f"--out_dir={out_dir}", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads((out_dir / "meta.json").read_text())


def tokens(out_dir, split, dtype):
    return np.fromfile(out_dir / f"{split}.bin", dtype=dtype)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare_char")
    # run from the script's own folder: the other datasets run from the repo root or elsewhere
    prepared("shakespeare_char", out, f"--input={SHAKESPEARE}", cwd=REPO / "data" / "shakespeare_char")
    return out


def test_shakespeare_char(char_dir):
    text = SHAKESPEARE.read_text()
    meta = json.loads((char_dir / "meta.json").read_text())
    chars = "".join(sorted(set(text)))
    assert meta == {"tokenizer": "char", "vocab_size": 65, "dtype": "uint16", "eot_token": None, "chars": chars}
    train, val = tokens(char_dir, "train", np.uint16), tokens(char_dir, "val", np.uint16)
    assert (len(train), len(val)) == (1_003_854, 111_540)  # nanoGPT's numbers: 90% / 10% of 1,115,394
    assert "".join(chars[i] for i in np.concatenate([train, val])) == text
    assert load_tokenizer(read_meta(char_dir)).decode(val) == text[1_003_854:]


def test_shakespeare_gpt2(tmp_path):
    meta = prepared("shakespeare", tmp_path, f"--input={SHAKESPEARE}")
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256}
    train, val = tokens(tmp_path, "train", np.uint16), tokens(tmp_path, "val", np.uint16)
    assert (len(train), len(val)) == (301_966, 36_059)  # nanoGPT's numbers
    text = SHAKESPEARE.read_text()
    assert tiktoken.get_encoding("gpt2").decode(val.tolist()) == text[int(len(text) * 0.9):]


DOCS = [f"Document {i}: " + "lorem ipsum " * i for i in range(9)] + ["Ünïcode ☃ and a literal <|endoftext|> in text"]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def stream(encoding, docs):
    """Hand-built expectation: each document's ordinary tokens, then <|endoftext|>."""
    enc = tiktoken.get_encoding(encoding)
    return [t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]]


@pytest.mark.parametrize("encoding,dtype,vocab,eot", [("gpt2", np.uint16, 50257, 50256),
                                                      ("o200k_harmony", np.uint32, 201088, 199999)])
def test_wikipedia_jsonl(tmp_path, encoding, dtype, vocab, eot):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "out"
    meta = prepared("wikipedia", out, f"--input={jsonl}", f"--tokenizer={encoding}", cwd=tmp_path)
    assert meta == {"tokenizer": encoding, "vocab_size": vocab, "dtype": np.dtype(dtype).name, "eot_token": eot}
    # 10 documents < 10000+1000+1000, so 80/10/10: 8 train, 1 val, 1 test
    for split, docs in [("train", DOCS[:8]), ("val", DOCS[8:9]), ("test", DOCS[9:])]:
        ids = tokens(out, split, dtype)
        assert ids.tolist() == stream(encoding, docs)
        assert (ids == eot).sum() == len(docs)  # the literal "<|endoftext|>" text is not the token


def test_wikipedia_split_counts(tmp_path):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    prepared("wikipedia", tmp_path, f"--input={jsonl}", "--n_train=3", "--n_val=2", "--n_test=1")
    assert tokens(tmp_path, "train", np.uint16).tolist() == stream("gpt2", DOCS[:3])
    assert tokens(tmp_path, "val", np.uint16).tolist() == stream("gpt2", DOCS[3:5])
    assert tokens(tmp_path, "test", np.uint16).tolist() == stream("gpt2", DOCS[5:6])


def documents_in(ids, eot, decode):
    """Split a token stream at the end-of-text ids; it must end with one."""
    ends = np.flatnonzero(ids == eot)
    assert len(ends) and ends[-1] == len(ids) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [decode(ids[start:end].tolist()) for start, end in zip(starts, ends)]


def test_openwebtext_local_file(tmp_path):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    meta = prepared("openwebtext", tmp_path, f"--input={jsonl}", "--num_proc=2")
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256}
    # ceil(0.0005 * 10) = 1 validation document; together the splits hold every document once
    decode = tiktoken.get_encoding("gpt2").decode
    val_docs = documents_in(tokens(tmp_path, "val", np.uint16), 50256, decode)
    train_docs = documents_in(tokens(tmp_path, "train", np.uint16), 50256, decode)
    assert len(val_docs) == 1 and sorted(train_docs + val_docs) == sorted(DOCS)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="would download OpenWebText")
def test_openwebtext_without_datasets_says_how_to_install(tmp_path):
    result = prepare("openwebtext", f"--out_dir={tmp_path}")
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "pip install datasets" in result.stderr


def test_missing_input_is_one_line(tmp_path):
    result = prepare("shakespeare_char", f"--out_dir={tmp_path}", f"--input={tmp_path / 'nope.txt'}")
    assert result.returncode != 0 and result.stderr.count("\n") == 1 and "nope.txt" in result.stderr


def test_tiktoken_special_tokens_only_when_allowed():
    tok = load_tokenizer({"tokenizer": "gpt2"})
    assert tok.encode("hi<|endoftext|>", allow_special=True) == [5303, 50256]
    assert 50256 not in tok.encode("hi<|endoftext|>")
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"


def test_char_tokenizer_roundtrip():
    tok = load_tokenizer({"tokenizer": "char", "chars": " abc", "vocab_size": 4})
    assert tok.encode("cab a") == [3, 1, 2, 0, 1] and tok.decode([3, 1, 2]) == "cab"
    assert (tok.vocab_size, tok.eot_token, tok.name) == (4, None, "char")


def test_unknown_tokenizer_is_one_line(capsys):
    with pytest.raises(TokenizerError) as error:  # the scripts print it as their one-line error
        load_tokenizer({"tokenizer": "gtp2"})
    message = str(error.value)
    assert message.startswith("unknown tokenizer 'gtp2'") and "\n" not in message


def test_read_meta_missing_names_the_fix(tmp_path):
    with pytest.raises(TokenizerError) as error:
        read_meta(tmp_path)
    assert "prepare.py" in str(error.value)
