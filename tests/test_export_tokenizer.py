"""The Hugging Face tokenizer files export.py writes (tokenizer.hf_tokenizer_files), checked with transformers'
AutoTokenizer: every text encodes to exactly our tokenizer's ids and decodes back, for each tokenizer kind, and
apply_chat_template gives render_prompt's / render_chat's ids. End to end: export.py on a from-scratch run gives a
directory whose tokenizer and model reproduce ours."""
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import checkpoint
import export
from conftest import run_script
from model import GPT, GPTConfig
from tokenizer import (PIECE_MARK, CharTokenizer, hf_tokenizer_files, load_tokenizer, make_meta, render_chat,
                       render_prompt)

TEXT = ("Héllo, wörld! Ça va? naïve café — Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย, 한국어\n"
        "你好，世界。日本語のテキスト、カタカナ ー ｆｕｌｌｗｉｄｔｈ\n\n"
        "Emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷 ❤️\tTabs\t\tand  double  spaces   \n"
        "Digits 0 12 345 6789 3.14159 1,000,000; it's they'LL we've I'M\r\n"
        "def f(x):\n    return {'a': [x ** 2, \"\\n\"]}  # code\n\n\n"
        "<|endoftext|>next document<|endoftext|>   trailing spaces \n  \t ")
# character blocks for random texts: ASCII, Latin-1 and Extended, combining marks, Greek/Cyrillic, Hebrew/Arabic,
# Devanagari, Thai, Hangul Jamo, punctuation and symbols, CJK punctuation and kana, CJK ideographs, Hangul
# syllables, fullwidth forms, emoji, and anything above U+FFFF
BLOCKS = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
          (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x23FF), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
          (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
SPACES = [" ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u2028", "\u3000"]
WORDS = ["the", " the", "The", "'s", "'LL", "'re", "123", "4567", "==", "--", "...", "://", "</", "<|", "|>", "aaa",
         "😀", "é", "e\u0301", "中", "ー", "\u200d", "\ufeff", "<|endoftext|>"]
CHARS = "".join(sorted(set("\n\t !\"&'()+,-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789éü中文😀")))
KINDS = ["gpt2", "r50k_base", "o200k_base", "o200k_harmony", "char"]


def our_tokenizer(kind):
    return CharTokenizer(CHARS) if kind == "char" else load_tokenizer({"tokenizer": kind})


def random_text(r, kind):
    """Random unicode from BLOCKS, whitespace runs, repeated words and punctuation; for "char", CHARS."""
    if kind == "char":
        return "".join(r.choice(CHARS) * r.choice([1, 1, 1, 2, 5]) for _ in range(r.randint(1, 60)))
    pieces = []
    for _ in range(r.randint(1, 12)):
        k = r.random()
        if k < 0.3:
            lo, hi = r.choice(BLOCKS)
            pieces.append("".join(chr(r.randint(lo, hi)) for _ in range(r.randint(1, 6))))
        elif k < 0.5:
            pieces.append("".join(r.choice(SPACES) * r.randint(1, 4) for _ in range(r.randint(1, 3))))
        elif k < 0.8:
            pieces.append(r.choice(WORDS) * r.randint(1, 4))
        else:
            pieces.append("".join(r.choice("aA0 _-=.!'\n") for _ in range(r.randint(1, 12))))
    return "".join(pieces)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(ours, AutoTokenizer of our files) for a tokenizer kind and chat format, each built once."""
    cache = {}

    def get(kind, chat_format=None):
        if (kind, chat_format) not in cache:
            ours, path = our_tokenizer(kind), tmp_path_factory.mktemp(f"{kind}-{chat_format}")
            for name, text in hf_tokenizer_files(ours, chat_format, 1024).items():
                (path / name).write_text(text, encoding="utf-8")
            cache[kind, chat_format] = ours, AutoTokenizer.from_pretrained(path)
        return cache[kind, chat_format]
    return get


@pytest.mark.parametrize("kind", KINDS)
def test_texts_encode_to_our_ids_and_decode_back(exported, kind):
    ours, theirs = exported(kind)
    r = random.Random(kind)
    texts = [TEXT if kind != "char" else "Hello, world! 中文 😀\n\nTabs\there  and  spaces 123.\n"]
    texts += [random_text(r, kind) for _ in range(500)]
    texts += [w * n for w in SPACES + WORDS for n in (1, 2, 3, 7)] if kind != "char" else []
    want = [ours.encode(t, allow_special=True) for t in texts]
    got = theirs(texts, add_special_tokens=False)["input_ids"]
    assert want[0] == got[0] and (kind == "char" or ours.eot_token in want[0])  # the special token, as one id
    bad = [(t, w, g) for t, w, g in zip(texts, want, got) if w != g]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {bad[0]}"
    assert theirs.batch_decode(got) == texts
    if kind != "char":  # every special token (but o200k_harmony's second name for 200018, below) in text
        specials = {s: i for s, i in ours.enc._special_tokens.items() if s != "<|reserved_200018|>"}
        assert theirs.encode("x".join(specials), add_special_tokens=False) == \
            ours.encode("x".join(specials), allow_special=True)
        assert theirs.eos_token_id == ours.eot_token and len(theirs) == ours.vocab_size
    if kind == "o200k_harmony":  # 200018 is <|endofprompt|> and <|reserved_200018|>: the former, as tiktoken decodes
        assert theirs.decode([200018]) == ours.decode([200018]) == "<|endofprompt|>"
        assert theirs.bos_token == "<|startoftext|>"


def random_conversation(r, kind, chat_format):
    """Messages with random roles (gemma: an optional system message, then user and assistant turns) and random
    contents, without special-token text (HF's tokenizer finds it in content, we keep content ordinary text)."""
    def content():
        text = random_text(r, kind) if r.random() < 0.9 else ""
        return text.replace("<|endoftext|>", "").replace(PIECE_MARK, "")
    n = r.randint(1, 6)
    if chat_format == "gemma":
        roles = (["system"] if r.random() < 0.3 else []) + ["user", "assistant"] * n
        roles = roles[:r.randint(2 if roles[0] == "system" else 1, len(roles))]
    else:
        roles = [r.choice(["system", "developer", "user", "assistant"]) for _ in range(n)]
    return [{"role": role, "content": content()} for role in roles]


def chat_ids(tok, messages, **kwargs):
    out = tok.apply_chat_template(messages, tokenize=True, **kwargs)  # transformers 5: a BatchEncoding
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


@pytest.mark.parametrize("kind,chat_format", [("gpt2", "plain"), ("char", "plain"), ("gpt2", "gemma"),
                                              ("o200k_harmony", "harmony")])
def test_chat_template_gives_our_ids(exported, kind, chat_format):
    ours, theirs = exported(kind, chat_format)
    r = random.Random(chat_format)
    fixed = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! What's 2+2?"},
             {"role": "assistant", "content": "4."}, {"role": "user", "content": "\nAnd 3+3?  "}]
    for messages in [fixed] + [random_conversation(r, kind, chat_format) for _ in range(60)]:
        assert chat_ids(theirs, messages, add_generation_prompt=True) == render_prompt(ours, messages, chat_format)
        assert chat_ids(theirs, messages) == render_chat(ours, messages, chat_format)[0]
    if chat_format == "gemma":
        with pytest.raises(Exception, match="right after the system message"):
            theirs.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    with pytest.raises(Exception, match="role tool"):
        theirs.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ----------------------------------------------------------------------------------------------------------------
# export.py end to end


def tiny_run(path, kind, chat_format=None):
    """A from-scratch run's out_dir: a tiny random GPT-2-family model (checkpoint.save) and its meta.json."""
    tok = our_tokenizer(kind)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16,
                          tie_embeddings=False))
    meta = make_meta(tok) | ({"chat_format": chat_format} if chat_format else {})
    checkpoint.save(path, model, {"iter_num": 0}, meta)
    return model.eval(), tok


