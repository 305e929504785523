"""
Prepare English Wikipedia for the Gemma-3 compact recipe: documents tokenized with GPT-2 BPE (by
default) and <|endoftext|> after each, split like the recipe's slices of wikimedia/wikipedia
20231101.en: train = train[:10000], val = train[10000:11000], test = train[81000:82000].
Writes train.bin, val.bin, test.bin and meta.json.

    python data/wikipedia/prepare.py                       # Hugging Face download: pip install datasets
    python data/wikipedia/prepare.py --input=docs.jsonl    # offline: {"text": ...} per line
    python data/wikipedia/prepare.py --tokenizer=o200k_harmony   # any tiktoken encoding (> 65,536 ids: uint32)

--n_train/--n_val/--n_test (default 10000/1000/1000) set the split sizes. With --input the first
n_train documents are train, the next n_val val, the next n_test test. A file with fewer documents
than that is split 80/10/10 instead: val and test get len//10 documents each (at least one).
From the hub the slices are train[:n_train], train[n_train:n_train+n_val], and n_test documents
from 81000 on (or right after val, if that is later), streamed: only the first ~82,000 articles are read.
"""
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/common.py (it adds the repo root)
from common import fail, parse_args, read_documents, run, tokenize_documents, write_dataset  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

TEST_START = 81000  # the recipe takes its test documents far from train and val


def hub_documents(args):
    try:
        from datasets import load_dataset
    except ImportError:
        fail("downloading Wikipedia needs Hugging Face datasets: pip install datasets "
             "(or pass --input=PATH to a local .jsonl file)")
    n_train, n_val, n_test = args.n_train, args.n_val, args.n_test
    test_start = max(TEST_START, n_train + n_val)
    ranges = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (test_start, test_start + n_test)}
    # streamed, in the order the slices train[a:b] index: a sliced load_dataset would first download and
    # convert all of English Wikipedia (6.4M articles, ~11 GB) to keep 12,000 of them
    splits = {name: [] for name in ranges}
    try:
        stream = load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        for i, row in enumerate(itertools.islice(stream, test_start + n_test)):
            for name, (start, end) in ranges.items():
                if start <= i < end:
                    splits[name].append(row["text"])
    except Exception as e:  # the network and hub libraries raise many kinds; the user's fix is the same
        reason = (str(e).strip().splitlines() or [""])[0]
        fail(f"could not read wikimedia/wikipedia from the Hugging Face Hub ({type(e).__name__}: {reason}): "
             f"check the network, or pass --input=PATH to a local .jsonl file")
    return splits


def file_documents(args):
    docs = read_documents(args)
    n_train, n_val, n_test = args.n_train, args.n_val, args.n_test
    if len(docs) < n_train + n_val + n_test:
        if len(docs) < 3:
            fail(f"--input has {len(docs)} documents; train, val and test need at least one each")
        n_val = n_test = max(1, len(docs) // 10)
        n_train = len(docs) - n_val - n_test
        print(f"{len(docs)} documents: fewer than asked, so splitting 80/10/10")
    return {"train": docs[:n_train], "val": docs[n_train:n_train + n_val],
            "test": docs[n_train + n_val:n_train + n_val + n_test]}


def main():
    args = parse_args(__file__, tokenizer="gpt2", n_train=10000, n_val=1000, n_test=1000,
                      num_proc=min(8, os.cpu_count() or 1))
    for name in ("n_train", "n_val", "n_test", "num_proc"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.tokenizer == "char":
        fail("--tokenizer must be a tiktoken encoding (gpt2, o200k_harmony, ...); "
             "for characters use data/shakespeare_char")
    tok = load_tokenizer({"tokenizer": args.tokenizer})
    splits = file_documents(args) if args.input else hub_documents(args)
    print(", ".join(f"{len(docs):,} {name} documents" for name, docs in splits.items()))
    write_dataset(args.out_dir, tok, {name: tokenize_documents(tok, docs, args.num_proc)
                                      for name, docs in splits.items()})


if __name__ == "__main__":
    run(main)
