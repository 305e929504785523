"""
Checkpoints that survive crashes, load_model() for sample.py / serve.py, and init_model() for train.py.

A checkpoint is a directory, written whole and then swapped in with renames:

    out_dir/
        ckpt/                  the latest complete checkpoint
            model.safetensors  the weights (safetensors: tied weights stored once); a LoRA run's adapters only
                               when config.json has "base"
            config.json        {"format": "nanoforge", "model_config": GPTConfig dict, "iter_num",
                               "best_val_loss", "seed", "init_from", "train_config", "files": {name: bytes},
                               and for adapter-only checkpoints "base": {"init_from", "dtype", "overrides",
                               "fingerprint"}: where the frozen weights come from (load_base)}
            meta.json          the dataset's meta.json: which tokenizer (schema: tokenizer.py)
            train_state.pt     optimizer(s) and grad-scaler state: tensors and plain values only,
                               read back with torch.load(weights_only=True)
        ckpt.tmp/              a save in progress; never read
        ckpt.old/              the previous checkpoint, only between the two renames of a save
        config.json, model.safetensors, meta.json    hard links to ckpt/'s files, so out_dir reads
                               as a model folder too (each replaced atomically; a copy where links fail)
        history.jsonl, loss.png    train.py's log (a JSON object per log line and eval) and loss curve

save(): write every file into ckpt.tmp/ and fsync it, fsync the directory, rename ckpt -> ckpt.old,
rename ckpt.tmp -> ckpt, fsync out_dir, delete ckpt.old. At every instant ckpt/ or ckpt.old/ is a
complete checkpoint, so kill -9 anywhere, also mid-save, leaves one to load: find() takes ckpt/, and
ckpt.old/ when a crash fell between the renames. The data stream and the dropout RNG of train.py are
functions of (seed, iter_num), so those two numbers in config.json are the whole RNG and data state.

A LoRA run's base never changes, so its checkpoints hold only the adapters and name the base (the Hugging Face
model or out_dir the run started from); build_model() reloads it and checks a fingerprint of its weights, so a
base that was retrained or replaced since is an error, not a silently different model.

config.json records every file's size, so a truncated file is caught before use; errors are raised as
CheckpointError with one line naming the file.

Sharded checkpoints (train.py with parallel='fsdp', save_sharded): ckpt/ holds config.json (with "sharded") and
meta.json as above, and instead of model.safetensors and train_state.pt a folder state/ that
torch.distributed.checkpoint (DCP) writes, each process its own file of its shards of the weights
("model.<name>") and of the AdamW state ("optim.<name>.exp_avg", ...), keyed by parameter name. DCP's default
FileSystemWriter would keep the index in a pickle (.metadata, read back with pickle.load); its Hugging Face
storage writer writes safetensors files whose JSON headers say where each shard sits in its tensor, so loading
unpickles nothing, as for every other file here. The save is the same swap: every process writes into
ckpt.tmp/state/ and fsyncs; after a barrier rank 0 writes meta.json and config.json (the commit: it lists every
file and its size) and renames. DCP reads any number of shards into any other sharding (resume on more or fewer
processes) or into whole tensors on one process without a process group (load_model, export, eval; a DDP run
resuming an FSDP checkpoint), and an FSDP run resumes a DDP checkpoint (load_optimizers).
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model as load_safetensors_into, save_file, save_model as save_safetensors

from model import GPT, GPTConfig
from tokenizer import read_meta

FORMAT = "nanoforge"
CKPT, TMP, OLD = "ckpt", "ckpt.tmp", "ckpt.old"
CONFIG, WEIGHTS, META, TRAIN_STATE = "config.json", "model.safetensors", "meta.json", "train_state.pt"
STATE = "state"  # a sharded checkpoint's folder of DCP safetensors files
PUBLISHED = (CONFIG, WEIGHTS, META)  # what out_dir itself shows


class CheckpointError(Exception):
    """A missing, corrupt or mismatched checkpoint; the message is one line that names the file."""


# ----------------------------------------------------------------------------------------------------------------
# writing


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the renames are still atomic
        pass
    finally:
        os.close(fd)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_text_atomic(path, text):
    """Replace a file at once: write a new temp file beside it (mkstemp: never an existing file or a link left at
    that name), fsync, rename over it (history, results, links)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(out_dir, model, info, meta, train_state=None):
    """Write a checkpoint of `model` (the raw GPT, not a compiled or DDP wrapper) into out_dir/ckpt; a failed write
    (a full disk) raises CheckpointError and leaves the previous checkpoint as it was.

    info: JSON-able metadata (iter_num, best_val_loss, train_config, ...); meta: the dataset's meta.json;
    train_state: optimizer/scaler state dicts (tensors and plain values), or None for weights only."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / TMP
    shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
    try:
        cur = _save(out, model, info, meta, train_state)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch.save raises RuntimeError, safetensors
        shutil.rmtree(tmp, ignore_errors=True)  # its own; the previous checkpoint is untouched, free what this took
        raise CheckpointError(f"could not write a checkpoint to {out} ({_why(e, out)})") from e
    try:
        _publish(out, cur)
    except OSError as e:
        raise CheckpointError(f"saved {cur}, but could not update the links to it in {out} ({_why(e, out)})") from e
    return cur


def _why(error, out):
    """The error in one line, with the free space: torch.save's message for a full disk does not say so."""
    try:
        free = f"{shutil.disk_usage(out).free / 1e6:.1f} MB free; "
    except OSError:  # a lost mount
        free = ""
    return f"{free}{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _save(out, model, info, meta, train_state):
    tmp = out / TMP
    tmp.mkdir()
    if info.get("base"):  # adapter-only: the frozen weights are the base's (see load_base)
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "lora" in n}, tmp / WEIGHTS)
    else:
        save_safetensors(model, str(tmp / WEIGHTS))
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    return _commit(out, model.config, info, meta)


