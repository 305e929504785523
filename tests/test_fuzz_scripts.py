"""Fuzzing sample.py, export.py and configurator.py with generated bad input (issue 17): every mistake is exactly one
line on stderr starting "error: " that names the flag or file, exit status 2, no traceback, and every checkpoint and
dataset that was there before is byte-identical afterwards.

The scripts run in process, many cases per Python process (`run_batch`): this file, run as a program, is the harness.
It executes each case's script with runpy as __main__ (as `python script.py argv...` would), with its own argv, cwd,
stdin bytes and captured stdout/stderr (stdout strict UTF-8 like a terminal's, stderr backslashreplace like
Python's), and reports the exit status Python would give: SystemExit's code, 1 and the traceback for any other
exception. A case may carry a fault: the k-th call of a module's function (a writer) raises ENOSPC after running,
as a full disk would. test_fuzz_data.py drives the prepare scripts through the same harness."""
import base64
import errno
import hashlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("FUZZ_SEED", "17"))  # FUZZ_SEED=... explores other inputs


# ----------------------------------------------------------------------------------------------------------------
# the harness (this file as a program) and its client


def _run_case(case):
    import runpy
    import traceback
    script = str(REPO / case["script"])
    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    stdin = io.TextIOWrapper(io.BytesIO(base64.b64decode(case.get("stdin", ""))), encoding="utf-8")
    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr, os.getcwd()
    undo = _inject(case.get("fault"))
    sys.argv, sys.stdin, sys.stdout, sys.stderr = [script, *case["argv"]], stdin, stdout, stderr
    os.chdir(case.get("cwd") or REPO)
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: B036: what Python would print for an uncaught exception
        traceback.print_exc(file=sys.stderr)
        code = 1
    finally:
        sys.argv, sys.stdin, sys.stdout, sys.stderr = saved[:4]
        os.chdir(saved[4])
        undo()
    try:
        stdout.flush()
        stderr.flush()
    except ValueError:
        pass
    return {"code": code, "stdout": out.getvalue().decode("utf-8", "replace"),
            "stderr": err.getvalue().decode("utf-8", "replace")}


def _inject(fault):
    """Make the fault["at"]-th call of fault["module"].fault["name"] raise ENOSPC once it has run; returns the undo."""
    if not fault:
        return lambda: None
    import importlib
    sys.path.insert(0, str(REPO / "data"))  # where the prepare scripts find common.py
    module = importlib.import_module(fault["module"])
    original, calls = getattr(module, fault["name"]), [0]

    def failing(*args, **kwargs):
        result = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] == fault["at"]:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return result
    setattr(module, fault["name"], failing)
    return lambda: setattr(module, fault["name"], original)


def _harness(cases_path, results_path):
    sys.path.insert(0, str(REPO))
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    cases = json.loads(Path(cases_path).read_text())
    results = [{"code": 0, "stdout": "", "stderr": "", "hashes": snapshot(*case["snapshot"])} if case.get("snapshot")
               else _run_case(case) for case in cases]
    Path(results_path).write_text(json.dumps(results))


def case(script, *argv, stdin=b"", cwd=None, fault=None, **expect):
    """A harness case; `expect` keeps what the test checks (ignored by the harness)."""
    return {"script": script, "argv": [str(a) for a in argv], "stdin": base64.b64encode(stdin).decode(),
            "cwd": str(cwd) if cwd else None, "fault": fault,
            **{k: str(v) if isinstance(v, Path) else v for k, v in expect.items()}}


def snapshot_case(*roots):
    """A harness pseudo-case: the snapshot() of the roots at that point of the batch, in its "hashes"."""
    return {"script": None, "snapshot": [str(p) for p in roots]}


def run_batch(cases, tmp_path, timeout=600):
    """Run the cases in one harness process; each case gets "code", "stdout" and "stderr"."""
    cases_path, results_path = tmp_path / "cases.json", tmp_path / "results.json"
    cases_path.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, __file__, str(cases_path), str(results_path)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for c, r in zip(cases, json.loads(results_path.read_text())):
        c.update(r)
        if os.environ.get("FUZZ_SHOW") and c["script"]:  # FUZZ_SHOW=1 pytest -s: every case's argv and stderr
            print(c["script"], c["argv"], c.get("fault") or "", c["code"], c["stderr"].strip()[-500:], sep=" | ")
    return cases


