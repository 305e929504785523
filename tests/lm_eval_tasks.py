"""Local lm-evaluation-harness tasks for the tests (offline: JSONL the tests write, task YAML beside it), one per
request type: loglikelihood, multiple_choice, generate_until, loglikelihood_rolling. write_tasks(dir) returns the
include_path for lm-eval's TaskManager and the task names."""
import json
import random
from pathlib import Path

WORDS = ("the king and queen of a land far away said that all men must go to sea and bring back gold "
         "silver bread wine love war peace night day sun moon star river stone").split()
TASKS = ("nf_lastword", "nf_choice", "nf_generate", "nf_rolling")


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tasks(root, n_docs=12, seed=0):
    """Four tasks of n_docs documents each under root; returns (include_path, task names)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    docs = {
        "lastword": [{"text": _sentence(rng, rng.randint(4, 14))} for _ in range(n_docs)],
        "choice": [{"question": _sentence(rng, rng.randint(3, 10)) + ":",
                    "choices": [" " + _sentence(rng, rng.randint(1, 6)) for _ in range(4)],
                    "label": rng.randrange(4)} for _ in range(n_docs)],
        "generate": [{"question": _sentence(rng, rng.randint(3, 8)) + " =", "answer": " " + rng.choice(WORDS)}
                     for _ in range(n_docs)],
        "rolling": [{"text": _sentence(rng, rng.randint(20, 60))} for _ in range(n_docs)],
    }
    for name, rows in docs.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def head(task, name):
        return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {root / (name + '.jsonl')}\ntest_split: test\n")
    (root / "nf_lastword.yaml").write_text(head("nf_lastword", "lastword") + """output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' ' + text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (root / "nf_choice.yaml").write_text(head("nf_choice", "choice") + """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (root / "nf_generate.yaml").write_text(head("nf_generate", "generate") + """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    (root / "nf_rolling.yaml").write_text(head("nf_rolling", "rolling") + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return str(root), list(TASKS)