def _commit(out, model_config, info, meta):
    """ckpt.tmp/ holds the new checkpoint's files: add meta.json, fsync them all, write config.json (the list of
    files and their sizes), fsync, and swap ckpt.tmp/ in for ckpt/."""
    tmp, cur, old = out / TMP, out / CKPT, out / OLD
    _write_json(tmp / META, meta)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in files:
        _fsync(tmp / name)
    for folder in sorted({(tmp / name).parent for name in files} - {tmp}):
        _fsync(folder)
    config = {"format": FORMAT, "model_config": model_config.to_dict(), **info,
              "files": {name: (tmp / name).stat().st_size for name in files}}
    _write_json(tmp / CONFIG, config)
    _fsync(tmp / CONFIG)
    _fsync(tmp)
    # the swap: from here on ckpt/ or ckpt.old/ is always a complete checkpoint
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(cur, old)
    os.rename(tmp, cur)
    _fsync(out)
    shutil.rmtree(old, ignore_errors=True)
    return cur


def _publish(out, cur):
    """out_dir/{config.json, model.safetensors, meta.json}: hard links to the new checkpoint's files (a sharded
    checkpoint has no model.safetensors: an earlier one's link goes)."""
    for name in PUBLISHED:
        if not (cur / name).is_file():
            (out / name).unlink(missing_ok=True)
            continue
        tmp = out / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(cur / name, tmp)
            except OSError:  # a filesystem without hard links: copy instead
                shutil.copyfile(cur / name, tmp)
                _fsync(tmp)
            os.replace(tmp, out / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
    _fsync(out)


# ----------------------------------------------------------------------------------------------------------------
# reading


def _is_ours(directory):
    try:
        with open(directory / CONFIG, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out_dir):
    """Raise CheckpointError unless out_dir is free for a training run: missing, empty, or holding what train.py
    writes (a checkpoint, history, plot). A prepared dataset or another tool's model folder (an export, a Hugging
    Face download) is refused: the run's published config.json / model.safetensors / meta.json would replace theirs."""
    path = Path(out_dir)
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"out_dir {out_dir} is a file: give a folder for the run")
    if find(path) is not None:
        return
    theirs = [name for name in ("train.bin", "val.bin", CONFIG, WEIGHTS, META, "model.safetensors.index.json")
              if (path / name).exists()]
    if theirs:
        raise CheckpointError(f"out_dir {out_dir} holds {', '.join(theirs)}, not a train.py run (a dataset or an "
                              f"exported model): give the run a folder of its own")


def find(path):
    """The checkpoint directory for `path` (an out_dir, or a checkpoint directory itself), or None."""
    path = Path(path)
    for candidate in (path / CKPT, path / OLD):
        if candidate.is_dir():
            return candidate
    if (path / CONFIG).is_file() and ((path / WEIGHTS).is_file() or (path / STATE).is_dir()) and _is_ours(path):
        return path
    return None


def read(path):
    """The checkpoint's config.json as a dict (plus "dir"), after checking that every file is whole."""
    ckpt = find(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {path} (expected {Path(path) / CKPT / CONFIG}): "
                              f"train one first, or check out_dir")
    config_path = ckpt / CONFIG
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path} is corrupt or truncated ({e}): restore it or retrain") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "model_config" not in info:
        raise CheckpointError(f"{config_path} is not a nanoforge checkpoint config")
    _check_info(info, config_path)
    for name, size in info.get("files", {}).items():
        file = ckpt / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} is truncated or corrupt ({file.stat().st_size} bytes, config.json "
                                  f"says {size}): restore it or retrain")
    info["dir"] = str(ckpt)
    return info


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# config.json's fields that train.py, sample.py and export.py read: (check, what it must be); "base" and "sharded"
# only in some checkpoints. A hand-edited file with a field of the wrong type is one error naming the field.
_INFO_FIELDS = {
    "model_config": (lambda v: isinstance(v, dict), "an object of GPTConfig fields"),
    "files": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and k and _is_int(n) and n >= 0
                                                     for k, n in v.items()), "an object {file name: size in bytes}"),
    "iter_num": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "best_val_loss": (lambda v: v is None or _is_number(v), "a finite number or null"),
    "seed": (_is_int, "an integer"),
    "init_from": (lambda v: isinstance(v, str), "a string"),
    "train_config": (lambda v: isinstance(v, dict), "an object"),
    "base": (lambda v: isinstance(v, dict) and isinstance(v.get("init_from"), str)
             and v.get("dtype") in ("float32", "bfloat16", "float16") and isinstance(v.get("overrides", {}), dict)
             and isinstance(v.get("fingerprint"), dict)
             and all(isinstance(x, (int, float)) for x in v["fingerprint"].values()),
             "an object with init_from, dtype, overrides and fingerprint"),
    "sharded": (lambda v: isinstance(v, dict) and isinstance(v.get("optimizer_groups", []), list),
                "an object"),
}


