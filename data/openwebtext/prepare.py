"""
Prepare OpenWebText for GPT-2 pretraining (nanoGPT's recipe): GPT-2 BPE with <|endoftext|> after
every document, and a 0.05% validation split (HF train_test_split, seed 2357, shuffled).
Writes train.bin (~9B tokens, ~17GB), val.bin (~4M tokens) and meta.json.

    python data/openwebtext/prepare.py [--num_proc=8]   # Hugging Face download: pip install datasets
    python data/openwebtext/prepare.py --input=docs.jsonl

--input (offline) reads a local file: JSON Lines ({"text": ...} per line, .jsonl/.json) or plain
text with documents separated by blank lines. It is split exactly as train_test_split would split
a dataset of those documents in that order.
"""
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data/common.py (it adds the repo root)
from common import (fail, parse_args, read_documents, run, staged_dataset, tokenize_documents, write_bin,  # noqa: E402
                    write_dataset, write_meta)
from tokenizer import TokenizerError, dtype_for_vocab, load_tokenizer  # noqa: E402

VAL_FRACTION = 0.0005
SEED = 2357

try:
    tok = load_tokenizer({"tokenizer": "gpt2"})  # module level, so the dataset.map workers have it
except TokenizerError as e:
    fail(str(e))


def process(example):
    ids = tok.encode(example["text"]) + [tok.eot_token]
    return {"ids": ids, "len": len(ids)}


def prepare_from_hub(args):
    try:
        from datasets import load_dataset
        from tqdm import tqdm
    except ImportError:
        fail("downloading OpenWebText needs Hugging Face datasets: pip install datasets "
             "(or pass --input=PATH to a local .jsonl/.txt file)")
    dataset = load_dataset("openwebtext", num_proc=args.num_proc)  # ~54GB in the HF cache
    split_dataset = dataset["train"].train_test_split(test_size=VAL_FRACTION, seed=SEED, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")
    tokenized = split_dataset.map(process, remove_columns=["text"], desc="tokenizing", num_proc=args.num_proc)
    with staged_dataset(args.out_dir) as staging:  # the old dataset is replaced only when the new one is whole
        for split, dset in tokenized.items():
            total = int(np.sum(dset["len"], dtype=np.uint64))
            n_shards = 1024  # write in contiguous shards, so memory holds one shard at a time
            shards = (np.concatenate(
                dset.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")["ids"])
                for i in tqdm(range(n_shards), desc=f"writing {split}.bin"))
            write_bin(staging / f"{split}.bin", shards, dtype_for_vocab(tok.vocab_size), total)
        write_meta(staging, tok)


def split_like_hub(docs):
    """(train, val) as HF's train_test_split(test_size=VAL_FRACTION, seed=SEED, shuffle=True) makes them."""
    if len(docs) < 2:
        fail("--input needs at least 2 documents (val takes one)")
    n_val = math.ceil(VAL_FRACTION * len(docs))
    order = np.random.default_rng(SEED).permutation(len(docs))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def prepare_from_file(args):
    train_docs, val_docs = split_like_hub(read_documents(args))
    print(f"{len(train_docs):,} train documents, {len(val_docs):,} val documents")
    write_dataset(args.out_dir, tok, {"train": tokenize_documents(tok, train_docs, args.num_proc),
                                      "val": tokenize_documents(tok, val_docs, args.num_proc)})


def main():
    args = parse_args(__file__, num_proc=min(8, os.cpu_count() or 1))
    if args.num_proc < 1:
        fail(f"--num_proc must be at least 1, not {args.num_proc}")
    if args.input:
        prepare_from_file(args)
    else:
        prepare_from_hub(args)


if __name__ == "__main__":
    run(main)
