"""
Prepare tiny Shakespeare with GPT-2 BPE (nanoGPT's shakespeare): the first 90% of the text is
train, the last 10% val, each encoded with tiktoken's gpt2 encoding (no special tokens).
Writes train.bin (301,966 tokens), val.bin (36,059 tokens) and meta.json.

    python data/shakespeare/prepare.py [--input=input.txt] [--out_dir=DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/common.py (it adds the repo root)
from common import parse_args, read_text, run, write_dataset  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main():
    args = parse_args(__file__)
    text = read_text(args, URL)
    tok = load_tokenizer({"tokenizer": "gpt2"})
    split = int(len(text) * 0.9)
    write_dataset(args.out_dir, tok, {"train": [tok.encode(text[:split])], "val": [tok.encode(text[split:])]})


if __name__ == "__main__":
    run(main)
