"""Fuzz-style checks of train.py's input handling (issue 17, classes 3, 6 and 10): many generated bad datasets,
checkpoints and optimizer states, each answered with exit status 2 and exactly one stderr line `error: ...` naming
the file, no traceback, and every pre-existing checkpoint and dataset byte-identical afterwards.

A train.py process costs ~3 s (imports), so most cases run through one driver process that executes train.py
in-process once per case (runpy, fresh module state each time; an exception escaping it is recorded as the
traceback a real process would print). A sample of the cases is also run as real train.py processes."""
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import dataset as dataset_mod
from conftest import REPO, TINY, run_script
from tokenizer import CharTokenizer, make_meta

ALPHABET = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"  # 45 characters
RUN = [*TINY, "--eval_iters=2", "--eval_interval=2"]

DRIVER = r'''
import contextlib, io, json, runpy, sys, traceback
repo, cases_path, results_path = sys.argv[1:]
sys.path.insert(0, repo)
results = []
for case in json.load(open(cases_path)):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [repo + "/train.py", *case["argv"]]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(repo + "/train.py", run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()  # what the interpreter would print: the process would exit 1
            code = 1
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(results_path, "w"))
'''


def tree_hash(*dirs):
    """{path: sha256} of every file under dirs (links followed): what must not change."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_dataset(path, chars=ALPHABET, n_train=6000, n_val=1200, seed=0, meta=None):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(len(chars), size=n).astype(np.uint16).tofile(path / f"{split}.bin")
    (path / "meta.json").write_text(json.dumps(meta if meta is not None else make_meta(CharTokenizer(chars))))
    return path


def one_line_error(result, *needles):
    """Exit 2, exactly one stderr line starting 'error: ' holding every needle, no traceback."""
    code, stderr = (result["code"], result["stderr"]) if isinstance(result, dict) else \
        (result.returncode, result.stderr)
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr[-3000:])
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def drive(tmp_path, cases):
    """Run train.py once per case (a list of argv lists) in one driver process: [{code, stdout, stderr}]."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "cases.json").write_text(json.dumps([{"argv": list(map(str, argv))} for argv in cases]))
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(REPO), str(tmp_path / "cases.json"),
                           str(tmp_path / "results.json")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(cases)
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset dir, out_dir): a tiny char model trained 4 iterations on a generated dataset. Read-only."""
    root = tmp_path_factory.mktemp("fuzz_train")
    data = write_dataset(root / "data")
    out = root / "out"
    result = run_script("train.py", *RUN, f"--dataset={data}", f"--out_dir={out}", "--max_iters=4")
    assert result.returncode == 0, result.stderr
    assert (out / "ckpt" / "train_state.pt").is_file()
    return data, out


def copy_out(src, dst):
    """A copy of an out_dir with out_dir's published files as hard links into ckpt/, as checkpoint.py makes them."""
    shutil.copytree(src, dst)
    for name in checkpoint.PUBLISHED:
        if (dst / name).exists():
            (dst / name).unlink()
            os.link(dst / "ckpt" / name, dst / name)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# the generators: each returns [(label, dataset dir, out_dir, argv, needles)]


