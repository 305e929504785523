"""eval.py against lm-evaluation-harness's own `hf` backend (transformers) on the same weights, per sample: the
log-likelihoods of a loglikelihood, a multiple-choice and a rolling task within 1e-4 with the same greedy flags, and
identical generate_until outputs; on a random tiny GPT-2 Hugging Face directory and on a model just trained by
train.py (through its export). Local task YAML with JSONL the tests write (tests/lm_eval_tasks.py), offline."""
import json
import os

import pytest
import torch

from conftest import TINY, run_script
from lm_eval_tasks import write_tasks

lm_eval = pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks' data are local JSONL files
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOL = 1e-4


def gpt2_hf_tokenizer(shared_dir):
    """transformers' GPT-2 tokenizer from the BPE files in ../shared (the hf backend needs one beside the model)."""
    from transformers import GPT2Tokenizer
    cache = shared_dir / "tiktoken_cache"
    vocab = json.loads((cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").read_text())  # encoder.json
    lines = (cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").read_text().split("\n")[1:]  # vocab.bpe
    return GPT2Tokenizer(vocab=vocab, merges=[tuple(line.split()) for line in lines if line])


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, shared_dir):
    """A random tiny GPT-2 in Hugging Face layout with its tokenizer; its head spread wide, so greedy tokens
    and the likeliest choices have clear margins."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.3)
    model.save_pretrained(path)
    gpt2_hf_tokenizer(shared_dir).save_pretrained(path)
    return path


def hf_backend(path, tasks):
    include_path, names = tasks
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={path},dtype=float32", tasks=names, device="cpu", batch_size=4,
        task_manager=lm_eval.tasks.TaskManager(include_path=include_path), log_samples=True)


def ours(init_from, tasks, tmp_path, *args):
    """python eval.py as a user runs it; its results and samples as written to --out_dir."""
    include_path, names = tasks
    out = tmp_path / "eval"
    result = run_script("eval.py", f"--init_from={init_from}", f"--tasks={','.join(names)}", "--device=cpu",
                        f"--include_path={include_path}", f"--out_dir={out}", "--log_samples=True", "--batch_size=5",
                        *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nf_choice" in result.stdout and "|" in result.stdout  # lm-eval's table
    results = json.loads((out / "eval_results.json").read_text())
    samples = {t: [json.loads(line) for line in (out / f"eval_samples_{t}.jsonl").read_text().splitlines()]
               for t in names}
    return results, samples


def assert_same_samples(theirs, mine):
    """Every task's samples: loglikelihoods within TOL with equal greedy flags, rolling sums within TOL (relative
    for long texts), generations identical."""
    for task, rows in theirs.items():
        mine_by_doc = {r["doc_id"]: r for r in mine[task]}
        assert len(mine_by_doc) == len(rows) > 0
        for row in rows:
            a, b = row["resps"], mine_by_doc[row["doc_id"]]["resps"]
            assert len(a) == len(b), task
            for x, y in zip(a, b):
                x, y = x[0], y[0]
                if isinstance(x, str):
                    assert x == y, (task, row["doc_id"])
                elif isinstance(x, (list, tuple)):  # (loglikelihood, is_greedy)
                    assert abs(x[0] - y[0]) < TOL and bool(x[1]) == bool(y[1]), (task, row["doc_id"], x, y)
                else:  # a rolling log-likelihood
                    assert abs(x - y) < TOL * max(1.0, abs(x) / 100), (task, row["doc_id"], x, y)


def test_eval_matches_the_hf_backend_on_a_hugging_face_model(tiny_gpt2, tasks, tmp_path):
    theirs = hf_backend(tiny_gpt2, tasks)
    results, samples = ours(tiny_gpt2, tasks, tmp_path)
    assert_same_samples(theirs["samples"], samples)
    assert set(results["results"]) == set(tasks[1])
    generations = [r["resps"][0][0] for r in samples["nf_generate"]]
    assert len(set(generations)) > 1 and all(g and "\n" not in g and "." not in g for g in generations)


def test_eval_matches_the_hf_backend_on_a_model_just_trained(shakespeare_gpt2, tasks, tmp_path):
    """A GPT-2-BPE model trained from scratch by train.py: eval.py on its out_dir, the hf backend on its float32
    export with the tokenizer files export.py writes (a char-level run cannot be the subject: the hf backend needs an
    end-of-text token to condition empty contexts on, and a char vocabulary has none)."""
    out_dir = tmp_path / "run"
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_gpt2}", f"--out_dir={out_dir}", "--max_iters=30",
                        "--lr_decay_iters=30", "--eval_interval=30", "--eval_iters=2")
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "hf"
    result = run_script("export.py", f"--out_dir={out_dir}", f"--export_dir={export}", "--dtype=float32")
    assert result.returncode == 0, result.stderr
    theirs = hf_backend(export, tasks)
    _, samples = ours(out_dir, tasks, tmp_path)
    assert_same_samples(theirs["samples"], samples)


@pytest.mark.parametrize("family", ["gemma3", "gpt_oss"])
def test_eval_matches_the_hf_backend_on_other_families(family, tasks, tmp_path, shared_dir):
    """Gemma 3 (sliding and full layers, MQA) and GPT-OSS (experts, sinks): tiny random transformers models with
    GPT-2's vocabulary and tokenizer (a meta.json beside them names it for us), the choice and generation tasks."""
    from test_sample import hf_model
    path = tmp_path / family
    model = hf_model(family, 50257)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.3)
    model.save_pretrained(path)
    gpt2_hf_tokenizer(shared_dir).save_pretrained(path)
    (path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257}))
    few = (tasks[0], ["nf_choice", "nf_generate"])
    theirs = hf_backend(path, few)
    _, samples = ours(path, few, tmp_path)
    assert_same_samples(theirs["samples"], samples)


