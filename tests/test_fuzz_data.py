"""Fuzzing data/*/prepare.py and data/chat/make_reverse.py with generated bad input (issue 17), through the in-process
harness of test_fuzz_scripts.py: input files that are not UTF-8 or missing, out_dirs that are files, cannot be
created, hold a checkpoint, an export or a dataset of the other kind, flags at their edges, JSON text holding lone
surrogates, rows that fail to render half-way, and a disk that fills up at each file of the dataset. Each is one line
on stderr starting "error: " naming the flag or file, exit 2, no traceback; every checkpoint and dataset that was
there is byte-identical afterwards and no temporary folder is left behind. A re-run over a dataset of the same kind,
and --overwrite=True over a run's out_dir, succeed without touching the checkpoint."""
import json
import os
import random
import shutil

import numpy as np

from test_fuzz_scripts import (SEED, assert_one_line_error, case, copy_run, invalid_utf8, run_batch, snapshot,
                               snapshot_case)

TEXT_SCRIPTS = {"shakespeare_char": ".txt", "shakespeare": ".txt", "wikipedia": ".jsonl", "openwebtext": ".jsonl"}


def _is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def prep(name, *argv, **kw):
    return case(f"data/{name}/prepare.py", *argv, **kw)


def conversation(r):
    word = "".join(r.choice("abcdefgh") for _ in range(r.randint(3, 6)))
    return {"messages": [{"role": "user", "content": f"reverse: {word}"}, {"role": "assistant", "content": word[::-1]}]}


def write_chats(path, convs):
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    return path


