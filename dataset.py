"""
A prepared dataset as train.py reads it: data/<name>/ (or any folder) made by data/<name>/prepare.py, checked
before training starts.

Flat token streams (train.bin, val.bin) and meta.json (schema: tokenizer.py); or chat data for supervised
fine-tuning (data/chat/prepare.py): fixed rows of row_len tokens plus loss masks (train_mask.bin, val_mask.bin).
A dataset that is missing, unprepared or does not fit the run raises DatasetError, one line naming the fix.
"""
import os

import numpy as np

from tokenizer import read_meta

REPO = os.path.dirname(os.path.abspath(__file__))


class DatasetError(ValueError):
    """A dataset train.py cannot use; the message is one line naming the fix."""


def open_dataset(dataset, block_size, estimate_only=False):
    """(data_dir, meta, sft_rows) of `dataset` for training at block_size; sft_rows: chat data's trained rows per
    split, or None. estimate_only reads no data (data_dir None), but a prepared dataset's meta.json still sizes the
    vocabulary (meta {} without one)."""
    if estimate_only:
        path = dataset_dir(dataset)
        if not os.path.isfile(os.path.join(path, 'meta.json')):
            return None, {}, None
        return None, checked_meta(path), None
    data_dir = find_data_dir(dataset)
    meta = checked_meta(data_dir)
    itemsize = np.dtype(meta['dtype']).itemsize
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f'{split}.bin')
        size = os.path.getsize(path)
        if size % itemsize:
            raise DatasetError(f"{path} has {size} bytes, not a whole number of {meta['dtype']} tokens "
                               f"({itemsize} bytes each; meta.json's dtype): it is truncated or from another "
                               f"preparation; re-run the dataset's prepare.py")
    sft = os.path.isfile(os.path.join(data_dir, 'train_mask.bin'))
    sft_rows = {split: trained_rows(dataset, data_dir, meta, split, block_size) for split in ('train', 'val')} \
        if sft else None
    for split in ('train', 'val'):
        n_tokens = os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // itemsize
        if n_tokens <= block_size:
            raise DatasetError(f"{split}.bin of {dataset!r} has {n_tokens} tokens, fewer than block_size + 1 "
                               f"({block_size + 1})")
        check_token_ids(os.path.join(data_dir, f'{split}.bin'), meta)
    return data_dir, meta, sft_rows


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def checked_meta(data_dir):
    """data_dir's meta.json, each key train.py reads present and of its type (schema: tokenizer.py)."""
    path = os.path.join(data_dir, 'meta.json')
    meta = read_meta(data_dir)
    fix = "re-run the dataset's prepare.py"
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} is not a JSON object: {fix}")

    def need(key, ok, what):
        if key not in meta:
            raise DatasetError(f"{path} has no {key!r} ({what}): {fix}")
        if not ok(meta[key]):
            shown = repr(meta[key])
            shown = shown if len(shown) <= 60 else shown[:57] + '...'
            raise DatasetError(f"{path}: {key!r} must be {what}, got {shown}: {fix}")

    need('tokenizer', lambda v: isinstance(v, str) and v, "a tokenizer name such as 'char' or 'gpt2'")
    need('vocab_size', lambda v: _is_int(v) and v > 0, "an integer > 0")
    need('dtype', _token_dtype_ok(meta['vocab_size']), f"an unsigned integer type holding ids up to "
         f"{meta['vocab_size'] - 1}, e.g. 'uint16' or 'uint32'")
    if meta['tokenizer'] == 'char':
        need('chars', lambda v: isinstance(v, str) and len(v) == meta['vocab_size'],
             f"a string of the {meta['vocab_size']} characters (vocab_size)")
    for key, what in (('eot_token', "an integer token id or null"), ('row_len', "an integer > 1 or null"),
                      ('pad_token', "an integer token id or null")):
        if key in meta:
            need(key, lambda v: v is None or (_is_int(v) and 0 <= v and (key != 'row_len' or v > 1)), what)
    return meta


def _token_dtype_ok(vocab_size):
    def ok(v):
        if not isinstance(v, str):
            return False
        try:
            dtype = np.dtype(v)
        except (TypeError, ValueError):
            return False
        return dtype.kind == 'u' and np.iinfo(dtype).max >= vocab_size - 1
    return ok