def _check_info(info, config_path):
    """The fields of a config.json that parsed as JSON: each of the type the code reads it as."""
    for name, (ok, what) in _INFO_FIELDS.items():
        if name in info and not ok(info[name]):
            raise CheckpointError(f"{config_path}: {name!r} must be {what}, got {_short(info[name])}: the file was "
                                  f"edited or damaged; restore it or retrain")
    types = {f.name: f.type for f in fields(GPTConfig)}
    for key, value in info["model_config"].items():
        kind = types.get(key)
        if kind is None:
            continue  # model_config() names unknown fields
        good = _is_int(value) or isinstance(value, float) if kind is float else \
            _is_int(value) if kind is int else isinstance(value, kind)
        if not good:
            raise CheckpointError(f"{config_path}: model_config.{key} must be {kind.__name__}, got {_short(value)}: "
                                  f"the file was edited or damaged; restore it or retrain")


def _short(value):
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def model_config(info, **overrides):
    try:
        return GPTConfig.from_dict({**info["model_config"], **overrides})
    except (ValueError, TypeError, AssertionError, ZeroDivisionError) as e:
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{Path(info['dir']) / CONFIG}: bad model_config ({detail})") from None


def load_weights(model, info, device="cpu"):
    """Load model.safetensors (or a sharded checkpoint's weights) into `model`, built from model_config(info)."""
    if is_sharded(info):
        return load_sharded_weights(model, info)
    path = Path(info["dir"]) / WEIGHTS
    try:
        load_safetensors_into(model, str(path), strict=True, device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None
    except RuntimeError as e:  # missing/unexpected keys or shapes: the weights do not fit config.json
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path} does not match the architecture in {CONFIG}: {detail}") from None
    return model


def load_meta(info):
    path = Path(info["dir"]) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is missing or corrupt ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object: restore it or retrain")
    return meta


def check_same_tokenizer(ckpt_meta, meta, ckpt_where, dataset, fix):
    """The one tokenizer comparison of a checkpoint and a dataset (resume, init_from=<out_dir>): by content, the
    tiktoken encoding's name (which fixes its merges) and, for 'char', the exact characters, and vocab_size. A
    mismatch raises CheckpointError naming both."""
    def describe(m):
        return f"tokenizer {m.get('tokenizer')!r} ({m.get('vocab_size')} tokens)"
    if (ckpt_meta.get("tokenizer"), ckpt_meta.get("vocab_size")) != (meta.get("tokenizer"), meta.get("vocab_size")):
        why = f"{describe(ckpt_meta)}, dataset {dataset!r} uses {describe(meta)}"
    elif ckpt_meta.get("tokenizer") == "char" and ckpt_meta.get("chars") != meta.get("chars"):
        a, b = ckpt_meta.get("chars"), meta.get("chars")
        if isinstance(a, str) and isinstance(b, str):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            at = f"token {i} is {a[i:i + 1]!r} there and {b[i:i + 1]!r} in dataset {dataset!r}"
        else:
            at = f"dataset {dataset!r} has chars {_short(b)}"
        why = f"a character vocabulary of the same size but other characters ({at})"
    else:
        return
    raise CheckpointError(f"vocab mismatch: the checkpoint in {ckpt_where} was trained on {why}: {fix}")


def load_train_state(info, device="cpu"):
    """The optimizer/scaler state saved with the checkpoint (weights_only: nothing is unpickled)."""
    path = Path(info["dir"]) / TRAIN_STATE
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: this checkpoint holds weights only, it cannot be resumed") \
            from None
    except Exception as e:  # truncated zip, bad pickle opcodes, ...: torch raises several kinds, and its advice
        # (weights_only=False) is wrong for a damaged file: say what it is and how to go on
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}): {_lost_state_fix(info)}") from None
    return state


def _lost_state_fix(info):
    out_dir = Path(info["dir"]).parent
    return (f"restore it from a backup, or start over from these weights with a fresh optimizer "
            f"(--init_from={out_dir} and another out_dir)")


