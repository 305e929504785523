"""Chat formats (tokenizer.render_chat / render_prompt / stop tokens) and data/chat/*.py, checked against
token sequences built by hand from the format's pieces with tiktoken, independently of render_chat."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")  # offline tiktoken, here and in subprocesses

import tiktoken  # noqa: E402

sys.path.insert(0, str(REPO))
from tokenizer import (CharTokenizer, default_chat_format, load_tokenizer, read_meta,  # noqa: E402
                       render_chat, render_prompt, stop_strings, stop_tokens)

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! <|end|> is just text."},
        {"role": "user", "content": "Reverse: abc"},
        {"role": "assistant", "content": "cba"}]
HARMONY_IDS = {"<|endoftext|>": 199999, "<|return|>": 200002, "<|start|>": 200006, "<|end|>": 200007,
               "<|message|>": 200008, "<|channel|>": 200005, "<|call|>": 200012}


def tok(name):
    return load_tokenizer({"tokenizer": name})


def built(pieces, encode):
    """(ids, mask) from (piece, trained) pairs; a piece is text (encoded on its own) or a token id."""
    ids, mask = [], []
    for piece, trained in pieces:
        new = [piece] if isinstance(piece, int) else encode(piece)
        ids += new
        mask += [trained] * len(new)
    return ids, mask


def harmony_expected():
    enc = tiktoken.get_encoding("o200k_harmony")
    S = HARMONY_IDS
    pieces = [(S["<|start|>"], 0), ("system", 0), (S["<|message|>"], 0), ("Be brief.", 0), (S["<|end|>"], 0),
              (S["<|start|>"], 0), ("user", 0), (S["<|message|>"], 0), ("Hi there", 0), (S["<|end|>"], 0),
              (S["<|start|>"], 0), ("assistant", 0), (S["<|channel|>"], 0), ("final", 0), (S["<|message|>"], 0),
              ("Hello! <|end|> is just text.", 1), (S["<|end|>"], 1),
              (S["<|start|>"], 0), ("user", 0), (S["<|message|>"], 0), ("Reverse: abc", 0), (S["<|end|>"], 0),
              (S["<|start|>"], 0), ("assistant", 0), (S["<|channel|>"], 0), ("final", 0), (S["<|message|>"], 0),
              ("cba", 1), (S["<|return|>"], 1)]
    text = ("<|start|>system<|message|>Be brief.<|end|><|start|>user<|message|>Hi there<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Hello! <|end|> is just text.<|end|>"
            "<|start|>user<|message|>Reverse: abc<|end|>"
            "<|start|>assistant<|channel|>final<|message|>cba<|return|>")
    return built(pieces, enc.encode_ordinary), text


def gemma_expected():
    enc = tiktoken.get_encoding("gpt2")
    pieces = [("<start_of_turn>user\n", 0), ("Be brief.\n\nHi there", 0), ("<end_of_turn>", 0), ("\n", 0),
              ("<start_of_turn>model\n", 0), ("Hello! <|end|> is just text.", 1), ("<end_of_turn>", 1), ("\n", 0),
              ("<start_of_turn>user\n", 0), ("Reverse: abc", 0), ("<end_of_turn>", 0), ("\n", 0),
              ("<start_of_turn>model\n", 0), ("cba", 1), ("<end_of_turn>", 1), ("\n", 0)]
    text = ("<start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
            "<start_of_turn>model\nHello! <|end|> is just text.<end_of_turn>\n"
            "<start_of_turn>user\nReverse: abc<end_of_turn>\n<start_of_turn>model\ncba<end_of_turn>\n")
    return built(pieces, enc.encode_ordinary), text


def plain_expected():
    enc = tiktoken.get_encoding("gpt2")
    pieces = [("System: ", 0), ("Be brief.", 0), ("\n", 0), ("User: ", 0), ("Hi there", 0), ("\n", 0),
              ("Assistant: ", 0), ("Hello! <|end|> is just text.", 1), (50256, 1),
              ("User: ", 0), ("Reverse: abc", 0), ("\n", 0), ("Assistant: ", 0), ("cba", 1), (50256, 1)]
    text = ("System: Be brief.\nUser: Hi there\nAssistant: Hello! <|end|> is just text.<|endoftext|>"
            "User: Reverse: abc\nAssistant: cba<|endoftext|>")
    return built(pieces, enc.encode_ordinary), text


EXPECTED = {"harmony": ("o200k_harmony", harmony_expected), "gemma": ("gpt2", gemma_expected),
            "plain": ("gpt2", plain_expected)}
HEADERS = {"harmony": "<|start|>assistant<|channel|>final<|message|>", "gemma": "<start_of_turn>model\n",
           "plain": "Assistant: "}


def test_harmony_special_token_ids():
    t = tok("o200k_harmony")
    for text, id_ in HARMONY_IDS.items():
        assert t.encode(text, allow_special=True) == [id_]
    assert t.eot_token == 199999
    assert stop_tokens(t, "harmony") == [200002, 200012, 200007, 199999]
    assert stop_strings(t, "harmony") == []


@pytest.mark.parametrize("fmt", ["harmony", "gemma", "plain"])
def test_render_chat_matches_hand_built(fmt):
    name, expected = EXPECTED[fmt]
    t = tok(name)
    (ids, mask), text = expected()
    got_ids, got_mask = render_chat(t, CONV, fmt)
    assert got_ids == ids
    assert got_mask == [bool(m) for m in mask]
    assert t.decode(got_ids) == text
    # the mask covers exactly the assistant answers and the tokens that close them
    trained = t.decode([i for i, m in zip(got_ids, got_mask) if m])
    end = {"harmony": ["<|end|>", "<|return|>"], "gemma": ["<end_of_turn>"] * 2, "plain": ["<|endoftext|>"] * 2}[fmt]
    assert trained == f"Hello! <|end|> is just text.{end[0]}cba{end[1]}"


@pytest.mark.parametrize("fmt", ["harmony", "gemma", "plain"])
def test_render_prompt_ends_with_assistant_header(fmt):
    t = tok(EXPECTED[fmt][0])
    prompt = render_prompt(t, CONV[:-1], fmt)
    header = t.encode(HEADERS[fmt], allow_special=(fmt == "harmony"))
    assert prompt[-len(header):] == header
    # what the model sees at inference is exactly the training prefix before the answer
    ids, mask = render_chat(t, CONV, fmt)
    assert prompt == ids[:len(prompt)]
    assert mask[len(prompt) - 1] is False and mask[len(prompt)] is True
    # a conversation that ends with a reply renders it as history (harmony: <|end|>, not <|return|>)
    again = render_prompt(t, CONV, fmt)
    if fmt == "harmony":
        assert again[:len(ids) - 1] == ids[:-1] and ids[-1] == HARMONY_IDS["<|return|>"]
        assert again[len(ids) - 1] == HARMONY_IDS["<|end|>"]
    else:
        assert again[:len(ids)] == ids
    assert again[len(ids):] == header


def test_char_plain_format():
    t = CharTokenizer("".join(sorted(set("System: User: Assistant: \nhi yo abcABC"))))
    ids, mask = render_chat(t, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "plain")
    assert t.decode(ids) == "User: hi\nAssistant: yo\n\n"
    assert t.decode([i for i, m in zip(ids, mask) if m]) == "yo\n\n"
    assert stop_tokens(t, "plain") == [] and stop_strings(t, "plain") == ["\n\n"]
    assert t.decode(render_prompt(t, [{"role": "user", "content": "hi"}], "plain")) == "User: hi\nAssistant: "


def test_stops_and_default_format():
    gpt2 = tok("gpt2")
    assert stop_tokens(gpt2, "plain") == [50256] and stop_strings(gpt2, "plain") == []
    assert stop_tokens(gpt2, "gemma") == [50256] and stop_strings(gpt2, "gemma") == ["<end_of_turn>"]
    assert default_chat_format({"tokenizer": "o200k_harmony"}) == "harmony"
    assert default_chat_format("o200k_harmony") == "harmony"
    assert default_chat_format(gpt2) == "plain"
    assert default_chat_format({"tokenizer": "char"}) == "plain"
    assert default_chat_format("gpt2", family="gemma3-compact") == "gemma"
    assert default_chat_format({"tokenizer": "gpt2", "chat_format": "gemma"}) == "gemma"


def test_render_errors():
    gpt2 = tok("gpt2")
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        render_chat(gpt2, [{"role": "bot", "content": "x"}], "plain")
    with pytest.raises(ValueError, match="content"):
        render_chat(gpt2, [{"role": "user"}], "plain")
    with pytest.raises(ValueError, match="non-empty"):
        render_chat(gpt2, [], "plain")
    with pytest.raises(ValueError, match="o200k_harmony"):
        render_chat(gpt2, CONV, "harmony")
    with pytest.raises(ValueError, match="first message"):
        render_chat(gpt2, CONV[1:3] + CONV[:1], "gemma")
    with pytest.raises(ValueError, match="unknown chat format"):
        render_chat(gpt2, CONV, "chatml")


# ---- data/chat/prepare.py and make_reverse.py ---------------------------------------------------

CONVS = [CONV,
         [{"role": "user", "content": "reverse: apple"}, {"role": "assistant", "content": "elppa"}],
         [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
          {"role": "assistant", "content": "Bonjour ! " * 30}],
         [{"role": "user", "content": "ÜnÏcode ☃?"}, {"role": "assistant", "content": "☃ ok"}]]
VAL = [[{"role": "user", "content": "reverse: dog"}, {"role": "assistant", "content": "god"}]]
END = {"harmony": ("<|end|>", "<|return|>"), "gemma": ("<end_of_turn>",) * 2, "plain": ("<|endoftext|>",) * 2}


def write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


def prepare(*args, script="prepare.py"):
    return subprocess.run([sys.executable, str(REPO / "data" / "chat" / script), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def load(out, split):
    meta = read_meta(out)
    rows = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
    masks = np.fromfile(out / f"{split}_mask.bin", dtype=np.uint8)
    assert len(rows) == len(masks) and len(rows) % meta["row_len"] == 0
    return meta, rows.reshape(-1, meta["row_len"]), masks.reshape(-1, meta["row_len"])


def answers(convs, fmt):
    """The trained text of each conversation: every assistant reply and the end marker closing it."""
    out = []
    for c in convs:
        last = max(i for i, m in enumerate(c) if m["role"] == "assistant") if c[-1]["role"] == "assistant" else -1
        out.append("".join(m["content"] + END[fmt][i == last] for i, m in enumerate(c) if m["role"] == "assistant"))
    return out


@pytest.mark.parametrize("fmt,tokenizer,dtype", [("plain", "gpt2", np.uint16), ("gemma", "gpt2", np.uint16),
                                                 ("harmony", "o200k_harmony", np.uint32)])
def test_prepare_packed(tmp_path, fmt, tokenizer, dtype):
    result = prepare(f"--input={write_jsonl(tmp_path / 'train.jsonl', CONVS)}", f"--out_dir={tmp_path}",
                     f"--val_input={write_jsonl(tmp_path / 'val.jsonl', VAL)}", f"--tokenizer={tokenizer}",
                     f"--chat_format={fmt}", "--block_size=16")
    assert result.returncode == 0, result.stderr
    t = tok(tokenizer)
    for split, convs in (("train", CONVS), ("val", VAL)):
        meta, rows, masks = load(tmp_path, split)
        assert meta["dtype"] == np.dtype(dtype).name and rows.dtype == dtype
        assert {k: meta[k] for k in ("chat_format", "block_size", "row_len", "packed", "pad_token")} == \
            {"chat_format": fmt, "block_size": 16, "row_len": 17, "packed": True, "pad_token": t.eot_token}
        assert not masks[:, 0].any()
        # rows overlap by one token: dropping each row's first token leaves the stream (then padding)
        rendered = [render_chat(t, c, fmt) for c in convs]
        stream = np.array([i for ids, _ in rendered for i in ids])
        stream_mask = np.array([m for _, mask in rendered for m in mask], dtype=np.uint8)
        pos = np.arange(len(rows))[:, None] * 16 + np.arange(17)  # stream position of each row slot
        assert len(rows) == -(-(len(stream) - 1) // 16)  # just enough rows for every target
        inside = pos < len(stream)
        assert (rows[inside] == stream[pos[inside]]).all()
        assert (masks[:, 1:][inside[:, 1:]] == stream_mask[pos[:, 1:][inside[:, 1:]]]).all()
        assert (rows[~inside] == t.eot_token).all() and not masks[~inside].any()  # padding: never trained
        # the masked targets, row by row as train.py reads them, are exactly the answers + end markers
        targets = [tok_id for r, m in zip(rows, masks) for tok_id in r[1:][m[1:] == 1]]
        assert t.decode(targets) == "".join(answers(convs, fmt))


def test_prepare_padded_and_val_split(tmp_path):
    convs = CONVS + [[{"role": "user", "content": f"reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]
                     for w in ["cat", "house", "tree", "ocean", "lamp", "sky"]]
    result = prepare(f"--input={write_jsonl(tmp_path / 'c.jsonl', convs)}", f"--out_dir={tmp_path}",
                     "--pack=False", "--block_size=48", "--val_fraction=0.2")
    assert result.returncode == 0, result.stderr
    assert "1 of 8 conversations are longer than row_len 49: truncated" in result.stdout
    t = tok("gpt2")
    rendered = [render_chat(t, c, "plain") for c in convs]
    found = {}
    for split in ("train", "val"):
        meta, rows, masks = load(tmp_path, split)
        assert meta["packed"] is False and meta["chat_format"] == "plain" and meta["row_len"] == 49
        assert meta["pad_token"] == 50256 and not masks[:, 0].any()
        for r, m in zip(rows, masks):  # one conversation per row: its first 49 tokens, then padding
            k = next(k for k, (ids, _) in enumerate(rendered) if r[:len(ids)].tolist() == ids[:49])
            ids, mask = rendered[k]
            n = min(len(ids), 49)
            assert m[1:n].tolist() == mask[1:n] and (r[n:] == 50256).all() and not m[n:].any()
            found[k] = split
            if len(ids) <= 49:
                assert t.decode(r[1:][m[1:] == 1]) == answers([convs[k]], "plain")[0]
            else:  # the long French answer, truncated at row_len
                assert k == 2 and t.decode(r[1:][m[1:] == 1]).startswith("Bonjour ! Bonjour")
    assert len(load(tmp_path, "train")[1]) + len(load(tmp_path, "val")[1]) == 10
    assert sorted(found) == list(range(10))  # each conversation in exactly one split
    assert list(found.values()).count("val") == 2  # 20% of 10, by conversation


def test_prepare_char(tmp_path):
    result = prepare(f"--input={write_jsonl(tmp_path / 't.jsonl', CONVS)}", f"--out_dir={tmp_path}",
                     f"--val_input={write_jsonl(tmp_path / 'v.jsonl', VAL)}", "--tokenizer=char", "--block_size=32")
    assert result.returncode == 0, result.stderr
    meta, rows, masks = load(tmp_path, "train")
    assert meta["tokenizer"] == "char" and meta["eot_token"] is None and meta["pad_token"] == 0
    t = load_tokenizer(meta)
    assert t.decode([i for r, m in zip(rows, masks) for i in r[1:][m[1:] == 1]]) == \
        "".join(a.replace("<|endoftext|>", "\n\n") for a in answers(CONVS, "plain"))


@pytest.mark.parametrize("lines,message", [
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "",
      '{"messages": [{"role": "user", "content": "a"}'], "line 3: not valid JSON"),
    (['{"text": "hello"}'], 'line 1: expected a JSON object with a "messages" list'),
    (['{"messages": [{"role": "gpt", "content": "b"}]}'], "line 1: message 1 has unknown role 'gpt'"),
    (['{"messages": [{"role": "user", "content": 5}]}'], 'line 1: message 1 (user) needs a string "content"'),
    (['{"messages": [{"role": "user", "content": "a"}]}'], "line 1: no assistant message"),
    (["", "  "], "has no conversations"),
])
def test_prepare_malformed(tmp_path, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = prepare(f"--input={bad}", f"--out_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "train.bin").exists()


def test_prepare_flag_errors(tmp_path):
    good = write_jsonl(tmp_path / "c.jsonl", CONVS)
    for args, message in [((), "pass --input=PATH"),
                          ((f"--input={good}", "--chat_format=harmony"), "needs --tokenizer=o200k_harmony"),
                          ((f"--input={good}", "--chat_format=chatml"), "unknown --chat_format"),
                          ((f"--input={write_jsonl(tmp_path / 'one.jsonl', CONVS[:1])}",), "too few to split off val"),
                          ((f"--input={write_jsonl(tmp_path / 'g.jsonl', [CONV[1:3] + CONV[:1]])}",
                            "--chat_format=gemma", f"--val_input={good}"),
                           "line 1: the gemma chat format takes a system message only")]:
        result = prepare(*args, f"--out_dir={tmp_path}")
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_make_reverse(tmp_path):
    result = prepare("--n=300", "--seed=7", f"--out={tmp_path}", script="make_reverse.py")
    assert result.returncode == 0, result.stderr
    splits = {}
    for split in ("train", "val"):
        lines = (tmp_path / f"reverse_{split}.jsonl").read_text().splitlines()
        words = []
        for line in lines:
            user, assistant = json.loads(line)["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            word = user["content"].removeprefix("reverse: ")
            assert user["content"] == f"reverse: {word}" and assistant["content"] == word[::-1]
            assert 3 <= len(word) <= 6 and word.isascii() and word.isalpha() and word.islower()
            words.append(word)
        splits[split] = words
    assert (len(splits["train"]), len(splits["val"])) == (270, 30)
    assert len(set(splits["train"]) | set(splits["val"])) == 300  # distinct words; val words held out
    again = tmp_path / "again"
    prepare("--n=300", "--seed=7", f"--out={again}", script="make_reverse.py")
    assert (again / "reverse_train.jsonl").read_text() == (tmp_path / "reverse_train.jsonl").read_text()
    # and prepare.py takes its output
    result = prepare(f"--input={tmp_path / 'reverse_train.jsonl'}", f"--val_input={tmp_path / 'reverse_val.jsonl'}",
                     f"--out_dir={tmp_path}", "--block_size=64")
    assert result.returncode == 0, result.stderr
