"""
Prepare chat conversations for supervised fine-tuning (SFT): token rows plus loss masks.

    python data/chat/prepare.py --input=chats.jsonl                          # gpt2, "plain" format
    python data/chat/prepare.py --input=chats.jsonl --tokenizer=o200k_harmony   # "harmony" (GPT-OSS)
    python data/chat/prepare.py --input=chats.jsonl --chat_format=gemma --block_size=512 --pack=False

Input: JSON Lines, one conversation per line: {"messages": [{"role": ..., "content": ...}, ...]}
with roles system, developer, user, assistant (blank lines are skipped). --val_input=PATH gives the
validation conversations; without it --val_fraction (default 0.1) of the conversations, drawn at
random (--seed), become val. Each conversation is rendered by tokenizer.render_chat in --chat_format
(default: tokenizer.default_chat_format: "harmony" for o200k_harmony, else "plain"; --chat_format=gemma
for Gemma-style models); the table of formats and exactly which tokens are trained is in tokenizer.py.
--tokenizer: any tiktoken encoding (default gpt2), or "char" (vocabulary = the characters of the
rendered conversations).

Output, in --out_dir (default this folder), for split in train, val:
    <split>.bin       token ids, meta["dtype"] (uint16, or uint32 for vocabularies over 65,536)
    <split>_mask.bin  uint8 0/1, one per token: the same length as <split>.bin
    meta.json         tokenizer.py's keys, plus chat_format, block_size, row_len (= block_size + 1),
                      packed (true/false) and pad_token (the eot token, or 0 for "char")

Both files are FIXED ROWS of row_len tokens stored back to back (no header): read with
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r").reshape(-1, meta["row_len"])
    mask   = np.memmap(mask_path, dtype=np.uint8, mode="r").reshape(-1, meta["row_len"])
A training example is one row: inputs = row[:-1], targets = row[1:], and the loss counts target j
only where mask[1:][j] is 1. mask[i] says whether token row[i] is one the model must learn to
produce (an assistant turn's content or end-of-turn tokens); mask[:, 0] is always 0, so
tokens[mask == 1] over a whole file are exactly the trained targets, each once.

--pack=True (default): the conversations (train in file order) are rendered back to back into one
stream and cut into rows that overlap by one token: row r = stream[r*block_size : r*block_size +
row_len], so every stream token but the first is a target in exactly one row, and a conversation may
span rows (attention then crosses conversation boundaries, as in pretraining). The last row is
filled with pad_token, mask 0.
--pack=False: one conversation per row, its first row_len tokens (longer ones are truncated; the
count is printed), then pad_token up to row_len, mask 0 on the padding.

Malformed input (a file that is not UTF-8, unreadable JSON, no "messages" list, an unknown role, a
non-string content or one holding a lone surrogate, a conversation without an assistant message, an
empty file) stops with one line naming the file and line, exit status 2, as does an --out_dir that is a
file, cannot be written, or holds a model or a token-stream dataset (--overwrite=True replaces the
latter). Everything is written into a temporary folder first (common.staged_dataset): a failure leaves
the dataset already in --out_dir as it was.
"""
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/common.py (it adds the repo root)
from common import check_text, fail, parse_args, run, staged_dataset, utf8_lines, write_bin, write_json  # noqa: E402
from tokenizer import (CHAT_FORMATS, CharTokenizer, check_messages, default_chat_format,  # noqa: E402
                       load_tokenizer, make_meta, render_chat)


