"""
Evaluate a model with EleutherAI's lm-evaluation-harness, in this process: zero- and few-shot benchmarks of a
train.py out_dir (LoRA runs with adapter-only checkpoints too) or a Hugging Face directory or hub id.

$ python eval.py --init_from=out-shakespeare-char --tasks=lambada_openai --limit=200
$ python eval.py --init_from=gpt2 --tasks=hellaswag,arc_easy,lambada_openai --batch_size=32
$ python eval.py --init_from=out --tasks=my_task --include_path=path/to/task/yamls   # local task YAML

Prints lm-eval's results table and writes the results JSON to out_dir/eval_results.json (out_dir: the evaluated
run's, or --out_dir); --log_samples=True also writes every sample to out_dir/eval_samples_<task>.jsonl.
lm-eval is an optional dependency: pip install -r requirements-eval.txt. Tasks download their datasets from the
Hugging Face Hub the first time.

How: NanoforgeLM, an lm_eval TemplateLM on the engine. loglikelihood: engine.score (requests that share a context
share one pass over it, the head runs only where a continuation token is predicted, rows batched by length), with
the left truncation lm-eval's hf backend applies; loglikelihood_rolling: lm-eval's disjoint windows of block_size
tokens, scored the same way; generate_until: engine.generate_stream, greedy unless the task samples, cut at the
task's stop strings.
"""
import json
import os
import sys
import time

import torch

import checkpoint
import devices
import engine
from tokenizer import TokenizerError, load_tokenizer, render_prompt

DEFAULTS = dict(
    init_from='out',        # an out_dir of train.py, or a Hugging Face directory or hub id
    tasks='',               # comma-separated lm-eval task names (or groups)
    out_dir='',             # where eval_results.json goes; '' = init_from when it is an out_dir, else out-eval
    limit=0.0,              # examples per task: 0 = all, < 1 a fraction, else a count
    num_fewshot=-1,         # -1: each task's own default
    batch_size=16,          # rows per forward (requests sharing a context pack into one row)
    device='auto',
    dtype='auto',
    quantize='',            # 'int8': weight-only int8 (CPU), to score what sample.py / serve.py --quantize=int8 serve
    include_path='',        # a folder of task YAML files
    tokenizer='',           # override the checkpoint's tokenizer (e.g. gpt2 for a Hugging Face gemma3-compact)
    apply_chat_template=False,  # prompts in the model's chat format (its meta.json chat_format)
    log_samples=False,      # also write each task's samples (JSONL)
    seed=1234,
)


class EvalError(Exception):
    """A setting or environment that makes the evaluation impossible; one line naming the fix."""


def import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError("eval.py needs lm-evaluation-harness: pip install -r requirements-eval.txt") from None
    from lm_eval.api.model import TemplateLM
    return TemplateLM


def make_lm_class():
    """NanoforgeLM, defined once lm-eval is importable (it is an optional dependency)."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    TemplateLM = import_lm_eval()

    class NanoforgeLM(TemplateLM):
        def __init__(self, model, tok, batch_size=16, chat_format=None):
            super().__init__()
            self.model, self.tok, self.batch_size, self.chat_format = model, tok, batch_size, chat_format
            self.max_length = model.config.block_size

        @property
        def eot_token_id(self):
            return self.tok.eot_token

        @property
        def prefix_token_id(self):  # what an empty context is conditioned on: <|endoftext|>, or a newline (char)
            return self.tok.eot_token if self.tok.eot_token is not None else self.tok.encode("\n")[0]

        @property
        def tokenizer_name(self):
            return self.tok.name

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.tok.encode(string, allow_special=self.tok.name != "char")

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            if not self.chat_format:
                raise EvalError("--apply_chat_template=True needs a model with a chat format (its meta.json "
                                "chat_format, from data/chat/prepare.py)")
            return self.tok.decode(render_prompt(self.tok, chat_history, self.chat_format))

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            """(sum of log-probabilities, all greedy) per ((context, continuation), context ids, continuation
            ids); too long inputs lose their oldest tokens, as lm-eval's hf backend cuts them."""
            pairs = []
            for _, context, continuation in requests:
                whole = (context + continuation)[-(self.max_length + 1):]
                if len(continuation) >= len(whole):
                    raise EvalError(f"a continuation of {len(continuation)} tokens leaves no room for context in "
                                    f"the model's {self.max_length}-token block")
                pairs.append((whole[:len(whole) - len(continuation)], continuation))
            scored = engine.score(self.model, pairs, batch_rows=self.batch_size)
            return [(sum(s.logprobs), all(s.greedy)) for s in scored]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """Each text's log-likelihood over disjoint windows of block_size tokens, as lm-eval's hf backend."""
            windows, owners = [], []
            for i, request in enumerate(requests):
                tokens = self.tok_encode(request.args[0])
                for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                        context_len=1)):
                    windows.append((None, list(context), list(continuation)))
                    owners.append(i)
            totals = [0.0] * len(requests)
            for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
                totals[i] += logprob
            return totals

        def generate_until(self, requests, disable_tqdm=False):
            """Greedy (or sampled, if the task asks) continuations, cut before the first stop string; requests
            with the same settings decode as one batch."""
            eos = self.tok.decode([self.tok.eot_token]) if self.tok.eot_token is not None else None
            groups = {}
            for i, request in enumerate(requests):
                context, gen_kwargs = request.args
                kwargs = normalize_gen_kwargs(gen_kwargs, 256)  # do_sample False: temperature 0, greedy
                until = tuple(handle_stop_sequences(kwargs.get("until"), eos=eos))
                settings = (until, kwargs["max_gen_toks"], float(kwargs["temperature"]), kwargs.get("top_k"),
                            kwargs.get("top_p"))
                groups.setdefault(settings, []).append((i, context))
            out = [None] * len(requests)
            for (until, max_gen, temperature, top_k, top_p), items in groups.items():
                for start in range(0, len(items), self.batch_size):
                    batch = items[start:start + self.batch_size]
                    texts = self._generate([c for _, c in batch], until, max_gen, temperature, top_k, top_p)
                    for (i, _), text in zip(batch, texts):
                        out[i] = text
            return out

        def _generate(self, contexts, until, max_gen, temperature, top_k, top_p):
            keep = self.max_length - max_gen
            if keep <= 0:
                raise EvalError(f"the task asks for {max_gen} new tokens, as many as the model's block_size")
            prompts = [(self.tok_encode(c) or [self.prefix_token_id])[-keep:] for c in contexts]
            streams = [engine.TextStream(self.tok.decode, until) for _ in prompts]
            texts, done = [""] * len(prompts), [False] * len(prompts)
            stop = [self.tok.eot_token] if self.tok.eot_token is not None else []
            steps = engine.generate_stream(self.model, prompts, max_gen, temperature, top_k, top_p, stop)
            for tokens in steps:
                for row, token in enumerate(tokens):
                    if done[row] or token is None or token in stop:
                        done[row] = True
                        continue
                    piece, done[row] = streams[row].push(token)
                    texts[row] += piece
                if all(done):
                    steps.close()
                    break
            return [t if d else t + s.flush() for t, s, d in zip(texts, streams, done)]

    return NanoforgeLM


