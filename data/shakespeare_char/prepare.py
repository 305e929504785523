"""
Prepare tiny Shakespeare for character-level language modeling (nanoGPT's shakespeare_char).
Every character is a token; the vocabulary is the text's sorted unique characters (65).
Writes train.bin (the first 90% of the text), val.bin (the last 10%) and meta.json.

    python data/shakespeare_char/prepare.py [--input=input.txt] [--out_dir=DIR]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/common.py (it adds the repo root)
from common import parse_args, read_text, run, write_dataset  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main():
    args = parse_args(__file__)
    text = read_text(args, URL)
    tok = CharTokenizer("".join(sorted(set(text))))
    print(f"{len(text):,} characters, vocab size {tok.vocab_size}")
    split = int(len(text) * 0.9)
    write_dataset(args.out_dir, tok, {"train": [tok.encode(text[:split])], "val": [tok.encode(text[split:])]})


if __name__ == "__main__":
    run(main)