def build_model(info, dtype=torch.float32, device="cpu", **overrides):
    """The model a checkpoint holds, weights loaded. A whole-model checkpoint is built in `dtype`; an adapter-only
    one (LoRA runs) from its base, rebuilt by load_base in the dtype it trained in (narrowed to `dtype` when that is
    narrower), plus its float32 adapters. overrides: GPTConfig fields that change no weight shape (e.g. dropout)."""
    import hf
    config = model_config(info, **overrides)
    base = info.get("base")
    if not base:
        return load_weights(hf.empty_model(GPT, config, dtype, device), info, device)
    what = f"the base of the LoRA adapters in {info['dir']}, {base['init_from']!r},"
    fix = f"restore it, or edit base.init_from in {Path(info['dir']) / CONFIG}"
    # a base wider than the dtype asked for is checked and narrowed on the CPU, never whole on the device
    staging = "cpu" if dtype.itemsize < getattr(torch, base["dtype"]).itemsize else device
    try:  # overrides go to the base: dropout and the like are built into its modules
        model = load_base({**base, "overrides": {**base.get("overrides", {}), **overrides}}, staging)
    except CheckpointError as e:
        raise CheckpointError(f"{what} does not load: {e}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} does not load ({e}): {fix}") from None
    changed = _changed(fingerprint(model), base["fingerprint"])
    if changed:
        raise CheckpointError(f"{what} is not the model these adapters were trained on ({changed} differs): {fix}")
    if staging != device:
        model = _cast_weights(model, dtype).to(device)
    model.add_lora(**{k: v for k, v in config.to_dict().items() if k.startswith("lora_")})
    return _load_adapters(model, info)


def _changed(now, then):
    """The first weight whose fingerprint differs, or None."""
    for name in sorted(now.keys() | then.keys()):
        if name not in now or name not in then or not math.isclose(now[name], then[name], rel_tol=1e-9, abs_tol=1e-12):
            return name
    return None


def _load_adapters(model, info):
    if is_sharded(info):
        return load_sharded_weights(model, info, adapters_only=True)
    params = dict(model.named_parameters())
    expected = {n for n in params if "lora" in n}
    path = Path(info["dir"]) / WEIGHTS
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None
    if tensors.keys() != expected or any(tensors[n].shape != params[n].shape for n in expected):
        raise CheckpointError(f"{path} does not hold the adapters {CONFIG} describes (lora_rank, lora_targets)")
    with torch.no_grad():
        for name in expected:
            params[name].copy_(tensors[name])
    return model


def load_base(base, device="cpu"):
    """The frozen weights a LoRA run trains on, as train.py builds them and build_model rebuilds them: the
    Hugging Face model or out_dir base["init_from"] (whose own adapters are merged) with base["overrides"], the
    weights in base["dtype"]. A Hugging Face base loads straight into that dtype on `device`; one of our out_dirs
    is merged in float32 on the CPU first."""
    dtype, overrides = getattr(torch, base["dtype"]), base.get("overrides", {})
    if find(base["init_from"]) is None:
        return GPT.from_pretrained(base["init_from"], dtype=dtype, device=device, **overrides)
    model = build_model(read(base["init_from"]), torch.float32, "cpu", **overrides)
    _cast_weights(model, torch.float32)  # an adapter-only out_dir comes in its own base dtype: merge in float32
    return _cast_weights(model.merge_lora(), dtype).to(device)


def _cast_weights(model, dtype):
    for p in model.parameters():  # not model.to(dtype): that would round the RoPE tables too
        p.data = p.data.to(dtype)
    return model


