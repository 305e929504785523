"""export.py --push_to_hub against a local stand-in for the Hugging Face Hub (offline, CPU): the repo and branch it
creates, the one commit of exactly the export's files (stale files of an earlier export deleted), the token it
sends, the model card (README.md) it writes, and one-line errors that leave the export complete.

FakeHub answers the requests huggingface_hub 2.x makes for create_repo, model_info, create_branch and
upload_folder (list the tree, validate README.md's YAML, preupload, commit). Preupload answers "regular" for every
file, so contents come inline (base64) in the commit's NDJSON and no LFS or Xet transfer is needed
(HF_HUB_DISABLE_XET=1: with hf_xet installed upload_folder would take its Xet pipeline)."""
import base64
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
import yaml

import checkpoint
import export
from conftest import TINY, run_script
from test_train import assert_one_line_error

TOKEN = "hf_fake_token_for_tests"
EVAL_RESULTS = {  # eval.py's eval_results.json (lm-eval 0.4's results dict), abridged
    "results": {"nf_lastword": {"name": "nf_lastword", "alias": "nf_lastword", "sample_len": 4,
                                "perplexity,none": 51269.36, "perplexity_stderr,none": 1767.49, "acc,none": 0.25,
                                "acc_stderr,none": 0.25},
                "nf_choice": {"name": "nf_choice", "alias": "nf_choice", "sample_len": 4, "acc,none": 0.5,
                              "acc_stderr,none": "N/A"}},
    "n-shot": {"nf_choice": 0, "nf_lastword": 0},
    "n-samples": {"nf_lastword": {"original": 12, "effective": 4}, "nf_choice": {"original": 12, "effective": 4}},
    "config": {"model": "NanoforgeLM", "limit": 4}}
MERGED_FILES = {"README.md", "config.json", "generation_config.json", "meta.json", "model.safetensors",
                "tokenizer.json", "tokenizer_config.json"}
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}


class FakeHub:
    """The Hub's API on 127.0.0.1: records every request (method, path, query, headers, body) and keeps each
    repo's files per branch. `repos` and `cards` (other models' card data, for model_info) may be preset."""
    ROUTE = re.compile(r"/api/models/([^/]+/[^/]+)(?:/(tree|preupload|commit|branch|revision)/(.+))?")

    def __init__(self):
        self.requests, self.repos, self.cards, self.lock = [], {}, {}, threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

            def do_HEAD(self):
                hub.handle(self, "HEAD")

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def env(self, tmp_path, **extra):
        """The environment of an export.py that talks to this hub (huggingface_hub reads it at import)."""
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                "HF_HOME": str(tmp_path / "hf_home"), "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost", "HF_HUB_DISABLE_TELEMETRY": "1", **extra}

    def add_repo(self, repo_id, files, private=False):
        self.repos[repo_id] = {"private": private, "branches": {"main": dict(files)}}

    def made(self, method, path_start):
        return [r for r in self.requests if r["method"] == method and r["path"].startswith(path_start)]

    # -- the API

    def handle(self, http, method):
        url = urlsplit(http.path)
        body = http.rfile.read(int(http.headers.get("Content-Length") or 0))
        request = dict(method=method, path=unquote(url.path), query=parse_qs(url.query),
                       headers={k.lower(): v for k, v in http.headers.items()}, body=body)
        with self.lock:
            self.requests.append(request)
            if request["headers"].get("authorization") != f"Bearer {TOKEN}":
                status, answer = 401, {"error": "Invalid credentials in Authorization header"}
            else:
                status, answer = self.answer(request)
            request["status"] = status
        data = b"" if method == "HEAD" else json.dumps(answer).encode()
        http.send_response(status)
        http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)

    def answer(self, r):
        path, method = r["path"], r["method"]
        if (method, path) == ("POST", "/api/repos/create"):
            payload = json.loads(r["body"])
            repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                          private=payload.get("visibility") == "private")
            return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if (method, path) == ("POST", "/api/validate-yaml"):  # as the Hub: a license it does not know is an error
            if "license: nope" in json.loads(r["body"])["content"]:
                return 400, {"errors": [{"message": '"license" must be one of [apache-2.0, mit, other, ...]'}]}
            return 200, {"errors": [], "warnings": []}
        match = self.ROUTE.fullmatch(path)
        if not match:
            return 404, {"error": f"no route {method} {path}"}
        repo_id, action, rest = match.groups()
        repo = self.repos.get(repo_id)
        if action is None and method == "GET":
            if repo is not None:
                return 200, {"id": repo_id, "private": repo["private"], "sha": "0" * 40}
            if repo_id in self.cards:
                return 200, {"id": repo_id, "cardData": self.cards[repo_id]}
        if repo is None:
            return 404, {"error": "Repository not found"}
        branches = repo["branches"]
        if action == "branch" and method == "POST":
            if rest in branches:
                return 409, {"error": "Branch already exists"}
            branches[rest] = dict(branches["main"])
            return 200, {}
        if rest not in branches:
            return 404, {"error": "Invalid rev id"}
        files = branches[rest]
        if action == "tree" and method == "GET":
            return 200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                         for p, b in sorted(files.items())]
        if action == "preupload" and method == "POST":
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in json.loads(r["body"])["files"]]}
        if action == "commit" and method == "POST":
            for line in r["body"].decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    del files[item["value"]["path"]]
                elif item["key"] != "header":
                    return 400, {"error": f"unexpected commit operation {item['key']}"}
            oid = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
            return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}
        return 404, {"error": f"no route {method} {path}"}