def load(init_from, device, dtype, tokenizer=None, quantize=''):
    """(model, tokenizer, meta) for evaluation; a LoRA run's adapters are folded into its weights."""
    model, meta = checkpoint.load_for_inference(init_from, device, dtype, tokenizer or None, quantize)
    return model, load_tokenizer(meta), meta


def check_tasks(tasks, include_path=''):
    """lm-eval's TaskManager, once every task name is known to it (else EvalError naming the unknown ones)."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager
    if include_path and not os.path.isdir(include_path):
        raise EvalError(f"include_path {include_path!r} is not a folder of task YAML files")
    task_manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm_eval ls tasks`, or give "
                        f"include_path=DIR for your own task YAML")
    return task_manager


def evaluate(model, tok, meta, tasks, limit=0.0, num_fewshot=-1, batch_size=16, include_path='',
             apply_chat_template=False, log_samples=False, seed=1234):
    """lm-eval's results dict for `tasks` (a list of names) on a loaded model."""
    NanoforgeLM = make_lm_class()
    import lm_eval
    task_manager = check_tasks(tasks, include_path)
    lm = NanoforgeLM(model.eval(), tok, batch_size, meta.get('chat_format') if apply_chat_template else None)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=None if num_fewshot < 0 else num_fewshot,
        limit=None if not limit else (int(limit) if limit >= 1 else limit), task_manager=task_manager,
        log_samples=log_samples, apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)


def write_results(results, out_dir, log_samples=False):
    """eval_results.json (and eval_samples_<task>.jsonl) in out_dir, each written whole and renamed into place."""
    from lm_eval.utils import handle_non_serializable
    os.makedirs(out_dir, exist_ok=True)
    samples = results.pop('samples', None) or {}
    files = {'eval_results.json': json.dumps(results, indent=2, default=handle_non_serializable) + '\n'}
    if log_samples:
        for task, rows in samples.items():
            files[f'eval_samples_{task}.jsonl'] = ''.join(json.dumps(r, default=handle_non_serializable) + '\n'
                                                         for r in rows)
    for name, text in files.items():
        checkpoint.write_text_atomic(os.path.join(out_dir, name), text)
    return [os.path.join(out_dir, name) for name in files]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    from configurator import apply_overrides
    args = apply_overrides(dict(DEFAULTS), argv)
    tasks = [t.strip() for t in args['tasks'].split(',') if t.strip()]
    if not tasks:
        fail("name the tasks to run: --tasks=hellaswag,arc_easy,lambada_openai (lm_eval ls tasks lists them)")
    if args['limit'] < 0 or args['batch_size'] < 1:
        fail("--limit must be >= 0 and --batch_size >= 1")
    try:
        import_lm_eval()
        device, dtype = devices.resolve(args['device'], args['dtype'])
        if checkpoint.quantize_error(args['quantize'], device):
            fail(checkpoint.quantize_error(args['quantize'], device))
        torch.manual_seed(args['seed'])
        model, tok, meta = load(args['init_from'], device, dtype, args['tokenizer'], args['quantize'])
        t0 = time.time()
        results = evaluate(model, tok, meta, tasks, args['limit'], args['num_fewshot'], args['batch_size'],
                           args['include_path'], args['apply_chat_template'], args['log_samples'], args['seed'])
    except (EvalError, devices.DeviceError, checkpoint.CheckpointError, TokenizerError) as e:
        fail(str(e))
    except (OSError, ValueError) as e:  # Hugging Face loading: a missing directory, an unsupported config
        fail(f"init_from={args['init_from']!r}: {e}")
    from lm_eval.utils import make_table
    print(make_table(results))
    if 'groups' in results:
        print(make_table(results, 'groups'))
    out_dir = args['out_dir'] or (args['init_from'] if checkpoint.find(args['init_from']) else 'out-eval')
    written = write_results(results, out_dir, args['log_samples'])
    print(f"{len(tasks)} task(s) in {time.time() - t0:.1f}s on {device}; wrote {', '.join(written)}")


if __name__ == '__main__':
    main(sys.argv[1:])