FULL_SCAN_TOKENS = 1 << 26  # a token stream up to this long is checked whole (np.max over a memmap: ~50 ms)
SAMPLE_BLOCKS, SAMPLE_BLOCK_TOKENS = 1024, 4096  # else this many evenly spaced runs of tokens


def check_token_ids(path, meta):
    """Every token id (of a long stream: a sample of evenly spaced runs) must be below meta.json's vocab_size: an
    id past it would index past the embedding table mid-run."""
    data = np.memmap(path, dtype=np.dtype(meta['dtype']), mode='r')
    n = len(data)
    if n <= FULL_SCAN_TOKENS:
        top, how = int(data.max()), "holds"
    else:
        starts = np.linspace(0, n - SAMPLE_BLOCK_TOKENS, SAMPLE_BLOCKS).astype(np.int64)
        top, how = max(int(data[s:s + SAMPLE_BLOCK_TOKENS].max()) for s in starts), "holds (in a sample)"
    del data
    vocab_size = meta['vocab_size']
    if top >= vocab_size:
        raise DatasetError(f"{path} {how} token id {top}, but meta.json's vocab_size is {vocab_size} (ids 0.."
                           f"{vocab_size - 1}): the .bin files and meta.json are from different preparations; "
                           f"re-run the dataset's prepare.py")


def dataset_dir(dataset):
    """data/<dataset>, or dataset itself when it is a path."""
    return dataset if os.sep in dataset or '/' in dataset else os.path.join(REPO, 'data', dataset)


def find_data_dir(dataset):
    data_dir = dataset_dir(dataset)
    is_path = data_dir == dataset
    name = os.path.basename(os.path.normpath(data_dir))
    for file in ('train.bin', 'val.bin', 'meta.json'):
        if not os.path.isfile(os.path.join(data_dir, file)):
            if not os.path.isfile(os.path.join(REPO, 'data', name, 'prepare.py')):
                known = sorted(d for d in os.listdir(os.path.join(REPO, 'data'))
                               if os.path.isfile(os.path.join(REPO, 'data', d, 'prepare.py')))
                raise DatasetError(f"dataset {dataset!r} has no {file} and there is no data/{name}/prepare.py to "
                                   f"make it (datasets: {', '.join(known)})")
            out = f" --out_dir={data_dir}" if is_path else ""
            raise DatasetError(f"dataset {dataset!r} is not prepared (no {os.path.join(data_dir, file)}): "
                               f"run python data/{name}/prepare.py{out}")
    return data_dir


def trained_rows(dataset, data_dir, meta, split, block_size):
    """Chat data: the rows with at least one trained target (a row of prompt or padding only would give a
    micro-batch nothing to learn, and a 0/0 loss), checked against meta.json."""
    row_len = meta.get('row_len')
    if not row_len:
        raise DatasetError(f"dataset {dataset!r} has {split}_mask.bin but its meta.json has no row_len: re-run "
                           f"data/chat/prepare.py")
    if block_size + 1 != row_len:
        raise DatasetError(f"dataset {dataset!r} holds rows of {row_len} tokens (prepared with "
                           f"--block_size={row_len - 1}): set block_size={row_len - 1}, or prepare it again with "
                           f"--block_size={block_size}")
    tokens, mask = (os.path.join(data_dir, f'{split}{suffix}.bin') for suffix in ('', '_mask'))
    if not os.path.isfile(mask):
        raise DatasetError(f"dataset {dataset!r} has train_mask.bin but no {split}_mask.bin: re-run "
                           f"data/chat/prepare.py")
    n_tokens = os.path.getsize(tokens) // np.dtype(meta['dtype']).itemsize
    if n_tokens % row_len or os.path.getsize(mask) != n_tokens:
        raise DatasetError(f"{split}.bin and {split}_mask.bin of {dataset!r} are not rows of {row_len} tokens with "
                           f"one mask byte each: re-run data/chat/prepare.py")
    rows = np.flatnonzero(np.memmap(mask, dtype=np.uint8, mode='r').reshape(-1, row_len)[:, 1:].any(axis=1))
    if len(rows) == 0:
        raise DatasetError(f"{split} of {dataset!r} has no assistant tokens to train on")
    return rows
