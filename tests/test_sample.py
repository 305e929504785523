"""sample.py: greedy output equal to transformers' generate from Hugging Face directories and out_dirs of all three
families, interactive mode driven through stdin (settings commands, chat turns that carry the conversation, clean
exits), reproducible sampling, the summary line, prompts from files, clear one-line errors."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, int8_rounded, run_script
from model import GPT
import checkpoint
from tokenizer import load_tokenizer, make_meta, render_prompt

SEP = "---------------"
SUMMARY = re.compile(r"\n\[(\d+) prompt tokens, (\d+) new tokens, \d+\.\d\ds, \d+\.\d tokens/s\]\n")
TOKENIZER = {"gpt2": "gpt2", "gemma3": "gpt2", "gpt_oss": "o200k_harmony"}  # Gemma's own is not tiktoken


def sample(out_dir, *args):
    """sample.py on an out_dir; the samples' texts and each one's (prompt tokens, new tokens)."""
    result = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", "--threads=1", "--num_samples=2", *args)
    assert result.returncode == 0, result.stderr
    return split_samples(result.stdout)


def split_samples(stdout):
    """Non-interactive output: each sample is its text, a summary line, then the separator line."""
    texts, counts, pos = [], [], 0
    for m in SUMMARY.finditer(stdout):
        texts.append(stdout[pos:m.start()])
        counts.append((int(m.group(1)), int(m.group(2))))
        assert stdout[m.end():].startswith(SEP + "\n")
        pos = m.end() + len(SEP) + 1
    assert pos == len(stdout) and texts, stdout
    return texts, counts


def replies(stdout):
    """Interactive output: the replies, each followed by its summary line, and whatever else was printed."""
    parts = SUMMARY.split(stdout)  # [before, prompt tokens, new tokens, between, ..., after]
    return [(parts[i], int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts) - 1, 3)], parts[-1]


def interact(*args, stdin):
    """sample.py --interactive=True with `stdin` piped in; its stdout."""
    cmd = [sys.executable, str(REPO / "sample.py"), "--device=cpu", "--threads=1", "--interactive=True", *args]
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout


# ----------------------------------------------------------------------------------------------------------------
# a char-level model trained by train.py


def test_greedy_continues_past_the_context(trained_char):
    texts, counts = sample(trained_char[0], "--temperature=0", "--max_new_tokens=80", "--start=ROMEO:")
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:")
    assert len(texts[0]) == len("ROMEO:") + 80 and counts == [(6, 80), (6, 80)]  # 80 > block_size 32


def test_seeded_sampling_is_reproducible(trained_char):
    args = [trained_char[0], "--temperature=1.0", "--top_k=0", "--top_p=0.95", "--max_new_tokens=30", "--seed=7"]
    texts, counts = sample(*args)
    assert (texts, counts) == sample(*args) and counts == [(1, 30)] * 2
    assert texts[0] != texts[1]  # the generator goes on from one sample to the next


def test_interactive_settings_without_restarting(trained_char):
    out = trained_char[0]
    model, _ = checkpoint.load_model(out)
    tok = load_tokenizer(checkpoint.load_meta(checkpoint.read(out)))
    with torch.no_grad():
        greedy = tok.decode(model.generate(torch.tensor([tok.encode("ROMEO:\nWhat")]), 12, temperature=0)[0, 11:])
        seeded = tok.decode(model.generate(torch.tensor([tok.encode("KING:")]), 9, temperature=1.0, top_k=5,
                                           generator=torch.Generator().manual_seed(3))[0, 5:])
    session = "\n".join(["/temperature 0", "/max_new_tokens 12", r"ROMEO:\nWhat",  # \n typed: a newline
                         "/bogus", "/top_p 2", "/top_k x", "", "/help",
                         "/temperature 1.0", "/top_k 5", "/max_new_tokens 9", "/seed 3", "KING:",
                         "/quit", "ROMEO:"]) + "\n"  # nothing after /quit runs
    got, _ = replies(interact(f"--out_dir={out}", stdin=session))
    assert len(got) == 2
    (r1, p1, n1), (r2, p2, n2) = got
    assert r1.startswith("interactive:") and r1.endswith("\nmax_new_tokens = 12\n" + greedy) and (p1, n1) == (11, 12)
    assert r2.endswith("\nseed = 3\n" + seeded) and (p2, n2) == (5, 9)
    for line in ["error: unknown command /bogus", "error: top_p must be in (0, 1]", "error: /top_k needs a number",
                 "/max_new_tokens N", "top_k = 5"]:  # errors, the help text, a setting applied
        assert line in r2
    assert "top_p = " not in r2  # the refused setting was not applied


def test_start_from_file(trained_char, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING HENRY:\nWhat")
    texts, _ = sample(trained_char[0], f"--start=FILE:{prompt}", "--max_new_tokens=5", "--num_samples=1")
    assert texts[0].startswith("KING HENRY:\nWhat") and len(texts[0]) == len("KING HENRY:\nWhat") + 5


@pytest.mark.parametrize("args, message", [([], "no checkpoint"), (["--chat_format=chatml"], "chat_format"),
                                           (["--start=FILE:/no/such/file"], "/no/such/file"),
                                           (["--quantize=int4"], "--quantize"), (["--quantize=INT8"], "--quantize")])
def test_sample_errors_are_one_line(tmp_path, trained_char, args, message):
    out = trained_char[0] if args else tmp_path / "nothing"
    result = run_script("sample.py", f"--out_dir={out}", "--device=cpu", *args)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# tiny random transformers checkpoints of each family, in a Hugging Face directory and converted to an out_dir


def hf_model(family, vocab_size):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GptOssConfig,
                              GptOssForCausalLM)
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                           attn_implementation="eager"))
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=64,
            layer_types=["sliding_attention", "full_attention"], attn_implementation="eager"))
    else:
        model = GptOssForCausalLM(GptOssConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
            max_position_embeddings=64, attn_implementation="eager", experts_implementation="eager"))
    with torch.no_grad():  # varied greedy tokens (transformers' init zeroes biases, norms at 0/1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    model.generation_config.eos_token_id = None  # sample.py runs plain text to its full length
    return model.eval()


def reference(model, ids, n, stop=None):
    """transformers' greedy continuation of ids: n token ids, or those before the first stop token."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(ids):]
    new = out.tolist()
    return new[:new.index(stop)] if stop in new else new