def write_docs(path, r, n=12):
    docs = [" ".join(r.choice(["to", "be", "or", "not", "ROMEO", "KING"]) for _ in range(r.randint(3, 20)))
            for _ in range(n)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path.write_text("\n\n".join(docs) + "\n")
    return path


def test_prepare_scripts_never_cost_a_dataset(trained_char, shakespeare_char, tmp_path):
    r = random.Random(SEED + 3)
    # what must survive: the session's dataset and run, copies of them as targets, a chat dataset made here
    tokens_ds = tmp_path / "tokens_ds"
    shutil.copytree(shakespeare_char, tokens_ds)
    chat_ds = tmp_path / "chat_ds"
    runs = [copy_run(trained_char[0], tmp_path / f"run{i}") for i in range(2)]
    export_like = tmp_path / "export_like"  # what export.py leaves: a model folder with our meta.json
    export_like.mkdir()
    for name in ("config.json", "model.safetensors", "meta.json"):
        shutil.copy(runs[0] / name, export_like / name)
    good_chats = write_chats(tmp_path / "good.jsonl", [conversation(r) for _ in range(20)])
    inputs = {name: write_docs(tmp_path / f"good_{name}{ext}", r) for name, ext in TEXT_SCRIPTS.items()}
    setup = [prep("chat", f"--input={good_chats}", f"--out_dir={chat_ds}", "--block_size=16")]
    guarded = [shakespeare_char, trained_char[0], tokens_ds, chat_ds, *runs, export_like]
    cases = []

    def dataset_for(name):
        return chat_ds if name == "chat" else tokens_ds

    # input that is not UTF-8: plain text, JSON Lines, chat files, val files
    for i in range(36):
        name = (list(TEXT_SCRIPTS) + ["chat", "chat_val"])[i % 6]
        bad = tmp_path / f"bad{i}{TEXT_SCRIPTS.get(name, '.jsonl')}"
        lines = [json.dumps(conversation(r)).encode() for _ in range(r.randint(0, 5))] if "chat" in name else []
        bad_text = invalid_utf8(r)
        if name != "shakespeare_char" and name != "shakespeare" and i % 4:  # most inside a JSON string: valid JSON
            junk = bytes(b for b in bad_text if b not in b'"\\\n\r')  # but for the bytes that are not UTF-8
            junk = junk if not _is_utf8(junk) else junk + b"\xe9"
            bad_text = (b'{"messages": [{"role": "user", "content": "' + junk + b'"}, {"role": "assistant", '
                        b'"content": "ok"}]}' if "chat" in name else b'{"text": "' + junk + b'"}')
        lines.insert(r.randint(0, len(lines)), bad_text)
        bad.write_bytes(b"\n".join(lines))
        if name == "chat_val":
            cases.append(prep("chat", f"--input={good_chats}", f"--val_input={bad}", f"--out_dir={chat_ds}",
                              needle=bad))
        else:
            cases.append(prep(name, f"--input={bad}", f"--out_dir={dataset_for(name)}", needle=bad))
    # input missing, or a folder
    for name in list(TEXT_SCRIPTS) + ["chat"]:
        for missing in (tmp_path / "nope" / f"x{r.randrange(1000)}.txt", tmp_path):
            cases.append(prep(name, f"--input={missing}", f"--out_dir={dataset_for(name)}", needle=missing))
    # JSON text with lone surrogates (valid JSON escapes, no Unicode characters): the meta.json-at-0-bytes example
    for i in range(8):
        name = ["chat", "wikipedia", "openwebtext", "chat"][i % 4]
        path = tmp_path / f"surrogate{i}.jsonl"
        junk = "x".join(r.choice(["\\ud800", "\\udfff", "\\udc80", "\\ud83d"])  # never a pair: a pair is a character
                        for _ in range(r.randint(1, 3)))
        rows = [json.dumps(conversation(r)) for _ in range(5)] if name == "chat" else \
            [json.dumps({"text": "fine text"}) for _ in range(5)]
        row = (f'{{"messages": [{{"role": "user", "content": "hi"}}, {{"role": "assistant", "content": "a{junk}"}}]}}'
               if name == "chat" else f'{{"text": "a{junk}b"}}')
        rows.insert(r.randint(0, 5), row)
        path.write_text("\n".join(rows) + "\n")
        extra = ["--tokenizer=char"] if i % 4 == 3 else []
        cases.append(prep(name, f"--input={path}", f"--out_dir={dataset_for(name)}", *extra, needle=path))
    # rows that fail to render after train.bin is written: gemma's system message only first (also for char, where
    # the vocabulary is gathered first)
    for i in range(4):
        val = write_chats(tmp_path / f"gemma_val{i}.jsonl", [conversation(r) for _ in range(3)])
        lines = val.read_text().splitlines()
        lines[r.randrange(3)] = json.dumps({"messages": [{"role": "user", "content": "a"},
                                                         {"role": "system", "content": "late"},
                                                         {"role": "assistant", "content": "b"}]})
        val.write_text("\n".join(lines) + "\n")
        extra = ["--tokenizer=char"] if i % 2 else []
        cases.append(prep("chat", f"--input={good_chats}", f"--val_input={val}", "--chat_format=gemma", *extra,
                          f"--out_dir={chat_ds}", needle=val))
    # out_dirs that cannot take a dataset: a file, under a file, a broken link; a model; the other kind of dataset
    a_file = tmp_path / "a_file"
    a_file.write_bytes(invalid_utf8(r))
    broken = tmp_path / "broken_link"
    broken.symlink_to(tmp_path / "nowhere" / "x")
    linked_run = tmp_path / "linked_run"
    linked_run.symlink_to(trained_char[0], target_is_directory=True)
    for name in list(TEXT_SCRIPTS) + ["chat"]:
        argv = [f"--input={good_chats if name == 'chat' else inputs[name]}"]
        for out in (a_file, a_file / "sub" / "dir", broken, runs[r.randrange(2)], runs[0] / "ckpt", linked_run,
                    export_like, tokens_ds if name == "chat" else chat_ds):
            cases.append(prep(name, *argv, f"--out_dir={out}", needle="--out_dir"))
    # flags at their edges
    for value in ("nan", "inf", "-inf", "0", "1", "-0.5", "1e-400"):
        cases.append(prep("chat", f"--input={good_chats}", f"--val_fraction={value}", f"--out_dir={chat_ds}",
                          needle="--val_fraction"))
    for value in ("0", "-1", "-99999999999999999999"):
        cases.append(prep("chat", f"--input={good_chats}", f"--block_size={value}", f"--out_dir={chat_ds}",
                          needle="--block_size"))
        for flag in ("n_train", "n_val", "n_test", "num_proc"):
            cases.append(prep("wikipedia", f"--input={inputs['wikipedia']}", f"--{flag}={value}",
                              f"--out_dir={tokens_ds}", needle=f"--{flag}"))
        cases.append(prep("openwebtext", f"--input={inputs['openwebtext']}", f"--num_proc={value}",
                          f"--out_dir={tokens_ds}", needle="--num_proc"))
    for argv, needle in [(["--n=0"], "--n"), (["--n=1"], "--n"), ([f"--n={10**12}"], "--n"),
                         (["--val_fraction=nan"], "--val_fraction"), (["--val_fraction=1"], "--val_fraction"),
                         ([f"--out={a_file}"], "--out"), ([f"--out={a_file / 'x'}"], "--out")]:
        cases.append(case("data/chat/make_reverse.py", *argv, needle=needle))
    # a full disk at each file of the dataset: when that file is written, and at meta.json
    for name, bins in (("shakespeare_char", 2), ("shakespeare", 2), ("wikipedia", 3), ("openwebtext", 2),
                       ("chat", 4)):
        argv = [f"--input={good_chats if name == 'chat' else inputs[name]}", f"--out_dir={dataset_for(name)}"]
        for at in range(1, bins + 1):
            cases.append(prep(name, *argv, fault={"module": "common", "name": "write_bin", "at": at},
                              needle="No space left"))
        cases.append(prep(name, *argv, fault={"module": "common", "name": "write_json", "at": 1},
                          needle="No space left"))
    refused = len(cases)
    # what must work: a re-run over a dataset of its own kind, --overwrite=True over a run (its ckpt/ is kept)
    rerun = tmp_path / "rerun"
    shutil.copytree(shakespeare_char, rerun)
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be: that is the question.\n" * 3)
    linked = tmp_path / "linked_ds"  # a dataset whose files are hard links to the session's: replaced, never written
    linked.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        os.link(shakespeare_char / name, linked / name)
    ok = [prep("shakespeare_char", f"--input={small}", f"--out_dir={rerun}"),
          prep("shakespeare", f"--input={small}", f"--out_dir={linked}"),
          prep("shakespeare_char", f"--input={small}", f"--out_dir={runs[1]}", "--overwrite=True"),
          prep("chat", f"--input={good_chats}", f"--out_dir={chat_ds}", "--block_size=16")]  # the same again
    before, after = snapshot_case(*guarded), snapshot_case(*guarded)
    run_batch(setup + [before] + cases + [after] + ok, tmp_path)
    assert setup[0]["code"] == 0, setup[0]["stderr"]
    for c in cases:
        assert_one_line_error(c, c["needle"])
    changed = {p for p in set(before["hashes"]) | set(after["hashes"])
               if before["hashes"].get(p) != after["hashes"].get(p)}
    assert not changed, sorted(changed)[:10]
    for c in ok:
        assert c["code"] == 0 and "Traceback" not in c["stderr"], (c["argv"], c["stderr"][-2000:])
    meta = json.loads((rerun / "meta.json").read_text())
    assert meta["vocab_size"] == len(set(small.read_text()))
    assert len(np.fromfile(rerun / "train.bin", dtype=meta["dtype"])) == int(len(small.read_text()) * 0.9)
    # --overwrite=True over a run: the dataset's files are renamed in, the checkpoint is as it was and still loads
    import checkpoint
    assert json.loads((runs[1] / "meta.json").read_text()) == meta
    ckpt_files = {p: h for p, h in before["hashes"].items() if p.startswith(str(runs[1] / "ckpt"))}
    assert ckpt_files and all(snapshot(runs[1] / "ckpt")[p] == h for p, h in ckpt_files.items())
    checkpoint.load_model(runs[1])
    # the chat re-run replaced its dataset: the same input gives the same bytes
    assert snapshot(chat_ds) == {p: h for p, h in after["hashes"].items() if p.startswith(str(chat_ds))}
    session = {p: h for p, h in before["hashes"].items()
               if p.startswith((str(shakespeare_char), str(trained_char[0])))}
    assert snapshot(shakespeare_char, trained_char[0]) == session  # also after the runs that succeeded
    assert json.loads((linked / "meta.json").read_text())["tokenizer"] == "gpt2"
    leftovers = [os.path.join(d, n) for root in [tmp_path, shakespeare_char] for d, dirs, _ in os.walk(root)
                 for n in dirs if n.startswith(".prepare-")]
    assert not leftovers, leftovers
    print(f"prepare scripts: {refused} refused, {len(ok)} written")