def fingerprint(model):
    """{name: float64 sum of a strided sample of ~4096 values} for every weight outside the adapters: cheap to
    compute for a 20B model, and any retraining or different rounding of a base changes it."""
    out = {}
    for name, p in model.named_parameters():
        if "lora" not in name:
            flat = p.detach().reshape(-1)
            out[name] = flat[::max(1, flat.numel() // 4096)].double().sum().item()
    return out


# ----------------------------------------------------------------------------------------------------------------
# load_model: our checkpoints and Hugging Face ones, for inference


def hf_tokenizer(config):
    """The tiktoken encoding of a Hugging Face checkpoint with this architecture, or None for Gemma 3,
    whose SentencePiece tokenizer is not tiktoken."""
    import hf
    return {"gpt2": "gpt2", "gpt_oss": "o200k_harmony"}.get(hf.family_of(config))


def _meta_for(tokenizer_name):
    from tokenizer import load_tokenizer, make_meta
    return make_meta(load_tokenizer({"tokenizer": tokenizer_name}))


def load_model(path, device="cpu", dtype=torch.float32, tokenizer=None):
    """(model in eval mode, tokenizer meta) from an out_dir / checkpoint directory of ours, or a Hugging Face
    directory or hub id. tokenizer: a tokenizer name ('gpt2', 'char' needs a meta) or a meta dict that
    overrides the checkpoint's; needed for Hugging Face Gemma, whose own tokenizer is not tiktoken."""
    if isinstance(tokenizer, str):
        tokenizer = _meta_for(tokenizer)
    if find(path) is not None:
        info = read(path)
        model = build_model(info, dtype, device)
        meta = tokenizer or load_meta(info)
    else:
        if Path(path).exists() and not (Path(path) / CONFIG).is_file():
            raise CheckpointError(f"{path} holds neither a nanoforge checkpoint ({CKPT}/{CONFIG}) nor a "
                                  f"Hugging Face model (config.json)")
        model = GPT.from_pretrained(str(path), dtype=dtype, device=device)
        meta = tokenizer or _hf_meta(path, model.config)
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise CheckpointError(f"tokenizer {meta.get('tokenizer')!r} has {meta['vocab_size']} tokens but the model "
                              f"in {path} only {model.config.vocab_size}")
    return model.to(device=device, dtype=dtype).eval(), meta


QUANTIZE = ("", "int8")  # --quantize of sample.py, serve.py and eval.py: '' = off


def quantize_error(quantize, device):
    """Why --quantize cannot be used as given (an unknown kind; a device the int8 kernel does not run on), or None."""
    if quantize not in QUANTIZE:
        return f"--quantize must be 'int8' or '' (off), got {quantize!r}"
    if quantize and torch.device(device).type != "cpu":
        return (f"--quantize=int8 is for decoding on CPU (its kernel is a CPU one), not {device}: use --device=cpu, "
                f"or leave --quantize off (bfloat16 is the default on GPUs)")
    return None


def load_for_inference(path, device="cpu", dtype=torch.float32, tokenizer=None, quantize=""):
    """load_model for sample.py, serve.py and eval.py: a LoRA run's adapters folded in once (generation at the base
    model's speed), then quantize="int8" (quantize_error's rules) makes the weights int8 (ops.quantize_int8)."""
    model, meta = load_model(path, device, dtype, tokenizer)
    if model.config.lora_rank:
        model.merge_lora()
    if quantize:
        import ops
        try:
            ops.quantize_int8(model)
        except RuntimeError as e:  # no C++ compiler for the int8 kernel
            raise CheckpointError(str(e)) from e
    return model, meta


def _hf_meta(path, config):
    local_meta = Path(path) / META  # a meta.json put beside a Hugging Face model names its tokenizer
    if local_meta.is_file():
        return json.loads(local_meta.read_text(encoding="utf-8"))
    name = hf_tokenizer(config)
    if name is None:
        raise CheckpointError(f"{path} is a Gemma model, whose SentencePiece tokenizer is not tiktoken: "
                              f"name a tokenizer (e.g. --tokenizer=gpt2 for gemma3-compact) or put a "
                              f"meta.json beside it")
    return _meta_for(name)



# ----------------------------------------------------------------------------------------------------------------
# train.py: the architecture a run asks for, and the model it starts from (scratch, resume, or pretrained weights)

LORA_DEFAULTS = {f.name: f.default for f in fields(GPTConfig) if f.name.startswith("lora_")}


def requested_config(config, meta):
    """The architecture a train.py config asks for: a preset or the n_layer/... knobs, then model_overrides."""
    if config["model"]:
        try:
            base = GPTConfig.preset(config["model"]).to_dict()
        except ValueError as e:
            raise CheckpointError(f"model: {e}") from None
    else:
        bias = config["bias"]
        base = dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                    block_size=config["block_size"], dropout=config["dropout"], qkv_bias=bias, attn_out_bias=bias,
                    mlp_bias=bias, norm_bias=bias,
                    gelu_approx="none")  # nanoGPT's model: exact GELU (nn.GELU), as its recipes were trained
    vocab = {"vocab_size": meta["vocab_size"]} if meta else {}  # no prepared dataset (estimate_only): the preset's
    return make_config({**base, **vocab, **checked_overrides(config["model_overrides"])})


def checked_overrides(overrides):
    """model_overrides, each key a GPTConfig field and each value of that field's type."""
    types = {f.name: f.type for f in fields(GPTConfig)}
    for key, value in overrides.items():
        if key not in types:
            raise CheckpointError(f"model_overrides: {key!r} is not a GPTConfig field (see model.py)")
        kind = types[key]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (kind is not bool and isinstance(value, bool)):
            raise CheckpointError(f"model_overrides: {key} must be {kind.__name__}, got {value!r}")
    return overrides


def lora_settings(overrides):
    """The adapters model_overrides asks for (every lora_* field, unset ones at their defaults), or {} for none."""
    asked = {k: v for k, v in checked_overrides(overrides).items() if k in LORA_DEFAULTS}
    return {**LORA_DEFAULTS, **asked} if asked.get("lora_rank") else {}


def base_overrides(overrides):
    return {k: v for k, v in checked_overrides(overrides).items() if k not in LORA_DEFAULTS}


def make_config(d):
    try:
        return GPTConfig(**d)
    except (AssertionError, TypeError, ValueError) as e:
        raise CheckpointError(f"invalid model config: {e}") from None


def hf_config(name_or_path):
    """The GPTConfig of a Hugging Face checkpoint from its config.json alone (a hub id downloads just that file)."""
    import hf
    path = os.path.join(name_or_path, "config.json")
    if not os.path.isdir(name_or_path):
        try:
            path = hf.hub().hf_hub_download(name_or_path, "config.json")
        except Exception as e:  # offline, a wrong name, a gated model: several kinds
            reason = (str(e).strip().splitlines() or [""])[0]
            raise OSError(f"no local directory of that name, and no config.json from the Hugging Face Hub "
                          f"({type(e).__name__}: {reason})") from None
    with open(path, encoding="utf-8") as f:
        return hf.config_from_hf(json.load(f))


def planned_config(config, meta):
    """The architecture a train.py run trains, read from configs alone (no weights): for the memory estimate."""
    init_from = config["init_from"]
    if init_from == "scratch":
        return requested_config(config, meta)
    if init_from == "resume":
        return model_config(read(config["out_dir"]))
    try:
        if find(init_from) is not None:  # another run's out_dir; its own adapters get merged
            base = model_config(read(init_from)).to_dict()
        else:
            base = hf_config(init_from).to_dict()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"init_from={init_from!r}: {e}") from None
    overrides = config["model_overrides"]
    return make_config({**base, "lora_rank": 0, **base_overrides(overrides), **lora_settings(overrides)})