def read_conversations(path, flag="--input"):
    """[(line_number, messages)] of a JSON Lines file (given as `flag`), checked."""
    path = Path(path)
    if not path.is_file():
        fail(f"{flag} {path} is a folder: give the path of a file" if path.is_dir() else
             f"{flag} file {path} not found")
    conversations = []
    for line_number, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            fail(f"{path} line {line_number}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        if not isinstance(obj, dict) or "messages" not in obj:
            fail(f'{path} line {line_number}: expected a JSON object with a "messages" list')
        try:
            check_messages(obj["messages"])
        except ValueError as e:
            fail(f"{path} line {line_number}: {e}")
        for i, m in enumerate(obj["messages"], 1):
            check_text(m["content"], f"{path} line {line_number} message {i}")
        if not any(m["role"] == "assistant" for m in obj["messages"]):
            fail(f"{path} line {line_number}: no assistant message, so nothing to learn")
        conversations.append((line_number, obj["messages"]))
    if not conversations:
        fail(f"{path} has no conversations")
    return conversations


def split(args):
    train = read_conversations(args.input)
    if args.val_input:
        return {"train": train, "val": read_conversations(args.val_input, "--val_input")}
    if not 0 < args.val_fraction < 1:
        fail(f"--val_fraction must be between 0 and 1, not {args.val_fraction}")
    n_val = max(1, round(len(train) * args.val_fraction))
    if n_val >= len(train):
        fail(f"{args.input} has {len(train)} conversation(s): too few to split off val "
             f"(give more, or pass --val_input=PATH)")
    val_indices = set(random.Random(args.seed).sample(range(len(train)), n_val))
    return {"train": [c for i, c in enumerate(train) if i not in val_indices],
            "val": [c for i, c in enumerate(train) if i in val_indices]}


class _CodePoints:
    """Renders text as Unicode code points: collects the characters a char-level vocabulary needs."""
    name, eot_token = "char", None

    def encode(self, text, allow_special=False):
        return [ord(c) for c in text]


def source(args, split_name):
    """The file a split's conversations come from."""
    return args.val_input if split_name == "val" and args.val_input else args.input


def make_tokenizer(args, splits, chat_format):
    if args.tokenizer != "char":
        return load_tokenizer({"tokenizer": args.tokenizer})
    chars = set()
    for name, conversations in splits.items():
        for ids, _ in render(_CodePoints(), conversations, chat_format, source(args, name)):
            chars.update(chr(i) for i in ids)
    return CharTokenizer("".join(sorted(chars)))


def render(tok, conversations, chat_format, path):
    rendered = []
    for line_number, messages in conversations:
        try:
            rendered.append(render_chat(tok, messages, chat_format))
        except ValueError as e:
            fail(f"{path} line {line_number}: {e}")
    return rendered


def packed_rows(rendered, row_len, pad_token):
    ids = np.array([t for r in rendered for t in r[0]], dtype=np.int64)
    mask = np.array([m for r in rendered for m in r[1]], dtype=np.uint8)
    step = row_len - 1
    n_rows = max(1, -(-(len(ids) - 1) // step))  # ceil: rows needed for targets 1 .. len-1
    rows = np.full((n_rows, row_len), pad_token, dtype=np.int64)
    masks = np.zeros((n_rows, row_len), dtype=np.uint8)
    for r in range(n_rows):
        chunk = slice(r * step, r * step + row_len)
        rows[r, :len(ids[chunk])] = ids[chunk]
        masks[r, :len(ids[chunk])] = mask[chunk]
    masks[:, 0] = 0  # the first token of a row is only an input (it was the previous row's last target)
    return rows, masks


def padded_rows(rendered, row_len, pad_token):
    rows = np.full((len(rendered), row_len), pad_token, dtype=np.int64)
    masks = np.zeros((len(rendered), row_len), dtype=np.uint8)
    truncated = 0
    for r, (ids, mask) in enumerate(rendered):
        truncated += len(ids) > row_len
        rows[r, :len(ids[:row_len])] = ids[:row_len]
        masks[r, :len(mask[:row_len])] = mask[:row_len]
    masks[:, 0] = 0
    if truncated:
        print(f"{truncated} of {len(rendered)} conversations are longer than row_len {row_len}: truncated")
    return rows, masks


def main():
    args = parse_args(__file__, chat=True, val_input="", val_fraction=0.1, tokenizer="gpt2", chat_format="",
                      block_size=1024, pack=True, seed=1337)
    if not args.input:
        fail("pass --input=PATH: a JSON Lines file of {\"messages\": [...]} conversations")
    if args.block_size < 1:
        fail(f"--block_size must be at least 1, not {args.block_size}")
    chat_format = args.chat_format or default_chat_format(args.tokenizer)
    if chat_format not in CHAT_FORMATS:
        fail(f"unknown --chat_format {chat_format!r} (expected one of {', '.join(CHAT_FORMATS)})")
    if chat_format == "harmony" and args.tokenizer != "o200k_harmony":
        fail(f"--chat_format=harmony needs --tokenizer=o200k_harmony (its special tokens), not {args.tokenizer!r}")
    splits = split(args)
    tok = make_tokenizer(args, splits, chat_format)
    row_len = args.block_size + 1
    pad_token = tok.eot_token if tok.eot_token is not None else 0
    meta = make_meta(tok)
    with staged_dataset(args.out_dir) as staging:  # the old dataset is replaced only when the new one is whole
        for name, conversations in splits.items():
            rendered = render(tok, conversations, chat_format, source(args, name))
            rows, masks = (packed_rows if args.pack else padded_rows)(rendered, row_len, pad_token)
            print(f"{name}: {len(conversations):,} conversations, {rows.shape[0]:,} rows of {row_len} tokens, "
                  f"{int(masks.sum()):,} trained tokens")
            write_bin(staging / f"{name}.bin", [rows.ravel()], meta["dtype"])
            write_bin(staging / f"{name}_mask.bin", [masks.ravel()], "uint8")
        meta.update(chat_format=chat_format, block_size=args.block_size, row_len=row_len,
                    packed=bool(args.pack), pad_token=pad_token)
        write_json(staging / "meta.json", meta)


if __name__ == "__main__":
    run(main)