def tokenizer_cases(rng, root, data, out):
    """Class 3: same-size vocabularies of other content (swapped, rotated, replaced characters; other tokenizer
    names), for resume and for init_from=<out_dir>. The .bin files are the checkpoint's own."""
    chars = json.loads((data / "meta.json").read_text())["chars"]
    variants = []
    for _ in range(6):  # two characters swapped
        i, j = sorted(rng.sample(range(len(chars)), 2))
        c = list(chars)
        c[i], c[j] = c[j], c[i]
        variants.append(("swap", "".join(c)))
    for k in (1, 7):
        variants.append(("rotate", chars[k:] + chars[:k]))
    for _ in range(3):  # one character replaced by one the checkpoint never saw
        i = rng.randrange(len(chars))
        variants.append(("replace", chars[:i] + rng.choice("0123456789ÄÖÜé€") + chars[i + 1:]))
    variants.append(("reverse", chars[::-1]))
    cases = []
    for n, (kind, new_chars) in enumerate(variants):
        d = root / f"tok{n}"
        shutil.copytree(data, d)
        (d / "meta.json").write_text(json.dumps(make_meta(CharTokenizer(new_chars))))
        if n % 2 == 0:
            o = copy_out(out, root / f"tok{n}_out")
            cases.append((f"tok-{kind}-resume", d, o, ["--init_from=resume", f"--out_dir={o}"],
                          ["vocab mismatch", str(o), str(d)]))
        else:
            cases.append((f"tok-{kind}-init", d, out, [f"--init_from={out}", f"--out_dir={root / f'tok{n}_new'}"],
                          ["vocab mismatch", str(out), str(d)]))
    for n, name in enumerate(["gpt2", "r50k_base"]):  # another tokenizer name with the same size
        d = root / f"tokname{n}"
        shutil.copytree(data, d)
        meta = {**json.loads((d / "meta.json").read_text()), "tokenizer": name}
        meta.pop("chars")
        (d / "meta.json").write_text(json.dumps(meta))
        o = copy_out(out, root / f"tokname{n}_out")
        cases.append((f"tok-name-{name}", d, o, ["--init_from=resume", f"--out_dir={o}"], ["vocab mismatch", str(o)]))
    return cases


def bin_cases(rng, root, data, out):
    """Class 6: .bin files whose size is not a whole number of tokens, and token ids >= vocab_size."""
    cases = []
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    for n in range(6):
        d = root / f"size{n}"
        shutil.copytree(data, d)
        split = rng.choice(["train", "val"])
        raw = (d / f"{split}.bin").read_bytes()
        raw = raw + bytes(rng.randrange(1, 256) for _ in range(1 + 2 * rng.randrange(3))) if n % 2 else raw[:-1]
        (d / f"{split}.bin").write_bytes(raw)
        cases.append((f"size-{split}", d, None, [f"--out_dir={root / f'size{n}_out'}"],
                      [str(d / f"{split}.bin"), "bytes"]))
    for n in range(8):
        d = root / f"ids{n}"
        shutil.copytree(data, d)
        split = rng.choice(["train", "val"])
        tokens = np.fromfile(d / f"{split}.bin", dtype=np.uint16)
        where = rng.sample(range(len(tokens)), rng.randrange(1, 4))
        tokens[where] = rng.choice([vocab, vocab + 1, 1000, 2 ** 16 - 1, rng.randrange(vocab, 2 ** 16)])
        tokens.tofile(d / f"{split}.bin")
        argv = [f"--out_dir={root / f'ids{n}_out'}"]
        if n % 3 == 2:  # a resume on it: the dataset check comes first, and the checkpoint is untouched
            o = copy_out(out, root / f"ids{n}_out")
            argv = ["--init_from=resume", f"--out_dir={o}"]
        cases.append((f"ids-{split}", d, None if n % 3 != 2 else o, argv,
                      [str(d / f"{split}.bin"), "token id", str(vocab)]))
    return cases


def meta_cases(rng, root, data, out):
    """Class 6: meta.json missing keys, with values of wrong types, or not an object at all."""
    good = json.loads((data / "meta.json").read_text())
    wrong = {"tokenizer": [None, 5, True, [], {}, ""],
             "vocab_size": [None, "45", 45.0, True, [], -3, 0],
             "dtype": [None, 16, "float32", "int16", "uint4", "no-such-type", [], "uint8x"],
             "chars": [None, 45, [], good["chars"][:-1], good["chars"] + "Z"],
             "eot_token": ["0", 1.5, [], -1],
             "row_len": ["33", 1.5, True]}
    metas = [("missing-" + k, {kk: v for kk, v in good.items() if kk != k})
             for k in ("tokenizer", "vocab_size", "dtype", "chars")]
    for key, values in wrong.items():
        for v in rng.sample(values, min(4, len(values))):
            metas.append((f"{key}={v!r}"[:30], {**good, key: v}))
    metas += [(f"not-object-{v!r}", v) for v in ([], "meta", 3, None)]
    cases = []
    for n, (label, meta) in enumerate(metas):
        d = root / f"meta{n}"
        shutil.copytree(data, d)
        (d / "meta.json").write_text(json.dumps(meta))
        cases.append((f"meta-{label}", d, None, [f"--out_dir={root / f'meta{n}_out'}"], [str(d / "meta.json")]))
    return cases


