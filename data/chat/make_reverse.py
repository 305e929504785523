"""
A synthetic chat task for testing SFT (e.g. LoRA): reverse the letters of a random word.

    python data/chat/make_reverse.py --n=2000 --seed=1337 --out=data/chat
    python data/chat/prepare.py --input=data/chat/reverse_train.jsonl --val_input=data/chat/reverse_val.jsonl

Writes two JSON Lines files of conversations into --out (a folder, default this script's folder):
    {"messages": [{"role": "user", "content": "reverse: apple"}, {"role": "assistant", "content": "elppa"}]}
The words are --n distinct random strings of 3 to 6 lowercase letters, one conversation each; the
split is by word: --val_fraction (default 0.1) of them go to reverse_val.jsonl (held out: never
seen in reverse_train.jsonl), the rest to reverse_train.jsonl. The same --seed gives the same files.
Each file is written under a temporary name and renamed into place (never written through a link).
A mistake (--n out of range, --val_fraction not in (0, 1), an --out that is a file or cannot be created)
is one line on stderr, exit status 2.
"""
import json
import os
import random
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # repo root: configurator.py
from configurator import apply_overrides  # noqa: E402

MAX_WORDS = sum(26 ** k for k in range(3, 7))  # distinct strings of 3 to 6 lowercase letters


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def random_words(n, rng):
    words = {}  # a dict keeps the drawing order (a set's order varies between runs)
    while len(words) < n:
        words["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))] = None
    return list(words)


def conversation(word):
    return {"messages": [{"role": "user", "content": f"reverse: {word}"},
                         {"role": "assistant", "content": word[::-1]}]}


def main():
    args = apply_overrides({"n": 2000, "seed": 1337, "out": "", "val_fraction": 0.1}, sys.argv[1:])
    if not 2 <= args["n"] <= MAX_WORDS:
        fail(f"--n must be between 2 and {MAX_WORDS:,} (the distinct words there are), not {args['n']}")
    if not 0 < args["val_fraction"] < 1:
        fail(f"--val_fraction must be between 0 and 1, not {args['val_fraction']}")
    out = Path(args["out"] or Path(__file__).resolve().parent)
    blocker = next((p for p in (out, *out.parents) if os.path.lexists(p)), None)
    if blocker is not None and not blocker.is_dir():
        fail(f"--out {out} is a file, not a folder: choose a folder" if blocker == out else
             f"--out {out} cannot be created: {blocker} is a file, not a folder; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out} cannot be created ({e.strerror or e}): choose a writable folder")
    words = random_words(args["n"], random.Random(args["seed"]))
    n_val = min(len(words) - 1, max(1, round(len(words) * args["val_fraction"])))
    for name, split in (("train", words[n_val:]), ("val", words[:n_val])):
        path = out / f"reverse_{name}.jsonl"
        tmp = out / f".reverse_{name}.jsonl.{os.getpid()}.tmp"
        try:
            tmp.write_text("".join(json.dumps(conversation(w)) + "\n" for w in split), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            fail(f"could not write {path} ({e.strerror or e}): choose a writable --out")
        finally:
            tmp.unlink(missing_ok=True)
        print(f"{path}: {len(split):,} conversations")


if __name__ == "__main__":
    main()