def call(request):
    """Which API call a recorded request was: create, info, branch, tree, validate, preupload or commit."""
    path = request["path"]
    if path in ("/api/repos/create", "/api/validate-yaml"):
        return path.rsplit("/", 1)[-1].split("-")[0]
    match = FakeHub.ROUTE.fullmatch(path)
    return (match.group(2) or "info") if match else path


def commit_lines(request):
    return [json.loads(line) for line in request["body"].decode().splitlines()]


def front_matter(text):
    """The YAML block at the top of a model card, parsed, and the body after it."""
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, text[:300]
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture
def hub():
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, shakespeare_char):
    """A tiny train.py run (evals at 0, 5 and 10 in history.jsonl) with eval.py's results beside it."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_script("train.py", *TINY, f"--dataset={shakespeare_char}", f"--out_dir={out}", "--max_iters=10",
                        "--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5", "--eval_iters=2",
                        "--log_interval=5")
    assert result.returncode == 0, result.stderr
    (out / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))  # after the checkpoint: this model's
    return out


@pytest.fixture(scope="module")
def lora_run(run, tmp_path_factory):
    """A LoRA fine-tune of a hub model (init_from 'someone/base-model'), built in process from the tiny run: its
    whole weights with random adapters, the tiny run's recipe."""
    model, info, meta = export.load_run(run)
    model.add_lora(lora_rank=4, lora_alpha=8.0, lora_targets="attn.c_attn,mlp.c_fc")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.lora_parameters():
            p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("runs") / "lora"
    info = {k: info[k] for k in ("iter_num", "best_val_loss", "seed", "train_config")}
    checkpoint.save(out, model, {**info, "init_from": "someone/base-model"}, meta)
    return out


# ----------------------------------------------------------------------------------------------------------------
# pushing


@pytest.fixture(scope="module")
def merged_push(run, tmp_path_factory):
    """export.py --push_to_hub=tester/tiny --private=True of the tiny run, merged: (result, hub, export_dir)."""
    hub, tmp = FakeHub(), tmp_path_factory.mktemp("merged")
    result = run_script("export.py", f"--out_dir={run}", f"--export_dir={tmp / 'hf'}", "--push_to_hub=tester/tiny",
                        "--private=True", env=hub.env(tmp))
    hub.close()
    return result, hub, tmp / "hf"