def prepare_for_training(model, base_dtype=torch.float32, gradient_checkpointing=False):
    """LoRA trains the adapters only, and their frozen base may be stored in base_dtype (also on the meta device)."""
    if model.config.lora_rank:
        for name, p in model.named_parameters():
            p.requires_grad_("lora" in name)
            if "lora" not in name:
                p.data = p.data.to(base_dtype)
    model.gradient_checkpointing = gradient_checkpointing
    return model


@dataclass
class Start:
    """Where a train.py run starts, besides the weights; checkpoints record it and a resume continues it."""
    iter_num: int
    best_val_loss: float
    seed: int  # a resume continues its checkpoint's data stream and dropout RNG
    origin: str  # 'scratch', or the Hugging Face model or out_dir the weights came from, kept through resumes
    base_ref: dict | None = None  # LoRA on a pretrained model: checkpoints hold the adapters and this reference
    info: dict | None = None  # resume: the checkpoint read, whose optimizer state load_optimizers restores


def init_model(config, meta, planned, device="cpu", verbose=True):
    """(model on device, ready to train; Start) for a train.py config: a new model (init_from='scratch'), the
    checkpoint in out_dir ('resume'), or a Hugging Face model or another run's out_dir, with the LoRA adapters
    model_overrides asks for. meta: the dataset's meta.json; planned: planned_config(config, meta)."""
    init_from = config["init_from"]
    if init_from == "scratch":
        if verbose:
            print("Initializing a new model from scratch")
        model, start = GPT(planned), Start(0, math.inf, config["seed"], init_from)
    elif init_from == "resume":
        model, start = _resume(config, meta, verbose)
    else:
        model, start = _pretrained(config, meta, planned, device, verbose)
    check_fits(config, meta, model.config)
    base_dtype = getattr(torch, config["base_dtype"])
    return prepare_for_training(model, base_dtype, config["gradient_checkpointing"]).to(device), start


def check_fits(config, meta, model_config):
    """The dataset's tokens and the training context must fit the model."""
    dataset, vocab_size, block_size = config["dataset"], model_config.vocab_size, model_config.block_size
    if meta["vocab_size"] > vocab_size:
        raise CheckpointError(f"vocab mismatch: dataset {dataset!r} has {meta['vocab_size']} tokens, the model only "
                              f"{vocab_size}")
    if config["block_size"] > block_size:
        raise CheckpointError(f"block_size {config['block_size']} is longer than the model's block_size {block_size}")


def _resume(config, meta, verbose):
    info, overrides, start = resume_point(config, meta, verbose)
    return build_model(info, **overrides), start  # built on the meta device and filled: no random init to overwrite


def resume_point(config, meta, verbose=True):
    """A resume's checks against this config and dataset, without loading weights: (the checkpoint's info, the
    GPTConfig overrides the model is built with, Start)."""
    out_dir, dataset = config["out_dir"], config["dataset"]
    if verbose:
        print(f"Resuming training from {out_dir}")
    info = read(out_dir)
    missing = [k for k in ("iter_num", "best_val_loss", "seed", "train_config") if k not in info]
    if missing:
        raise CheckpointError(f"{Path(info['dir']) / CONFIG} has no {', '.join(missing)}: it is not a training "
                              f"checkpoint (or was edited); restore it, or start a new run from its weights with "
                              f"--init_from={out_dir} and another out_dir")
    ckpt_config, ckpt_meta = model_config(info), load_meta(info)
    check_same_tokenizer(ckpt_meta, meta, out_dir, dataset, "resume with the checkpoint's dataset")
    origin, overrides = info.get("init_from", "scratch"), {}
    if origin == "scratch":  # the checkpoint's architecture must be the one this config asks for
        asked = requested_config(config, meta)
        diff = [f"{f.name}={getattr(ckpt_config, f.name)!r} (config asks {getattr(asked, f.name)!r})"
                for f in fields(GPTConfig) if f.name != "dropout"
                and getattr(ckpt_config, f.name) != getattr(asked, f.name)]
        if diff:
            raise CheckpointError(f"architecture mismatch: the checkpoint in {out_dir} has {', '.join(diff)}: resume "
                                  f"with the settings it was trained with")
        overrides = {"dropout": asked.dropout}
    best = info["best_val_loss"] if info["best_val_loss"] is not None else math.inf
    return info, overrides, Start(info["iter_num"], best, info["seed"], origin, info.get("base"), info)