def config_cases(rng, root, data, out):
    """Class 6: a hand-edited ckpt/config.json that is valid JSON, with fields of wrong types."""
    info = json.loads((out / "ckpt" / "config.json").read_text())
    mc = info["model_config"]
    wrong_for = {int: ["2", 2.5, True, None, [2]], float: ["0.1", None, True, {}], bool: [1, "true", None, 0],
                 str: [1, None, ["gelu"], True]}
    edits = []
    kinds = {f: type(v) for f, v in mc.items()}
    for field in rng.sample(sorted(mc), 12):
        edits.append((f"model_config.{field}", ["model_config", field], rng.choice(wrong_for[kinds[field]])))
    for key, values in {"iter_num": ["4", 4.0, None, -1, True], "seed": ["1337", 1.5, None],
                        "best_val_loss": ["3.1", [], True], "files": [[], "model.safetensors", {"meta.json": "9"},
                                                                      {"meta.json": -1}],
                        "train_config": [[], "adamw", None], "init_from": [5, None],
                        "model_config": [[], "gpt2", None]}.items():
        for v in rng.sample(values, min(2, len(values))):
            edits.append((key, [key], v))
    for key in ("iter_num", "seed", "train_config", "best_val_loss"):
        edits.append((f"missing-{key}", [key], KeyError))
    cases = []
    for n, (label, path, value) in enumerate(edits):
        o = copy_out(out, root / f"cfg{n}")
        edited = json.loads(json.dumps(info))
        parent = edited
        for key in path[:-1]:
            parent = parent[key]
        if value is KeyError:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        (o / "ckpt" / "config.json").write_text(json.dumps(edited, indent=2))  # in place: the link sees it too
        init = n % 4 == 3 and value is not KeyError  # (a checkpoint without training state still fine-tunes)
        if init:  # fine-tune from it instead of resuming
            argv = [f"--init_from={o}", f"--out_dir={root / f'cfg{n}_new'}"]
        else:
            argv = ["--init_from=resume", f"--out_dir={o}"]
        needles = [str(o / "ckpt" / "config.json")]
        if label.startswith("model_config.") and not init:
            needles.append(label)
        cases.append((f"config-{label}={value!r}"[:50], data, o, argv, needles))
    return cases