@pytest.mark.parametrize("kind", ["gpt2", "char"])
def test_export_py_writes_the_tokenizer_of_a_run_from_scratch(tmp_path, kind):
    model, tok = tiny_run(tmp_path / "run", kind, "plain")
    hf_dir = tmp_path / "hf"
    result = run_script("export.py", f"--out_dir={tmp_path / 'run'}", f"--export_dir={hf_dir}", "--dtype=float32")
    assert result.returncode == 0, result.stderr
    assert "tokenizer.json" in result.stdout and "note:" not in result.stdout
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    text = TEXT if kind == "gpt2" else "Hello, world! 中文 😀\n\nTabs\there.\n"
    ids = theirs(text)["input_ids"]
    assert ids == tok.encode(text, allow_special=True) and theirs.decode(ids) == text
    assert theirs.model_max_length == 256
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
        got = hf_model(torch.tensor([ids])).logits
    assert want.shape == got.shape and (want - got).abs().max().item() < 1e-4
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who are you?"}]
    assert chat_ids(theirs, messages, add_generation_prompt=True) == render_prompt(tok, messages, "plain")
    # generation stops at <|endoftext|> (char: nothing; not the 50256 of GPT2Config's defaults)
    assert GenerationConfig.from_pretrained(hf_dir).eos_token_id == tok.eot_token
    assert hf_model.generation_config.eos_token_id == tok.eot_token


def test_export_keeps_copying_a_hugging_face_models_tokenizer(tmp_path):
    """A run that started from a Hugging Face model gets that model's own files; from scratch, ours."""
    model, tok = tiny_run(tmp_path / "run", "gpt2")
    origin = tmp_path / "hf-origin"
    origin.mkdir()
    (origin / "config.json").write_text("{}")
    (origin / "tokenizer.json").write_text('{"theirs": true}')
    export.export_merged(model, make_meta(tok), str(origin), tmp_path / "a", torch.float32, 2**30)
    assert json.loads((tmp_path / "a" / "tokenizer.json").read_text()) == {"theirs": True}
    assert not (tmp_path / "a" / "tokenizer_config.json").exists()
    export.export_merged(model, make_meta(tok), "scratch", tmp_path / "b", torch.float32, 2**30)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
        p.name for p in Path(tmp_path / "b").iterdir())