def test_eval_of_a_lora_run_matches_the_hf_backend_on_its_merged_export(tiny_gpt2, shakespeare_gpt2, tasks, tmp_path):
    """A LoRA run on the Hugging Face model (adapter-only checkpoints) against the hf backend on its merged float32
    export, which carries the base's tokenizer files."""
    out = tmp_path / "lora"
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_gpt2}", f"--init_from={tiny_gpt2}",
                        f"--out_dir={out}", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=6",
                        "--eval_iters=1", "--model_overrides={'lora_rank': 4, 'lora_targets': 'attn.c_attn,mlp.c_fc'}")
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "merged"
    result = run_script("export.py", f"--out_dir={out}", f"--export_dir={export}", "--dtype=float32")
    assert result.returncode == 0, result.stderr
    few = (tasks[0], ["nf_lastword", "nf_choice"])
    theirs = hf_backend(export, few)
    _, samples = ours(out, few, tmp_path)
    assert_same_samples(theirs["samples"], samples)


def test_eval_quantize_int8_matches_the_hf_backend_on_int8_rounded_weights(tiny_gpt2, tasks, tmp_path, shared_dir):
    """eval.py --quantize=int8 scores as the hf backend does on the same model with every weight matrix rounded
    to int8 by the rule (conftest's int8_rounded), saved as a float Hugging Face model."""
    from transformers import GPT2LMHeadModel
    from conftest import int8_rounded
    rounded = tmp_path / "rounded"
    int8_rounded(GPT2LMHeadModel.from_pretrained(tiny_gpt2)).save_pretrained(rounded)
    gpt2_hf_tokenizer(shared_dir).save_pretrained(rounded)
    theirs = hf_backend(rounded, tasks)
    _, samples = ours(tiny_gpt2, tasks, tmp_path, "--quantize=int8")
    assert_same_samples(theirs["samples"], samples)


def test_eval_errors_are_one_line(tiny_gpt2, tasks, tmp_path):
    for args, message in [(["--tasks=no_such_task"], "unknown lm-eval task"),
                          (["--tasks="], "name the tasks"),
                          (["--tasks=nf_choice", "--init_from=/nonexistent/dir"], "init_from"),
                          (["--tasks=nf_choice", "--device=cuda:7"], "not available"),
                          (["--tasks=nf_choice", "--quantize=int4"], "--quantize")]:
        result = run_script("eval.py", f"--init_from={tiny_gpt2}", f"--include_path={tasks[0]}",
                            f"--out_dir={tmp_path}", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_train_py_runs_eval_tasks_at_the_end(shakespeare_char, tasks, tmp_path):
    """eval_tasks (off by default): lm-eval's tasks on the final model, results in out_dir/eval_results.json.
    It used to hang about one run in six: lm-eval's bootstrap pool (forked) inherited train.py's SIGTERM handler,
    so Pool.terminate() could not end a worker and waited for it forever; a timeout here is that bug back."""
    out = tmp_path / "run"
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--max_iters=20",
                        "--lr_decay_iters=20", "--eval_interval=20", "--eval_iters=2", "--eval_tasks=nf_lastword",
                        f"--eval_include_path={tasks[0]}", "--eval_limit=4", timeout=150,
                        env={"HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert "nf_lastword" in results["results"] and "nf_lastword" in result.stdout