def train_state_cases(rng, root, data, out):
    """Class 6: train_state.pt replaced by garbage of the same size (config.json's size check passes), or by a valid
    torch file that is not an optimizer state (config.json's size updated to match)."""
    raw = (out / "ckpt" / "train_state.pt").read_bytes()
    size = len(raw)
    weights = (out / "ckpt" / "model.safetensors").read_bytes()
    garbage = [("random", bytes(rng.randrange(256) for _ in range(size))), ("zeros", bytes(size)),
               ("head-flipped", bytes(b ^ 0xFF for b in raw[:64]) + raw[64:]),
               ("half-zeros", raw[:size // 2] + bytes(size - size // 2)),
               ("safetensors", (weights * (1 + size // len(weights)))[:size]),
               ("text", (b"not a checkpoint\n" * (1 + size // 17))[:size])]
    cases = []
    for n, (label, blob) in enumerate(garbage):
        o = copy_out(out, root / f"state{n}")
        (o / "ckpt" / "train_state.pt").write_bytes(blob)
        cases.append((f"state-{label}", data, o, ["--init_from=resume", f"--out_dir={o}"],
                      [str(o / "ckpt" / "train_state.pt"), "corrupt", "restore"]))
    for n, obj in enumerate([{"optimizers": "adamw", "scaler": {}}, [torch.zeros(3)], {"x": torch.ones(2)},
                             {"optimizers": [{"state": 5, "param_groups": []}], "scaler": {}}]):
        o = copy_out(out, root / f"wrongstate{n}")
        torch.save(obj, o / "ckpt" / "train_state.pt")
        info = json.loads((o / "ckpt" / "config.json").read_text())
        info["files"]["train_state.pt"] = (o / "ckpt" / "train_state.pt").stat().st_size
        (o / "ckpt" / "config.json").write_text(json.dumps(info, indent=2))
        cases.append((f"state-wrong{n}", data, o, ["--init_from=resume", f"--out_dir={o}"],
                      [str(o / "ckpt" / "train_state.pt"), "restore"]))
    return cases


GENERATORS = [tokenizer_cases, bin_cases, meta_cases, config_cases, train_state_cases]


def test_bad_inputs_are_one_line_errors_and_change_nothing(trained, tmp_path):
    """Every generated case: exit 2, one line naming the file, no traceback, the checkpoint and dataset as they
    were; plus controls that must still train. A sample of the cases also as real train.py processes."""
    data, out = trained
    fixture = tree_hash(out, data)
    rng = random.Random(17)
    cases = [c for gen in GENERATORS for c in gen(rng, tmp_path, data, out)]
    assert len(cases) >= 90, len(cases)
    # controls: an identical copy of the dataset resumes; a same-content meta.json with its keys reordered too
    same = tmp_path / "same"
    shutil.copytree(data, same)
    (same / "meta.json").write_text(json.dumps(dict(reversed(json.loads((data / "meta.json").read_text()).items()))))
    controls = [["--init_from=resume", f"--out_dir={copy_out(out, tmp_path / 'ctl0')}", f"--dataset={same}"],
                [f"--init_from={out}", f"--out_dir={tmp_path / 'ctl1'}", f"--dataset={same}"]]
    before = [tree_hash(*[p for p in (d, o) if p is not None]) for _, d, o, _, _ in cases]
    results = drive(tmp_path, [[*RUN, "--max_iters=5", f"--dataset={d}", *argv] for _, d, _, argv, _ in cases]
                    + [[*RUN, "--max_iters=5", *argv] for argv in controls])
    seen = set()
    for (label, d, o, argv, needles), result, hashes in zip(cases, results, before):
        try:
            line = one_line_error(result, *needles)
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from None
        assert "weights_only" not in line, (label, line)
        assert tree_hash(*[p for p in (d, o) if p is not None]) == hashes, f"{label}: changed files"
        seen.add(label.split("-")[0])
    assert seen == {"tok", "size", "ids", "meta", "config", "state"}, seen
    for result in results[len(cases):]:
        assert result["code"] == 0, result["stderr"][-3000:]
        assert "step 5: train loss" in result["stdout"], result["stdout"][-2000:]
    assert tree_hash(out, data) == fixture  # init_from=<out_dir> cases and controls read it only

    # real processes: one case of each kind, what a user sees (warnings and all)
    sample = {}
    for case in cases:
        sample.setdefault(case[0].split("-")[0], case)
    for label, d, o, argv, needles in sample.values():
        hashes = tree_hash(*[p for p in (d, o) if p is not None])
        result = run_script("train.py", *RUN, "--max_iters=5", f"--dataset={d}", *argv)
        try:
            one_line_error(result, *needles)
        except AssertionError as e:
            raise AssertionError(f"{label} (process): {e}") from None
        assert tree_hash(*[p for p in (d, o) if p is not None]) == hashes, f"{label} (process): changed files"


def test_moe_stats_print_no_nan(trained, tmp_path):
    """Class 10: an MoE run's eval lines never print 'nan'; the aux loss appears once training has computed it."""
    data, _ = trained
    runs = []
    for n_expert, active, layers in ((4, 2, 1), (3, 3, 2)):
        overrides = {"n_layer": layers, "n_head": 2, "n_kv_head": 1, "n_embd": 32, "head_dim": 16, "mlp_hidden": 32,
                     "n_expert": n_expert, "n_expert_active": active, "sliding_window": 8, "block_size": 32,
                     "vocab_size": len(ALPHABET)}
        runs.append([*TINY, f"--dataset={data}", f"--out_dir={tmp_path / f'moe{n_expert}'}", "--model=gpt-oss-compact",
                     f"--model_overrides={overrides}", "--max_iters=2", "--eval_interval=1", "--eval_iters=2"])
    for argv, result in zip(runs, drive(tmp_path, runs)):
        assert result["code"] == 0, result["stderr"][-3000:]
        lines = [line for line in result["stdout"].splitlines() if "expert load" in line]
        assert len(lines) == 3, result["stdout"][-2000:]
        assert all("nan" not in line.lower() for line in lines), lines
        assert "moe aux loss" not in lines[0], lines[0]  # step 0: nothing trained yet
        assert all(line.startswith("  moe aux loss ") and math.isfinite(float(line.split()[3].rstrip(",")))
                   for line in lines[1:]), lines


# ----------------------------------------------------------------------------------------------------------------
# in-process: the checks themselves, on many more generated inputs


def test_check_same_tokenizer_compares_content():
    rng = random.Random(3)
    base = {"tokenizer": "char", "vocab_size": len(ALPHABET), "chars": ALPHABET}
    n_diff = 0
    for _ in range(400):
        chars = list(ALPHABET)
        kind = rng.randrange(4)
        if kind == 0:
            i, j = rng.sample(range(len(chars)), 2)
            chars[i], chars[j] = chars[j], chars[i]
        elif kind == 1:
            chars[rng.randrange(len(chars))] = rng.choice("0123456789é")
        elif kind == 2:
            rng.shuffle(chars)
        other = {"tokenizer": "char", "vocab_size": len(chars), "chars": "".join(chars)}
        if other["chars"] == ALPHABET:
            checkpoint.check_same_tokenizer(base, other, "CKPT", "DATA", "fix")
            continue
        n_diff += 1
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.check_same_tokenizer(base, other, "CKPT", "DATA", "fix")
        message = str(e.value)
        assert "\n" not in message and "CKPT" in message and "'DATA'" in message, message
    assert n_diff > 250
    for a, b in [("gpt2", "r50k_base"), ("gpt2", "char"), ("o200k_base", "o200k_harmony")]:
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.check_same_tokenizer({"tokenizer": a, "vocab_size": 5}, {"tokenizer": b, "vocab_size": 5},
                                            "C", "D", "fix")
    checkpoint.check_same_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257}, {"tokenizer": "gpt2",
                                    "vocab_size": 50257, "eot_token": 50256}, "C", "D", "fix")


def test_token_id_check_on_long_streams_samples(tmp_path, monkeypatch):
    """A stream longer than FULL_SCAN_TOKENS is checked on evenly spaced runs, which include its ends."""
    monkeypatch.setattr(dataset_mod, "FULL_SCAN_TOKENS", 1000)
    monkeypatch.setattr(dataset_mod, "SAMPLE_BLOCK_TOKENS", 64)
    meta = {"vocab_size": 50, "dtype": "uint16"}
    rng = np.random.default_rng(0)
    for n, where in enumerate([0, -1, 5, -7]):
        tokens = rng.integers(50, size=100_000).astype(np.uint16)
        path = tmp_path / f"{n}.bin"
        tokens.tofile(path)
        dataset_mod.check_token_ids(str(path), meta)  # clean
        tokens[where] = 50 + n
        tokens.tofile(path)
        with pytest.raises(dataset_mod.DatasetError, match="token id"):
            dataset_mod.check_token_ids(str(path), meta)


def test_train_refuses_an_out_dir_it_did_not_make(shakespeare_char, tmp_path):
    """A prepared dataset, an exported model folder or a file as out_dir: one line, exit 2, every file as it was;
    a folder with train.py's own checkpoint (a rerun) is not refused."""
    import hashlib
    from conftest import TINY, run_script
    dataset = tmp_path / "data"
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "gpt2"}')
    (export / "model.safetensors").write_bytes(b"not ours")
    import shutil
    shutil.copytree(shakespeare_char, dataset)
    (tmp_path / "a_file").write_text("x")

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
    before = {d: digest(d) for d in (dataset, export)}
    for out in (dataset, export, tmp_path / "a_file"):
        result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--max_iters=2")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1 and "out_dir" in result.stderr
    assert {d: digest(d) for d in (dataset, export)} == before