def test_push_merged_model(merged_push):
    result, hub, export_dir = merged_push
    assert result.returncode == 0, result.stderr
    assert f"pushed to {hub.url}/tester/tiny" in result.stdout
    assert {p.name for p in export_dir.iterdir()} == MERGED_FILES
    # the repo, created private; the repo's visibility read back (an existing public repo would be refused)
    (create,) = hub.made("POST", "/api/repos/create")
    assert json.loads(create["body"]) == {"name": "tiny", "organization": "tester", "visibility": "private"}
    assert hub.made("GET", "/api/models/tester/tiny") and hub.repos["tester/tiny"]["private"]
    # one commit on main of exactly the export's files, as they are on disk
    (commit,) = hub.made("POST", "/api/models/tester/tiny/commit/main")
    lines = commit_lines(commit)
    assert lines[0]["key"] == "header" and "nanoforge" in lines[0]["value"]["summary"]
    assert {x["value"]["path"] for x in lines[1:]} == MERGED_FILES and all(x["key"] == "file" for x in lines[1:])
    committed = hub.repos["tester/tiny"]["branches"]["main"]
    assert set(committed) == MERGED_FILES | {".gitattributes"}
    assert all(committed[name] == (export_dir / name).read_bytes() for name in MERGED_FILES)
    # the calls, in order, each with the token and answered; README.md's YAML is checked (twice) before the upload
    assert [call(r) for r in hub.requests] == ["create", "info", "tree", "validate", "validate", "preupload",
                                                 "commit"]
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" and r["status"] == 200 for r in hub.requests)
    assert json.loads(hub.made("POST", "/api/validate-yaml")[0]["body"])["content"] == \
        (export_dir / "README.md").read_text()


