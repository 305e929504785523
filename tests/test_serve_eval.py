"""lm-evaluation-harness through serve.py: lm-eval's `local-completions` (loglikelihood, multiple choice, rolling
log-likelihood and generation, with lm-eval's remote tokenizer reading /tokenizer_info, /tokenize and
/detokenize) gives the same per-sample results as lm-eval's own `hf` backend on the same tiny random GPT-2 (a
Hugging Face directory with a transformers tokenizer that both load); `local-chat-completions` with a chat
template generates what the model's own greedy generator gives for the chat-rendered prompt.

Offline: the tasks are local YAML over JSONL the tests write (tests/lm_eval_tasks.py).
"""
import json
import os

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -r requirements-eval.txt")
pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")
os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"

import lm_eval  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lm_eval_tasks import write_tasks  # noqa: E402
from test_serve import ENC, SHARED, Server, chat_ids, greedy_reference, make_checkpoint  # noqa: E402

BLOCK = 128
ENCODER_JSON = SHARED / "tiktoken_cache" / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"  # GPT-2's vocabulary
VOCAB_BPE = SHARED / "tiktoken_cache" / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"  # its merges (tiktoken's cache)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GPT-2 in Hugging Face layout, with the GPT-2 tokenizer in transformers' files beside it (lm-eval's
    hf backend needs them; serve.py reads the model's family and uses tiktoken's GPT-2)."""
    import transformers
    path = make_checkpoint(tmp_path_factory.mktemp("eval") / "tiny-gpt2", block_size=BLOCK)
    lines = VOCAB_BPE.read_text(encoding="utf-8").split("\n")
    tokenizer = transformers.GPT2Tokenizer(vocab=json.loads(ENCODER_JSON.read_text(encoding="utf-8")),
                                           merges=[tuple(line.split()) for line in lines[1:] if line])
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(f"--init_from={model_dir}", "--model_name=tiny",
               f"--trace_file={tmp_path_factory.mktemp('trace') / 'trace.jsonl'}")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def evaluate(tasks, model, model_args, names=None, **kwargs):
    """lm-eval's per-sample records, {task: [sample, ...] by doc_id}."""
    include_path, all_names = tasks
    result = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names or all_names,
                                     task_manager=TaskManager(include_path=include_path), log_samples=True, **kwargs)
    return {task: sorted(samples, key=lambda s: s["doc_id"]) for task, samples in result["samples"].items()}


@pytest.fixture(scope="module")
def hf_samples(model_dir, tasks):
    return evaluate(tasks, "hf", f"pretrained={model_dir},dtype=float32", device="cpu", batch_size=4)


def test_local_completions_match_the_hf_backend(server, tasks, hf_samples):
    """Every task kind through serve.py, batches of 8 token-id prompts a request, lm-eval's tokenizer the server's:
    log-likelihoods within 1e-4, the same is_greedy flags, the same generated text."""
    args = (f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
            f"num_concurrent=1,max_retries=1,max_length={BLOCK}")
    served = evaluate(tasks, "local-completions", args, batch_size=8)
    assert set(served) == set(hf_samples) == set(tasks[1])
    for task, samples in hf_samples.items():
        assert len(served[task]) == len(samples) == 12, task
        for ours, theirs in zip(served[task], samples):
            for a, b in zip(ours["resps"], theirs["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(b, str):  # generate_until
                    assert a == b, (task, ours["doc_id"])
                elif isinstance(b, (int, float)):  # loglikelihood_rolling
                    assert a == pytest.approx(b, abs=1e-4), (task, ours["doc_id"])
                else:  # loglikelihood: (log-likelihood, is_greedy)
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1], (task, ours["doc_id"])


def test_lm_eval_reads_greedy_continuations_as_greedy(server, model_dir):
    """lm-eval's loglikelihood payload, parsed by lm-eval itself: a continuation the model would write greedily is
    is_greedy, another is not; the log-likelihood is the sum of the continuation's logprobs."""
    import httpx
    greedy = greedy_reference(model_dir)
    context = ENC.encode("The king and queen said")
    own = greedy(context, 3)
    other = [t + 1 for t in own]
    body = {"model": "tiny", "prompt": [context + own, context + other], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (ll_own, greedy_own), (ll_other, greedy_other) = LocalCompletionsAPI.parse_logprobs(
        r.json(), ctxlens=[len(context)] * 2)
    assert greedy_own and not greedy_other and ll_own > ll_other
    token_logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert ll_own == pytest.approx(sum(token_logprobs[len(context):len(context) + 3]))
    # tokenizer_backend=auto finds the remote tokenizer (/tokenizer_info, /tokenize)
    from lm_eval.utils import check_remote_tokenizer_support
    assert check_remote_tokenizer_support(f"{server.url}/v1/completions")


def test_local_chat_completions_with_a_chat_template(server, tasks, model_dir):
    """local-chat-completions needs no tokenizer (lm-eval sends the messages; the server renders them in the model's
    chat format): each answer is the model's greedy text for the rendered prompt, cut at the task's stop strings."""
    greedy = greedy_reference(model_dir)
    args = f"model=tiny,base_url={server.url}/v1/chat/completions,num_concurrent=1,max_retries=1"
    samples = evaluate(tasks, "local-chat-completions", args, names=["nf_generate"], apply_chat_template=True)
    assert len(samples["nf_generate"]) == 12 and any(sample["resps"][0][0] for sample in samples["nf_generate"])
    for sample in samples["nf_generate"]:
        chat, gen_kwargs = sample["arguments"][0]
        messages = json.loads(chat[0])  # lm-eval's JsonChatStr, logged as a 1-tuple
        assert messages[-1]["role"] == "user"
        text = ENC.decode(greedy(chat_ids(messages), gen_kwargs["max_gen_toks"]))
        for stop in gen_kwargs["until"]:
            text = text.split(stop)[0]
        assert sample["resps"] == [[text]], sample["doc_id"]