def assert_one_line_error(c, *needles):
    """Exit 2, one stderr line starting 'error: ' holding each needle (the culprit), no traceback."""
    label = f"{c['script']} {c['argv']}"
    assert "Traceback" not in c["stderr"], (label, c["stderr"][-3000:])
    assert c["code"] == 2, (label, c["code"], c["stderr"][-2000:])
    lines = c["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (label, c["stderr"])
    for needle in needles:
        assert str(needle) in lines[0], (label, needle, lines[0])


def snapshot(*roots):
    """{path: sha256 (or link target)} of every file under the roots, links not followed: to compare afterwards."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    found[path] = "-> " + os.readlink(path)
                else:
                    found[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


# ----------------------------------------------------------------------------------------------------------------
# generators


def invalid_utf8(r, n=None):
    """Bytes that are not UTF-8: the kinds of damage one meets (Latin-1 text, stray continuation bytes, cut or
    overlong sequences, encoded surrogates, code points past U+10FFFF, UTF-16), or random bytes."""
    text = "".join(r.choice("abcdefgh \n") for _ in range(r.randint(0, 40))).encode()
    bad = r.choice([b"\xe9", bytes([r.randint(0x80, 0xbf)]), b"\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80",
                    b"\xf4\x90\x80\x80", b"\xff", b"\xfe", "caf\u00e9".encode("latin-1"), "hi".encode("utf-16"),
                    bytes(r.randrange(256) for _ in range(r.randint(1, 64)))])
    at = r.randint(0, len(text))
    data = text[:at] + bad + text[at:]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    return data + b"\xff"


def non_finite_or_edge(r):
    return r.choice(["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "-Infinity", "1e999", "-1e999", "0", "-0",
                     "-1", "-1e-40", "1e-40", "5e-324", "-5e-324", "1e308", "2", "1.0000001", "-2.5",
                     "9" * 30, "-" + "9" * 30, "1e3", "0x10", "1_000", "", " ", "one"])


def _number(text, kind):
    """text as configurator reads it for a key of type kind, or None when it is not one."""
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if kind is int or math.isfinite(value) else None


def sample_flag_valid(flag, text):
    """Whether sample.py must accept --flag=text (the rule of engine.sampling and the counts)."""
    if flag in ("temperature", "top_p"):
        value = _number(text, float)
        if value is None:
            return False
        return value >= 0 if flag == "temperature" else 0 < value <= 1
    value = _number(text, int)
    if value is None:
        return False
    return {"top_k": value >= 0, "num_samples": value >= 1, "max_new_tokens": value >= 1,
            "seed": -2**63 <= value <= 2**64 - 1}[flag]


# ----------------------------------------------------------------------------------------------------------------
# configurator.py: NaN/inf never, config files typed like the command line (in process: apply_overrides)


def _script_defaults(path):
    """The config globals of a flat script (its literal top-level assignments before config_keys), to fuzz with the
    real keys and types (train.py's included) without running the script."""
    import ast
    tree = ast.parse(path.read_text())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name == "config_keys":
                break
            try:
                value = eval(compile(ast.Expression(node.value), str(path), "eval"), {"dict": dict})
            except Exception:
                continue
            if not name.startswith("_") and isinstance(value, (int, float, bool, str, tuple, list, dict)):
                defaults[name] = value
    return defaults


def wrong_values(r, default):
    """Python source of values that do not have default's type (or hold nan/inf)."""
    nonfinite = r.choice(["float('nan')", "float('inf')", "-float('inf')", "1e999", "-1e999"])
    if isinstance(default, bool):
        return ["1", "0", "'True'", "None", "1.0", "[]", nonfinite]
    if isinstance(default, int):
        return ["1.5", "'5'", "None", "True", "[1]", "5e3", nonfinite]
    if isinstance(default, float):
        return ["'1e-3'", "None", "True", "[0.1]", "(1,)", "10**400", nonfinite]
    if isinstance(default, str):
        return ["1", "None", "1.0", "b'x'", "['a']", "True", "{'a': 1}"]
    if isinstance(default, (tuple, list)):
        return ["1", "'0.9,0.95'", "None", f"(0.9, {nonfinite})", "{'a': 1}"]
    if isinstance(default, dict):
        return ["[]", "'x'", "None", "1", f"{{'dropout': {nonfinite}}}"]
    return []


def right_values(default):
    if isinstance(default, bool):
        return [repr(not default)]
    if isinstance(default, int):
        return ["7", "-3", "10**30"]
    if isinstance(default, float):
        return ["3", "0.25", "-1e-40", "5e-324"]
    if isinstance(default, str):
        return ["'x'", "''"]
    if isinstance(default, (tuple, list)):
        return ["(0.8, 0.9)", "[0.8, 0.9]"]
    if isinstance(default, dict):
        return ["dict(lora_rank=4)"]
    return []


def test_config_file_values_are_typed_and_finite(tmp_path, monkeypatch, capsys):
    """Every config key of train.py, sample.py and export.py, set by a config file to values of each wrong type (and
    nan/inf): one line naming the key, the file and the expected type, exit 2; right types are taken."""
    from configurator import apply_overrides
    sys.path.insert(0, str(REPO))
    import export
    r = random.Random(SEED)
    scripts = {"train.py": _script_defaults(REPO / "train.py"), "sample.py": _script_defaults(REPO / "sample.py"),
               "export.py": dict(export.DEFAULTS)}
    assert len(scripts["train.py"]) > 40 and "learning_rate" in scripts["train.py"]
    assert {"temperature", "top_p", "top_k", "num_samples"} <= set(scripts["sample.py"])
    monkeypatch.chdir(tmp_path)
    bad = good = 0
    for script, defaults in scripts.items():
        for key, default in defaults.items():
            for i, source in enumerate(wrong_values(r, default)):
                name = f"cfg_{script[:-3]}_{key}_{i}.py"
                (tmp_path / name).write_text(f"# a config file\n{key} = {source}\n")
                try:
                    apply_overrides(dict(defaults), [name], allowed_keys=list(defaults))
                    raise AssertionError(f"{script}: {key} = {source} was accepted")
                except SystemExit as e:
                    assert e.code == 2, (key, source)
                err = capsys.readouterr().err
                lines = err.splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: "), (key, source, err)
                assert name in lines[0] and f" {key} " in lines[0] and "expects" in lines[0], lines[0]
                bad += 1
            for source in right_values(default):
                name = f"ok_{script[:-3]}_{key}.py"
                (tmp_path / name).write_text(f"{key} = {source}\n")
                config = apply_overrides(dict(defaults), [name], allowed_keys=list(defaults))
                assert type(config[key]) is type(default) and capsys.readouterr().err == "", (key, source)
                good += 1
    assert bad > 300 and good > 100
    print(f"config files: {bad} wrong values refused, {good} right ones taken")


def test_command_line_numbers_are_finite(capsys):
    """Float keys never take nan/inf from the command line, in any spelling; tuple/list/dict/None keys never hold
    them; finite edge values pass."""
    from configurator import apply_overrides
    r = random.Random(SEED)
    defaults = {"learning_rate": 6e-4, "betas": (0.9, 0.95), "model_overrides": {}, "wandb_run_name": None,
                "max_iters": 10}
    spellings = ["nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "-Infinity", "INF", "1e999", "-1e999",
                 "1e309", " nan", "nan "]
    cases = [("learning_rate", s) for s in spellings]
    cases += [("betas", f"({a},{b})") for a, b in zip(["1e999", "0.9", "-1e999"], ["0.95", "1e999", "1e400"])]
    cases += [("model_overrides", "{'dropout': 1e999}"), ("wandb_run_name", "1e999"), ("wandb_run_name", "[1e999]")]
    cases += [("learning_rate", r.choice(spellings).upper()) for _ in range(20)]
    for key, text in cases:
        try:
            apply_overrides(dict(defaults), [f"--{key}={text}"], allowed_keys=list(defaults))
            raise AssertionError(f"--{key}={text} was accepted")
        except SystemExit as e:
            assert e.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --{key} expects"), (key, text, lines)
    for text, value in [("5e-324", 5e-324), ("-1e-40", -1e-40), ("1e308", 1e308), ("0", 0.0), ("-0", 0.0)]:
        assert apply_overrides(dict(defaults), [f"--learning_rate={text}"])["learning_rate"] == value
    print(f"command line: {len(cases)} non-finite values refused")


def test_train_py_refuses_a_wrong_type_in_a_config_file(tmp_path):
    """The same check reaches train.py's own keys (configurator is exec'd there), before it does anything."""
    (tmp_path / "cfg.py").write_text("max_iters = '100'\n")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "cfg.py", "--out_dir=never"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    c = {"script": "train.py", "argv": ["cfg.py"], "code": result.returncode, "stderr": result.stderr}
    assert_one_line_error(c, "cfg.py", "max_iters", "int")
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------------------------------------------
# sample.py


def copy_run(src, dst):
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    for name in ("config.json", "model.safetensors", "meta.json"):  # as checkpoint.py publishes them: hard links
        if (dst / name).exists():
            (dst / name).unlink()
            os.link(dst / "ckpt" / name, dst / name)
    return dst


def corrupt_header(r, path):
    """Damage model.safetensors' header in place of the same size (config.json's size check passes)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    kind = r.randrange(5)
    if kind == 0:  # a header length past the file
        data[:8] = r.choice([len(data), 2**40, 2**64 - 1, 100_000_001]).to_bytes(8, "little")
    elif kind == 1:  # the JSON's structure broken in a few random places
        structural = [i for i in range(8, 8 + header_len) if data[i] in b'{}[]:,"']
        for i in r.sample(structural, r.randint(1, 4)):
            data[i] = r.choice(b"x#\xff\x00 ")
    elif kind == 2:  # a length that cuts the JSON short
        data[:8] = r.randint(1, header_len - 1).to_bytes(8, "little")
    elif kind == 3:  # valid JSON of the wrong shape
        junk = json.dumps({"__metadata__": {"x": "y"}, "w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4]}})
        data[8: 8 + header_len] = junk.ljust(header_len).encode()[:header_len]
    else:  # zeros
        data[: 8 + header_len] = bytes(8 + header_len)
    path.unlink()  # a new file: the other links keep the good bytes for the rest of the suite
    path.write_bytes(bytes(data))


def test_sample_py_rejects_bad_settings_and_prompts(trained_char, shakespeare_char, tmp_path):
    """Generated numeric edges for every setting, prompt files that are not UTF-8, missing or folders, prompts
    that are not text, corrupt weights: one line naming the flag or file, exit 2. Valid edge values run, and tiny
    temperatures are greedy."""
    out = trained_char[0]
    before = snapshot(out, shakespeare_char)
    r = random.Random(SEED)
    base = ["--device=cpu", "--threads=1", "--num_samples=1", "--max_new_tokens=3", "--start=ROMEO:"]
    cases, valid = [], []
    for flag in ("temperature", "top_p", "top_k", "num_samples", "max_new_tokens", "seed"):
        texts = {non_finite_or_edge(r) for _ in range(14)} | {"nan", "inf", "-1", "0"}
        for text in sorted(texts):
            if flag in ("num_samples", "max_new_tokens") and sample_flag_valid(flag, text) and int(text) > 3:
                continue  # a valid but huge count would only take long
            c = case("sample.py", f"--out_dir={out}", *base, f"--{flag}={text}", flag=flag, text=text)
            (valid if sample_flag_valid(flag, text) else cases).append(c)
    for i in range(12):  # prompt files: not UTF-8, missing, a folder
        prompt = tmp_path / f"prompt{i}.txt"
        prompt.write_bytes(invalid_utf8(r))
        cases.append(case("sample.py", f"--out_dir={out}", *base, f"--start=FILE:{prompt}", needle=str(prompt)))
    for missing in (tmp_path / "nope.txt", tmp_path, tmp_path / "prompt0.txt" / "x"):
        cases.append(case("sample.py", f"--out_dir={out}", *base, f"--start=FILE:{missing}", needle=str(missing)))
    for i in range(6):  # a --start that is not text: bytes the shell passed that are not UTF-8
        cases.append(case("sample.py", f"--out_dir={out}", *base, f"--start={os.fsdecode(invalid_utf8(r))}",
                          needle="--start"))
    for i in range(10):  # corrupt safetensors headers, same size
        run = copy_run(out, tmp_path / f"corrupt{i}")
        corrupt_header(r, run / "ckpt" / "model.safetensors")
        cases.append(case("sample.py", f"--out_dir={run}", *base, needle="model.safetensors"))
    greedy = case("sample.py", f"--out_dir={out}", *base, "--temperature=0", "--max_new_tokens=20")
    tiny = [case("sample.py", f"--out_dir={out}", *base, f"--temperature={t}", "--max_new_tokens=20")
            for t in ("1e-40", "5e-324", "1e-300", "9e-6")]
    run_batch(cases + valid + [greedy] + tiny, tmp_path)
    for c in cases:
        assert_one_line_error(c, c.get("needle") or f"--{c['flag']}")
    for c in valid + [greedy] + tiny:
        assert c["code"] == 0 and "Traceback" not in c["stderr"], (c["argv"], c["stderr"][-2000:])
    for c in tiny:  # positive but tiny temperatures are greedy, not garbage from overflowing logits
        assert c["stdout"].split("\n[")[0] == greedy["stdout"].split("\n[")[0], (c["argv"], c["stdout"])
    assert snapshot(out, shakespeare_char) == before
    print(f"sample.py: {len(cases)} refused, {len(valid) + 1 + len(tiny)} accepted")


def interactive_lines(r, n):
    """Lines an interactive session must survive: not UTF-8, characters the vocabulary lacks, commands with bad
    numbers or names; each (bytes, kind)."""
    lines = []
    for _ in range(n):
        kind = r.randrange(5)
        if kind == 0:
            lines.append((invalid_utf8(r).replace(b"\n", b" ").replace(b"\r", b" "), "not UTF-8"))
        elif kind == 1:
            text = "".join(r.choice("ROMEO") for _ in range(3)) + r.choice("😀\u00e9\u4e2d\x00\x7f~{")
            lines.append((text.encode(), "character"))
        elif kind == 2:
            name = r.choice(["temperature", "top_p", "top_k", "max_new_tokens", "seed"])
            text = non_finite_or_edge(r)
            if name == "max_new_tokens" and sample_flag_valid(name, text) and int(text) > 3:
                text = "-" + text
            if sample_flag_valid(name, text):
                text = "nan" if name in ("temperature", "top_p") else "-5" if name != "seed" else "9" * 30
            lines.append((f"/{name} {text}".encode(), "setting"))
        elif kind == 3:
            lines.append((b"/" + r.choice([b"bogus", b"\xff\xfe", b"temperature", b"top_k 1.5", b"seed x"]),
                          "command"))
        else:
            junk = invalid_utf8(r).replace(b"\n", b" ").replace(b"\r", b" ")
            lines.append((b"/" + r.choice([b"temperature ", b"top_p "]) + junk, "not UTF-8"))
    return lines


def chat_run(path, shakespeare_char):
    """A char-level model in the plain chat format with room for a conversation (block_size 256): random weights,
    greedy replies that depend on the whole conversation."""
    sys.path.insert(0, str(REPO))
    import torch
    import checkpoint
    from model import GPT, GPTConfig
    meta = json.loads((shakespeare_char / "meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=256, n_layer=1, n_head=2, n_embd=32))
    checkpoint.save(path, model, {"iter_num": 0}, {**meta, "chat_format": "plain"})
    return path


def test_interactive_session_survives_bad_lines(trained_char, shakespeare_char, tmp_path):
    """Interactive sessions (plain text on the trained model; a chat whose conversation carries on) with a generated
    mix of bad lines between good prompts: every bad line is one error message and the session goes on; the good
    prompts get exactly the replies and prompt lengths they get in a session without the bad lines, so no bad line
    changed a setting or the conversation."""
    r = random.Random(SEED + 1)
    good = [b"ROMEO:", b"KING:", b"What say you?", b"Hark!"]
    cases = []
    for out in (trained_char[0], chat_run(tmp_path / "chat", shakespeare_char)):
        args = [f"--out_dir={out}", "--device=cpu", "--threads=1", "--interactive=True", "--temperature=0",
                "--max_new_tokens=6"]
        bad = [interactive_lines(r, 15) for _ in good]
        mixed = b"".join(b"".join(line + b"\n" for line, _ in junk) + prompt + b"\n" for junk, prompt in zip(bad, good))
        cases.append(case("sample.py", *args, stdin=b"\n".join(good) + b"\n"))
        cases.append(case("sample.py", *args, stdin=mixed, bad=sum(len(b) for b in bad)))
    run_batch(cases, tmp_path)
    prompt_lengths = []
    for clean, mixed in zip(cases[::2], cases[1::2]):
        for c in (clean, mixed):
            assert c["code"] == 0 and "Traceback" not in c["stderr"], c["stderr"][-3000:]
        turns = [chunk.split("\n")[-1] + "|" + after.split("]")[0] for chunk, after in
                 zip(mixed["stdout"].split("\n[")[:-1], mixed["stdout"].split("\n[")[1:])]
        clean_turns = [chunk.split("\n")[-1] + "|" + after.split("]")[0] for chunk, after in
                       zip(clean["stdout"].split("\n[")[:-1], clean["stdout"].split("\n[")[1:])]
        assert len(turns) == len(good) and [t.split(", ")[:2] for t in turns] == \
            [t.split(", ")[:2] for t in clean_turns], (mixed["stdout"], clean["stdout"])
        errors = [line for line in mixed["stdout"].splitlines() if line.startswith("error: ")]
        assert len(errors) == mixed["bad"], (len(errors), mixed["bad"], mixed["stdout"])
        assert not [line for line in clean["stdout"].splitlines() if line.startswith("error: ")]
        prompt_lengths.append([int(t.split("|")[1].split()[0]) for t in turns])
    assert prompt_lengths[1] == sorted(prompt_lengths[1]) and prompt_lengths[1][-1] > 40  # the chat carried on
    print(f"interactive: {sum(c.get('bad', 0) for c in cases)} bad lines in {len(cases) // 2} sessions")


# ----------------------------------------------------------------------------------------------------------------
# export.py


def make_dataset_like(path, shakespeare_char):
    path.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        os.link(shakespeare_char / name, path / name)  # the very files of the session's dataset
    return path


def test_export_refuses_what_it_did_not_make(trained_char, shakespeare_char, tmp_path):
    """export.py's targets, generated: other runs' out_dirs (also through a symlink, or the ckpt/ folder itself),
    datasets, Hugging Face folders without our meta.json, folders with other files or links into a checkpoint,
    files, paths under a file, the run's own out_dir. Each is one line naming --export_dir, exit 2, and every
    checkpoint and dataset is byte-identical; with --overwrite=True an out_dir's ckpt/ survives and still loads;
    earlier exports are replaced whole; a disk that fills up mid-export leaves the earlier export as it was."""
    sys.path.insert(0, str(REPO))
    import checkpoint
    out = trained_char[0]
    r = random.Random(SEED + 2)
    runs = [copy_run(out, tmp_path / f"run{i}") for i in range(3)]
    data = make_dataset_like(tmp_path / "data", shakespeare_char)
    guarded = [out, shakespeare_char, *runs]
    before = snapshot(*guarded)
    refused, fine = [], []

    def target(kind, i):
        t = tmp_path / f"t{i}-{kind}"
        run = r.choice(runs)
        if kind == "out_dir":
            return run
        if kind == "ckpt":
            return run / "ckpt"
        if kind == "symlink_to_run":
            t.symlink_to(run, target_is_directory=True)
        elif kind == "dataset":
            return data
        elif kind == "symlink_to_dataset":
            t.symlink_to(shakespeare_char, target_is_directory=True)
        elif kind == "hf_folder":
            t.mkdir()
            (t / "config.json").write_text('{"model_type": "gpt2"}')
            (t / "model.safetensors").write_bytes(b"\0" * 16)
        elif kind == "other_files":
            t.mkdir()
            (t / r.choice(["notes.txt", "README.md", "x.bin"])).write_text("mine")
        elif kind == "link_into_checkpoint":  # looks like an export, but its config.json is a link into a checkpoint
            t.mkdir()
            (t / "config.json").symlink_to(run / "ckpt" / "config.json")
            (t / "meta.json").write_text("{}")
        elif kind == "meta_only":  # a dataset's meta.json alone (its .bin files gone) is no export either
            t.mkdir()
            shutil.copy(shakespeare_char / "meta.json", t / "meta.json")
        elif kind == "subfolder":
            (t / "sub").mkdir(parents=True)
            (t / "meta.json").write_text("{}")
        elif kind == "file":
            t.write_bytes(invalid_utf8(r))
        elif kind == "under_file":
            t.write_text("x")
            return t / "a" / "b"
        elif kind == "own":
            return out
        return t

    kinds = ["out_dir", "ckpt", "symlink_to_run", "dataset", "symlink_to_dataset", "hf_folder", "other_files",
             "link_into_checkpoint", "meta_only", "subfolder", "file", "under_file", "own"]
    for i in range(36):
        kind = kinds[i] if i < len(kinds) else r.choice(kinds)
        t = target(kind, i)
        extra = [r.choice(["--dtype=float32", "--dtype=bfloat16", "--max_shard_gb=1"])]
        refused.append(case("export.py", f"--out_dir={out}", f"--export_dir={t}", *extra, kind=kind))
    for value in ("nan", "inf", "-1", "0", "-inf", "1e-400"):  # numeric flags at the edges
        refused.append(case("export.py", f"--out_dir={out}", f"--export_dir={tmp_path / 'never'}",
                            f"--max_shard_gb={value}", kind="flag", needle="--max_shard_gb"))
    for i in range(6):  # corrupt weights
        run = copy_run(out, tmp_path / f"corrupt{i}")
        corrupt_header(r, run / "ckpt" / "model.safetensors")
        refused.append(case("export.py", f"--out_dir={run}", f"--export_dir={tmp_path / f'never{i}'}",
                            kind="corrupt", needle="model.safetensors"))
    earlier = tmp_path / "earlier"
    fine.append(case("export.py", f"--out_dir={out}", f"--export_dir={earlier}", "--max_shard_gb=0.0001"))
    full_disk = [case("export.py", f"--out_dir={out}", f"--export_dir={earlier}", "--dtype=float32",
                      "--max_shard_gb=0.0001", fault={"module": "hf", "name": "save_file", "at": at})
                 for at in (1, 2)]  # the disk fills up on the first shard, on the second
    full_disk += [case("export.py", f"--out_dir={out}", f"--export_dir={earlier}", "--adapter_only=True",
                       fault={"module": "hf", "name": "save_file", "at": 1})]  # no adapters: refused, not written
    snaps = [snapshot_case(earlier), snapshot_case(earlier)]
    fine.append(case("export.py", f"--out_dir={out}", f"--export_dir={earlier}", "--dtype=float32"))  # replaced
    fine.append(case("export.py", f"--out_dir={out}", f"--export_dir={runs[0]}", "--overwrite=True"))
    run_batch(refused + fine[:1] + snaps[:1] + full_disk + snaps[1:] + fine[1:], tmp_path)
    assert snaps[0]["hashes"] == snaps[1]["hashes"] and len(snaps[0]["hashes"]) > 6  # sharded, untouched
    for c in refused:
        if c["kind"] == "own":
            assert_one_line_error(c, "--export_dir", "own out_dir")
        else:
            assert_one_line_error(c, c.get("needle") or "--export_dir")
    for c in full_disk[:2]:
        assert_one_line_error(c, str(earlier), "No space left")
    assert_one_line_error(full_disk[2], "no LoRA adapters")
    for c in fine:
        assert c["code"] == 0 and "Traceback" not in c["stderr"], (c["argv"], c["stderr"][-3000:])
    # the earlier export (sharded) was replaced whole by the unsharded one; the failed one changed nothing between
    assert sorted(os.listdir(earlier)) == sorted(["config.json", "meta.json", "model.safetensors",
                                                 "generation_config.json", "tokenizer.json", "tokenizer_config.json"])
    assert not [n for n in os.listdir(tmp_path) if ".export-" in n or ".old-" in n]  # no temporary folders left
    after = snapshot(*guarded)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed <= {str(runs[0] / n) for n in ("config.json", "model.safetensors", "meta.json",
                                                  "generation_config.json", "tokenizer.json",
                                                  "tokenizer_config.json")}, changed  # only --overwrite's target
    checkpoint.load_model(runs[0])  # its checkpoint still loads
    assert checkpoint.read(runs[0])["files"] == checkpoint.read(out)["files"]
    print(f"export.py: {len(refused)} refused, {len(fine)} written, {len(full_disk)} failed half-way")


if __name__ == "__main__":
    _harness(*sys.argv[1:3])