def _pretrained(config, meta, planned, device, verbose):
    init_from = config["init_from"]
    check_init_vocab(init_from, meta, config["dataset"], planned)
    origin = os.path.abspath(init_from) if os.path.exists(init_from) else init_from  # checkpoints find it anywhere
    overrides = config["model_overrides"]
    base = dict(init_from=origin, dtype=config["base_dtype"], overrides=base_overrides(overrides))
    if verbose:
        print(f"Initializing from {'the checkpoint in' if find(init_from) else 'Hugging Face weights:'} {init_from}")
    try:  # a Hugging Face base loads straight into base_dtype; an out_dir's own adapters are merged
        model = load_base(base, device)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"init_from={init_from!r}: {e}") from None
    base_ref = None
    if planned.lora_rank:
        model.add_lora(**lora_settings(overrides))
        if not config["save_base_weights"]:
            base_ref = {**base, "fingerprint": fingerprint(model)}
    return model, Start(0, math.inf, config["seed"], origin, base_ref)


def check_init_vocab(init_from, meta, dataset, planned):
    """init_from a pretrained model: its tokenizer must be the dataset's (checked before any weight is loaded)."""
    if find(init_from) is not None:
        check_same_tokenizer(load_meta(read(init_from)), meta, init_from, dataset,
                             "prepare the dataset with the checkpoint's tokenizer (for 'char': the same characters)")
        return
    want = hf_tokenizer(planned)  # None for Gemma: its tokenizer is not one of ours
    if os.path.isfile(os.path.join(init_from, META)):  # export.py's output names its tokenizer
        want = read_meta(init_from)["tokenizer"]
    if want and meta["tokenizer"] != want:
        raise CheckpointError(f"{init_from} was trained with tokenizer {want!r} but dataset {dataset!r} uses "
                              f"{meta['tokenizer']!r}: pick a dataset tokenized with {want!r}")


def load_optimizers(info, out_dir, optimizer, optimizers, scaler, device="cpu", model=None):
    """Resume: the optimizer(s) and grad scaler as the checkpoint `info` in out_dir left them, for the same
    optimizer ('adamw' or 'muon'). model: the model the optimizers train, needed when it or the checkpoint is
    sharded (the state is then matched by parameter name)."""
    trained_with = info["train_config"].get("optimizer")
    if trained_with != optimizer:
        raise CheckpointError(f"the checkpoint in {out_dir} was trained with optimizer={trained_with!r}, this run "
                              f"asks {optimizer!r}: resume with the same optimizer")
    if is_sharded(info):
        return load_sharded_optimizers(info, model, optimizers)
    state = load_train_state(info, device)
    if not (isinstance(state, dict) and isinstance(state.get("optimizers"), list)
            and isinstance(state.get("scaler"), dict)):
        raise CheckpointError(f"{info['dir']}/{TRAIN_STATE} is not an optimizer state (no optimizers and scaler): "
                              f"{_lost_state_fix(info)}")
    try:
        if is_fsdp(model):  # a DDP or single-process checkpoint: each process keeps its shards of the whole state
            load_whole_optimizers(model, optimizers, state["optimizers"])
        else:
            for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(opt_state)
        scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:  # a state of another
        detail = " ".join(str(e).split())[:200]  # model, or a hand-made file: torch raises several kinds
        raise CheckpointError(f"{info['dir']}/{TRAIN_STATE} does not fit this model and optimizer "
                              f"({type(e).__name__}: {detail}): {_lost_state_fix(info)}") from None


# ----------------------------------------------------------------------------------------------------------------
# sharded checkpoints: train.py with parallel='fsdp' (see the top of this file)


def is_sharded(info):
    return "sharded" in info


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _stored(model, name, adapters_only=False):
    """Whether a sharded checkpoint holds weight `name`: a tied head is the embedding, stored once under its name;
    an adapter-only checkpoint holds the adapters alone."""
    if model.config.tie_embeddings and name == "lm_head.weight":
        return False
    return "lora" in name or not adapters_only