def test_model_card_of_a_run_from_scratch(merged_push, run):
    text = (merged_push[2] / "README.md").read_text()
    meta, body = front_matter(text)
    assert meta == {"library_name": "transformers", "license": "other", "pipeline_tag": "text-generation",
                    "tags": ["nanoforge", "gpt2"]}  # no base_model: trained from scratch
    info = checkpoint.read(run)
    assert f"best val loss: **{info['best_val_loss']:.4f}**" in body
    evals = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    last = [r for r in evals if "val_loss" in r and r["iter"] == 10][-1]
    assert f"at iteration 10 (this model): val loss {last['val_loss']:.4f}" in body
    for row in ("| iterations | 10 (max_iters 10) |", "| tokens per iteration | 512 (16 sequences of 32 tokens) |",
                "| learning_rate | `0.01` |", "| dataset | `shakespeare_char` |", "2 layers, 2 heads, 64-dim",
                "Trained from scratch", 'AutoModelForCausalLM.from_pretrained("tester/tiny")'):
        assert row in body, row
    assert "| nf_lastword | perplexity | 51269.3600 | 1767.4900 | 0 | 4 |" in body  # eval.py's results
    assert "| nf_choice | acc | 0.5000 |  | 0 | 4 |" in body
    assert str(run) not in text and "/work" not in text  # no path of the training machine
    card = pytest.importorskip("huggingface_hub").ModelCard.load(merged_push[2] / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["nanoforge", "gpt2"]
    assert card.data.pipeline_tag == "text-generation" and card.text.strip().startswith("# tester/tiny")


def test_push_adapter_to_a_branch_replaces_an_earlier_export(lora_run, hub, tmp_path):
    """An existing public repo with an earlier merged export and a file of the user's: --adapter_only pushes to a
    new branch, whose commit adds the adapter and deletes the merged files (transformers would load those
    instead), keeping the user's file and .gitattributes; main is untouched. The base model's license is
    inherited from its card on the hub."""
    earlier = {".gitattributes": b"x\n", "config.json": b"{}", "model.safetensors": b"old", "README.md": b"old",
               "notes.txt": b"mine"}
    hub.add_repo("tester/tiny-lora", earlier)
    hub.cards["someone/base-model"] = {"license": "apache-2.0", "language": ["en"]}
    export_dir = tmp_path / "adapter"
    result = run_script("export.py", f"--out_dir={lora_run}", f"--export_dir={export_dir}", "--adapter_only=True",
                        "--push_to_hub=tester/tiny-lora", "--revision=dev", "--commit_message=adapter, rank 4",
                        env=hub.env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in export_dir.iterdir()} == ADAPTER_FILES
    # the base's card (its license), then: the repo exists (409), the branch is made from main, one commit on it
    assert [call(r) for r in hub.requests] == ["info", "create", "branch", "tree", "validate", "validate",
                                                 "preupload", "commit"]
    assert hub.requests[0]["path"] == "/api/models/someone/base-model" and hub.requests[1]["status"] == 409
    assert "visibility" not in json.loads(hub.requests[1]["body"])  # the Hub's default
    assert [r["path"] for r in hub.made("POST", "/api/models/tester/tiny-lora/branch/")] == \
        ["/api/models/tester/tiny-lora/branch/dev"]
    (commit,) = hub.made("POST", "/api/models/tester/tiny-lora/commit/")
    assert commit["path"] == "/api/models/tester/tiny-lora/commit/dev"
    lines = commit_lines(commit)
    assert lines[0]["value"]["summary"] == "adapter, rank 4"
    assert sorted((x["key"], x["value"]["path"]) for x in lines[1:]) == [
        ("deletedFile", "config.json"), ("deletedFile", "model.safetensors"), ("file", "README.md"),
        ("file", "adapter_config.json"), ("file", "adapter_model.safetensors")]
    branches = hub.repos["tester/tiny-lora"]["branches"]
    assert branches["main"] == earlier
    assert set(branches["dev"]) == ADAPTER_FILES | {".gitattributes", "notes.txt"}
    assert branches["dev"]["README.md"] == (export_dir / "README.md").read_bytes()
    # the card: PEFT, on the hub model the run started from, under its license
    meta, body = front_matter((export_dir / "README.md").read_text())
    assert meta == {"base_model": "someone/base-model", "library_name": "peft", "license": "apache-2.0",
                    "pipeline_tag": "text-generation", "tags": ["nanoforge", "gpt2", "lora"]}
    assert "LoRA rank 4, alpha 8, on `attn.c_attn,mlp.c_fc`" in body
    assert 'AutoModelForCausalLM.from_pretrained("someone/base-model")' in body
    assert 'PeftModel.from_pretrained(base, "tester/tiny-lora")' in body
    config = json.loads((export_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "someone/base-model"
    card = pytest.importorskip("huggingface_hub").ModelCard.load(export_dir / "README.md")
    assert card.data.base_model == "someone/base-model" and card.data.license == "apache-2.0"


# ----------------------------------------------------------------------------------------------------------------
# failures: one line, exit 2, and the export complete (after the work) or not started (before it)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_push_fails_in_one_line_and_keeps_the_export(lora_run, tmp_path):
    """The Hub unreachable (HF_ENDPOINT on a closed port): one line, exit 2, and the export complete and loadable.
    Its card (a merged fine-tune of a hub model): base_model is that model, --license wins over the base's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    export_dir = tmp_path / "hf"
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home"), "NO_PROXY": "127.0.0.1",
           "no_proxy": "127.0.0.1"}
    result = run_script("export.py", f"--out_dir={lora_run}", f"--export_dir={export_dir}", "--dtype=float32",
                        "--push_to_hub=tester/tiny", "--license=mit", env=env)
    assert_one_line_error(result, "could not reach the Hugging Face Hub", "check the network",
                          f"the export in {export_dir} is complete", f"hf upload tester/tiny {export_dir}")
    assert result.returncode == 2
    assert {p.name for p in export_dir.iterdir()} == MERGED_FILES
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    ours, _ = checkpoint.load_model(lora_run)  # the adapters unmerged: the same function
    idx = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (model(idx).logits - ours(idx)[0]).abs().max().item() < 1e-4
    assert AutoTokenizer.from_pretrained(export_dir)("abc")["input_ids"]
    meta, body = front_matter((export_dir / "README.md").read_text())
    assert meta == {"base_model": "someone/base-model", "library_name": "transformers", "license": "mit",
                    "pipeline_tag": "text-generation", "tags": ["nanoforge", "gpt2", "lora"]}
    assert "Fine-tuned from [someone/base-model](https://huggingface.co/someone/base-model)" in body
    assert "LoRA rank 4, alpha 8, on `attn.c_attn,mlp.c_fc`, merged into the weights" in body
    assert "nf_lastword" not in body  # this run has no eval_results.json


def test_bad_repo_id_fails_before_any_export_work(run, tmp_path):
    export_dir = tmp_path / "hf"
    result = run_script("export.py", f"--out_dir={run}", f"--export_dir={export_dir}",
                        "--push_to_hub=not a repo id!", env={"HF_TOKEN": TOKEN})
    assert_one_line_error(result, "--push_to_hub='not a repo id!' is not a Hugging Face repo id", "your-name/")
    assert result.returncode == 2 and not export_dir.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["no_token", "offline_flag", "empty_revision", "nested_id"])
def test_push_settings_are_checked_first(case, run, tmp_path, monkeypatch, capsys):
    """The same checks in process (no interpreter start): each one line, exit 2, nothing written."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)  # other test modules set it for their own work
    args = [f"--out_dir={run}", f"--export_dir={tmp_path / 'hf'}", "--push_to_hub=tester/tiny"]
    if case == "no_token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
        monkeypatch.setattr(hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    elif case == "offline_flag":
        monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    elif case == "empty_revision":
        args.append("--revision=")
    else:
        args[-1] = "--push_to_hub=a/b/c"
    with pytest.raises(SystemExit) as exit_:
        export.main(args)
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    needle = {"no_token": "set HF_TOKEN or run `hf auth login`", "offline_flag": "HF_HUB_OFFLINE",
              "empty_revision": "--revision", "nested_id": "not a Hugging Face repo id"}[case]
    assert needle in lines[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["bad_token", "public_repo", "bad_license"])
def test_refused_uploads_name_the_fix(case, hub, tmp_path, monkeypatch):
    """push_to_hub in process against the stand-in: a token the Hub rejects (401), --private=True on an existing
    public repo, a card whose license the Hub does not know: each raises, and push_failure makes one line naming
    the fix; nothing is committed."""
    hf_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hf_hub.constants, "HF_HUB_OFFLINE", False)  # other test modules set it for their own work
    monkeypatch.setattr(hf_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("HF_TOKEN", "hf_revoked" if case == "bad_token" else TOKEN)
    hub.add_repo("tester/public", {".gitattributes": b""})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("---\nlicense: nope\n---\n# card\n")
    files = ["config.json"] + (["README.md"] if case == "bad_license" else [])
    with pytest.raises(Exception) as error:
        export.push_to_hub(tmp_path, files, "tester/public", private=case == "public_repo")
    message = export.push_failure(error.value, "tester/public")
    if case == "bad_token":
        assert message.startswith("the Hub did not accept the token (401") and "HF_TOKEN" in message
    elif case == "public_repo":
        assert "tester/public exists and is public" in message and "--private=True" in message
    else:
        assert '"license" must be one of' in message and "--license" in message
    assert "\n" not in message and not hub.made("POST", "/api/models/tester/public/commit")
    assert hub.repos["tester/public"]["branches"]["main"] == {".gitattributes": b""}