def universal(text):
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as a text-mode pipe reads it


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> (transformers model, tokenizer, Hugging Face directory, out_dir of the converted model)."""
    pytest.importorskip("transformers")
    made = {}

    def get(family):
        if family not in made:
            tok = load_tokenizer({"tokenizer": TOKENIZER[family]})
            model = hf_model(family, tok.vocab_size)
            hf_dir, out = tmp_path_factory.mktemp(f"hf-{family}"), tmp_path_factory.mktemp(f"out-{family}")
            model.save_pretrained(hf_dir)
            checkpoint.save(out, GPT.from_pretrained(str(hf_dir)), {}, make_meta(tok))
            made[family] = model, tok, hf_dir, out
        return made[family]
    return get


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "gpt_oss"])
def test_hugging_face_directory_and_out_dir_match_transformers(family, family_dirs):
    model, tok, hf_dir, out = family_dirs(family)
    start = "The answer to life"
    ids = tok.encode(start)
    expected = universal(tok.decode(reference(model, ids, 16)))
    hf_args = [f"--init_from={hf_dir}"] + (["--tokenizer=gpt2"] if family == "gemma3" else [])
    result = run_script("sample.py", *hf_args, "--device=cpu", "--threads=1", "--num_samples=1", "--max_new_tokens=16",
                        f"--start={start}", "--temperature=0")
    assert result.returncode == 0, result.stderr
    texts, counts = split_samples(result.stdout)
    assert texts == [start + expected] and counts == [(len(ids), 16)]
    # the same model converted to an out_dir, in interactive mode: the banner line, then the completion
    stdout = interact(f"--out_dir={out}", "--temperature=0", "--max_new_tokens=16", stdin=start + "\n")
    [(reply, prompt_tokens, new_tokens)], _ = replies(stdout)
    assert reply.startswith("interactive:") and reply.split("\n", 1)[1] == expected
    assert (prompt_tokens, new_tokens) == (len(ids), 16)


@pytest.mark.parametrize("family", ["gpt2", "gpt_oss"])
def test_quantize_int8_matches_transformers_on_int8_rounded_weights(family, family_dirs):
    """--quantize=int8 (GPT-2 from its Hugging Face directory; GPT-OSS, experts included, from an out_dir): the
    greedy text transformers generates when every weight matrix is rounded to int8 by the rule (int8_rounded),
    with --compile=True accepted (the int8 kernel is compiled on its own: a note, not an error)."""
    import copy
    model, tok, hf_dir, out = family_dirs(family)
    start = "The answer to life"
    ids = tok.encode(start)
    expected = universal(tok.decode(reference(int8_rounded(copy.deepcopy(model)), ids, 16)))
    source = f"--init_from={hf_dir}" if family == "gpt2" else f"--out_dir={out}"
    result = run_script("sample.py", source, "--device=cpu", "--threads=1", "--num_samples=1", "--max_new_tokens=16",
                        f"--start={start}", "--temperature=0", "--quantize=int8", "--compile=True")
    assert result.returncode == 0, result.stderr
    assert "--compile skipped with --quantize=int8" in result.stderr
    texts, counts = split_samples(result.stdout)
    assert texts == [start + expected] and counts == [(len(ids), 16)]


def test_gemma_directory_needs_a_tokenizer(family_dirs):
    result = run_script("sample.py", f"--init_from={family_dirs('gemma3')[2]}", "--device=cpu")
    assert result.returncode != 0 and "Traceback" not in result.stderr and "--tokenizer=gpt2" in result.stderr


def test_interactive_chat_carries_the_conversation(family_dirs, tmp_path):
    """An out_dir whose meta.json names a chat format (as after fine-tuning on data/chat): each line is a user
    message; the prompt is the whole conversation rendered by tokenizer.render_prompt; a reply ends before
    the format's stop token."""
    model, tok, _, out = family_dirs("gpt2")
    chat_out = tmp_path / "out-chat"
    ours, _ = checkpoint.load_model(out)
    checkpoint.save(chat_out, ours, {}, {**make_meta(tok), "chat_format": "plain"})
    stdout = interact(f"--out_dir={chat_out}", "--temperature=0", "--max_new_tokens=10",
                      stdin="Hello there\n/max_new_tokens 6\nAnd then?\n/reset\nAnd then?")  # ends: no newline
    got = replies(stdout)[0]
    assert len(got) == 3 and "conversation cleared" in stdout
    history = []
    for (reply, prompt_tokens, _), (text, n) in zip(got, [("Hello there", 10), ("And then?", 6), ("And then?", 6)]):
        if "conversation cleared" in reply:  # /reset came before this turn
            history = []
        ids = render_prompt(tok, history + [{"role": "user", "content": text}], "plain")
        assert len(ids) + n <= 64  # no turn dropped for room
        expected = tok.decode(reference(model, ids, n, stop=tok.eot_token))
        assert prompt_tokens == len(ids) and reply.endswith(universal(expected))
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": expected}]


def test_chat_reply_is_capped_at_the_context_left(family_dirs, tmp_path):
    """max_new_tokens (default 500) past a 64-token context: the reply is the greedy continuation of the whole
    conversation, cut where the context ends, never of a prompt cropped to make room."""
    model, tok, _, out = family_dirs("gpt2")
    chat_out = tmp_path / "out-chat"
    ours, _ = checkpoint.load_model(out)
    checkpoint.save(chat_out, ours, {}, {**make_meta(tok), "chat_format": "plain"})
    stdout = interact(f"--out_dir={chat_out}", "--temperature=0", stdin="Hello there\n")
    (reply, prompt_tokens, new_tokens), = replies(stdout)[0]
    ids = render_prompt(tok, [{"role": "user", "content": "Hello there"}], "plain")
    expected = reference(model, ids, 64 - len(ids), stop=tok.eot_token)
    assert prompt_tokens == len(ids) and new_tokens <= 64 - len(ids)
    assert reply.endswith(universal(tok.decode(expected)))