def _optimizer_tensors(osd):
    """{"optim.<name>.<key>": tensor} of get_optimizer_state_dict's {"state": {name: {key: tensor}}, ...}."""
    return {f"optim.{name}.{k}": v for name, s in osd["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def sharded_state(model, optimizers=(), adapters_only=False):
    """{key: tensor} of what a sharded checkpoint holds: "model.<name>" for the weights, "optim.<name>.<key>" for the
    optimizer state. Under FSDP the values are DTensors (this process's shards), else whole tensors; either way
    the very tensors of the model and optimizers, which DCP reads into in place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {f"model.{k}": v for k, v in get_model_state_dict(model).items() if _stored(model, k, adapters_only)}
    if optimizers:
        state.update(_optimizer_tensors(get_optimizer_state_dict(model, list(optimizers))))
    return state


def _hyperparameters(group):
    """An optimizer param group's settings (betas, weight_decay, ...) as JSON: config.json keeps them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()
            if k != "params" and (v is None or isinstance(v, (bool, int, float, str, tuple)))}


def save_sharded(out_dir, model, optimizers, info, meta):
    """Write a sharded checkpoint of an FSDP model and its optimizers into out_dir/ckpt; collective: every process
    calls it. Each process writes its shards with DCP into ckpt.tmp/state/ and fsyncs them; after a barrier
    rank 0 writes meta.json and config.json and swaps ckpt.tmp/ in, as save() does. A failed write on any process
    (a full disk) raises CheckpointError on all of them and leaves the previous checkpoint as it was."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save as dcp_save
    out, rank0 = Path(out_dir), dist.get_rank() == 0
    tmp = out / TMP

    def on_rank0(step):  # rank 0 alone touches the folders; every process learns whether it worked
        error = None
        if rank0:
            try:
                step()
            except (OSError, RuntimeError, SafetensorError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                error = _why(e, out)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def start():
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
        (tmp / STATE).mkdir(parents=True)

    error = on_rank0(start)
    if error is None:
        try:  # DCP raises on every process when one of them failed
            dcp_save(sharded_state(model, optimizers, bool(info.get("base"))),
                     storage_writer=HuggingFaceStorageWriter(str(tmp / STATE), save_distributed=True))
        except Exception as e:
            error = _why(e, out)
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        dist.barrier()  # every process has written and fsynced its files: only now may rank 0 commit
        sharded = {"processes": dist.get_world_size(),
                   "optimizer_groups": [[_hyperparameters(g) for g in opt.param_groups] for opt in optimizers]}
        error = on_rank0(lambda: _commit(out, model.config, {**info, "sharded": sharded}, meta))
        if error is None:
            cur = out / CKPT
            error = on_rank0(lambda: _publish(out, cur))
            if error is not None:
                raise CheckpointError(f"saved {cur}, but could not update the links to it in {out} ({error})")
            return cur
    raise CheckpointError(f"could not write a checkpoint to {out} ({error})")


def _read_state(info, template, what):
    """Fill `template` ({key: tensor}, sharded_state's keys) from a sharded checkpoint, in place: DTensors get the
    slices of their shards (collective: every process calls it), whole tensors are read whole, on one process
    without any process group. Nothing is unpickled: safetensors files, JSON headers."""
    import warnings
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load as dcp_load
    from torch.distributed.tensor import DTensor
    path = Path(info["dir"]) / STATE
    distributed = any(isinstance(v, DTensor) for v in template.values())
    try:
        with warnings.catch_warnings():  # no_dist: DCP warns that it assumes a single process, which it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(template, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not distributed)
    except Exception as e:  # DCP raises several kinds (a missing key, a truncated file: CheckpointException)
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path} does not hold {what} ({type(e).__name__}: {detail})") from None


def _stored_names(info, prefix):
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    keys = HuggingFaceStorageReader(str(Path(info["dir"]) / STATE)).read_metadata().state_dict_metadata
    return {k[len(prefix):] for k in keys if k.startswith(prefix)}


def load_sharded_weights(model, info, adapters_only=False):
    """A sharded checkpoint's weights (or only its adapters) into `model`, whole or FSDP-sharded, which must be
    built from model_config(info)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model) if is_fsdp(model) else model.state_dict()
    template = {f"model.{k}": v for k, v in state.items() if _stored(model, k, adapters_only)}
    stored = _stored_names(info, "model.")
    wanted = {k[len("model."):] for k in template}
    if stored != wanted:
        odd = sorted(stored ^ wanted)[:3]
        raise CheckpointError(f"{Path(info['dir']) / STATE} does not match the architecture in {CONFIG} "
                              f"({', '.join(odd)} ...)")
    _read_state(info, template, "these weights")
    return model


def load_sharded_optimizers(info, model, optimizers):
    """A sharded checkpoint's optimizer state into `optimizers` of `model` (FSDP or not), matched by parameter
    name, and the param groups' settings."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    osd = get_optimizer_state_dict(model, list(optimizers))  # (an optimizer that has not stepped gets its state)
    _read_state(info, _optimizer_tensors(osd), "this model's optimizer state")  # in place, into osd's tensors
    set_optimizer_state_dict(model, list(optimizers), osd)
    saved = info["sharded"].get("optimizer_groups", [])
    for opt, groups in zip(optimizers, saved):
        for group, settings in zip(opt.param_groups, groups):
            group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v
                          for k, v in settings.items() if k in group})


def load_whole_optimizers(model, optimizers, states):
    """Optimizer state dicts of a DDP or single-process run (whole tensors keyed by position) into the optimizers
    of an FSDP model: matched by parameter name, and each process keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = {id(p): n for n, p in model.named_parameters()}
    for opt, saved in zip(optimizers, states, strict=True):
        order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
        named = {"state": {order[i]: s for i, s in saved["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, opt, named, options=StateDictOptions(full_state_dict=True))
