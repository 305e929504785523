"""
Export a train.py run for other tools: merged Hugging Face weights (transformers, vLLM) or a PEFT adapter.

$ python export.py --out_dir=out-reverse --export_dir=out-reverse/hf
$ python export.py --out_dir=out-reverse --export_dir=out-reverse/adapter --adapter_only=True
then: transformers.AutoModelForCausalLM.from_pretrained('out-reverse/hf'), `vllm serve out-reverse/hf`,
or python sample.py --init_from=out-reverse/hf (the export carries our meta.json: tokenizer and chat format).

Merged (the default): LoRA adapters, if the run has any, are folded into their weights in float32, so the
weights are rounded once, to `dtype` (bfloat16 by default) as they are written. hf.save_pretrained writes
config.json and model.safetensors, or model-0000i-of-0000N.safetensors shards and model.safetensors.index.json
when the weights pass max_shard_gb. Tokenizer files (tokenizer.json, chat_template.jinja, ...) are copied from
the Hugging Face model the run started from, when it has them; otherwise (runs from scratch or from another
out_dir or export) ours are written from the run's meta.json (tokenizer.hf_tokenizer_files): tokenizer.json,
tokenizer_config.json with the chat template of the run's chat_format, and generation_config.json with the ids
that end generation. AutoTokenizer, lm-eval's hf backend and vLLM then encode text to exactly our ids.

--adapter_only=True: only the adapters, in PEFT's layout: adapter_config.json and adapter_model.safetensors,
for peft.PeftModel.from_pretrained(<transformers model of the same base>, export_dir). Our fused weights split
into Hugging Face's separate ones: an adapter on c_attn becomes q_proj/k_proj/v_proj adapters that share its A
and take their rows of B (Gemma's c_fc: gate_proj/up_proj likewise), which is exact. GPT-OSS's expert tensors
and router are not nn.Linear modules in transformers: their adapters go to PEFT's target_parameters (PEFT >=
0.17), which has no dropout, so adapter_config.json says lora_dropout 0 then (dropout only acts in training).
PEFT needs the base model in Hugging Face form: for a run that started from another out_dir, export that
base (merged) first and point base_model_name_or_path at it.

The export is written into a fresh folder beside export_dir and renamed into place when it is complete, so a
failure half-way leaves export_dir as it was, and no file is ever written through a link (a train.py out_dir's
config.json, model.safetensors and meta.json are hard links into its checkpoint). export_dir may be new, an empty
folder, or an earlier export (only export files: config.json and meta.json, or a PEFT adapter), replaced whole.
Anything else (another run's out_dir or checkpoint, a dataset, a Hugging Face model folder, other files) is
refused unless --overwrite=True; then the export's files are renamed in over their namesakes one by one (a
checkpoint's ckpt/ is left as it is) and other files stay. The run's own out_dir is always refused.

--push_to_hub=user/name: once the export is complete in export_dir, upload it to that Hugging Face repo (created if
missing; --private=True creates it private) as one commit on --revision (main; another branch is created from
main), with a model card, README.md, written into the export first (--model_card=True writes one without
pushing). The token is huggingface_hub's: HF_TOKEN, or the one `hf auth login` saved. The commit holds the export's
files and deletes the repo's files of an earlier export that this one lacks (a stale model.safetensors would be
loaded instead of new shards, an old adapter_config.json would turn a merged model into an adapter); other files
in the repo stay. The repo id, the token's presence and HF_HUB_OFFLINE are checked before any export work; a
failed upload (offline, a bad token, no write access) is one error line and leaves the export complete.
The card's YAML front matter is what the Hub indexes: library_name (transformers, or peft for an adapter),
base_model (the hub model the run started from: for a merged model also through earlier runs' out_dirs, for an
adapter only when it applies to that model itself), license (--license, else the base model's card's, else
"other"), pipeline_tag text-generation and tags. Its body: the architecture, the training recipe from the
checkpoint's train_config, the best val loss and the one at the exported iteration (out_dir/history.jsonl), and
eval.py's results (out_dir/eval_results.json, when written after the checkpoint) as a table.

Errors a user can cause (no checkpoint or a corrupt one, no --export_dir, an export_dir that is a file, cannot be
created, or holds what export.py did not write, --adapter_only on a run without adapters, a bad --push_to_hub
repo id, no token, a failed upload) print one line on stderr starting "error: " and exit with status 2.
"""
import json
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import checkpoint
import devices
import hf
import lossplot
from configurator import apply_overrides
from model import GPT
from tokenizer import TokenizerError, hf_tokenizer_files, load_tokenizer

DEFAULTS = dict(
    out_dir='out',         # the train.py run to export (its out_dir, or a checkpoint directory)
    export_dir='',         # where to write; created if missing
    adapter_only=False,    # True: the LoRA adapters alone, in PEFT's layout
    dtype='bfloat16',      # merged weights: bfloat16, float16 or float32
    max_shard_gb=5.0,      # merged weights: above this, several safetensors files and an index
    overwrite=False,       # True: write into an export_dir that holds other things (see above)
    push_to_hub='',        # a Hugging Face repo id (user/name): upload the finished export there
    private=False,         # push_to_hub: create the repo private (an existing public repo is refused, not changed)
    revision='main',       # push_to_hub: the branch to commit to (created if missing)
    commit_message='',     # push_to_hub: '' = "Upload <what> exported by nanoforge (iter N)"
    license='',            # the model card's license: '' = the base model's (its card's), else 'other'
    model_card=False,      # True: write README.md, the model card, also without push_to_hub (which always does)
)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'chat_template.jinja', 'generation_config.json', 'vocab.json', 'merges.txt')
# GPT-OSS modules that transformers does not build from nn.Linear: PEFT adapts their parameters instead, and
# wraps several parameters of one module one inside the other, in the module's own parameter order
PARAMETER_MODULES = {'mlp.experts': ('gate_up_proj', 'down_proj'), 'mlp.router': ('weight',)}


# what an export folder holds: anything else in an existing export_dir means it is not (only) an earlier export
CARD = 'README.md'  # the model card
EXPORT_FILES = {'config.json', 'model.safetensors', 'model.safetensors.index.json', checkpoint.META,
                'adapter_config.json', 'adapter_model.safetensors', CARD, *TOKENIZER_FILES}
SHARD = re.compile(r'model-\d+-of-\d+\.safetensors|\..*\.tmp')  # weight shards; hf.save_pretrained's temp files


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _reason(error):
    return error.strerror or ' '.join(str(error).split()) or type(error).__name__


def foreign_contents(folder):
    """Why `folder` (an existing directory) is not an earlier export that may be replaced whole, or None."""
    ckpt = checkpoint.find(folder)
    if ckpt is not None or any((folder / d).is_dir() for d in (checkpoint.CKPT, checkpoint.TMP, checkpoint.OLD)):
        return f"a train.py checkpoint ({ckpt or folder})"
    names = sorted(os.listdir(folder))
    for name in ('train.bin', 'val.bin', 'test.bin'):
        if name in names:
            return f"a dataset ({name})"
    others = [f"{n} (a link)" if os.path.islink(folder / n) else f"{n}/" if (folder / n).is_dir() else n
              for n in names if n not in EXPORT_FILES and not SHARD.fullmatch(n)
              or not os.path.isfile(folder / n) or os.path.islink(folder / n)]
    if others:
        return f"files export.py does not write ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    merged = {'config.json', checkpoint.META} <= set(names)
    adapter = {'adapter_config.json', 'adapter_model.safetensors'} <= set(names)
    if not (merged or adapter):
        return f"{', '.join(names[:3])}, but not an export (no config.json with meta.json, nor a PEFT adapter)"
    return None


def check_export_dir(export_dir, out_dir, overwrite):
    """The export's target (symlinks resolved) and how it is written: 'new' (missing or empty), 'replace' (an
    earlier export) or 'merge' (--overwrite=True over anything else); or a one-line error."""
    target = Path(export_dir).resolve()
    blocker = next((p for p in (target, *target.parents) if os.path.lexists(p)), None)
    if blocker == target and not target.is_dir():
        fail(f"--export_dir {export_dir} is a file, not a folder: choose a folder to export into")
    if blocker is not None and not blocker.is_dir():
        fail(f"--export_dir {export_dir} cannot be created: {blocker} is a file, not a folder; choose another folder")
    ckpt = checkpoint.find(out_dir)
    if ckpt is not None and target in (Path(out_dir).resolve(), Path(ckpt).resolve()):
        fail(f"--export_dir must not be the run's own out_dir {out_dir} (its checkpoint would be overwritten): "
             f"choose another folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f'.{target.name}.export-', dir=target.parent)  # can we write there?
        os.rmdir(probe)
    except OSError as e:
        fail(f"--export_dir {export_dir} cannot be created ({_reason(e)}): choose a writable folder")
    if not target.exists() or not os.listdir(target):
        return target, 'new'
    why = foreign_contents(target)
    if why is None:
        return target, 'replace'
    if not overwrite:
        fail(f"--export_dir {export_dir} holds {why}: choose a new or empty folder, or pass --overwrite=True to "
             f"write the export's files over their namesakes there")
    return target, 'merge'


def publish(staging, target, mode):
    """Move the finished export in `staging` to `target` (see check_export_dir for the modes)."""
    if mode == 'new':
        if target.exists():
            os.rmdir(target)  # empty (checked); fails if something appeared meanwhile, and nothing is lost
        os.rename(staging, target)
    elif mode == 'replace':
        old = Path(tempfile.mkdtemp(prefix=f'.{target.name}.old-', dir=target.parent))
        os.rename(target, old / target.name)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:  # merge: renames replace links instead of writing through them; other files stay
        names = set(os.listdir(staging))
        for name in os.listdir(target):
            if name not in names and (SHARD.fullmatch(name) or name in ('model.safetensors',
                                                                        'model.safetensors.index.json')):
                os.unlink(target / name)  # weights of another layout (hf.save_pretrained removes them likewise)
        for name in sorted(names):
            os.replace(staging / name, target / name)
        os.rmdir(staging)


def load_run(path):
    """(model, checkpoint info, meta) of a train.py checkpoint. The model is built on the meta device and takes
    the stored tensors as they are, so a LoRA run's bfloat16 base stays bfloat16: peak memory is one copy."""
    info = checkpoint.read(path)
    if info.get('base'):  # adapters only: the base is rebuilt in the dtype the run trained it in
        return checkpoint.build_model(info).eval(), info, checkpoint.load_meta(info)
    weights = Path(info['dir']) / checkpoint.WEIGHTS
    if not weights.is_file():  # a sharded checkpoint: checkpoint.py reads it
        return checkpoint.build_model(info).eval(), info, checkpoint.load_meta(info)
    config = checkpoint.model_config(info)
    model = hf.empty_model(GPT, config, device='meta')  # no storage: load_state_dict(assign=True) brings it
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise checkpoint.CheckpointError(f"{weights} is corrupt or truncated ({' '.join(str(e).split())[:200]}): "
                                         f"restore it or retrain") from None
    if config.tie_embeddings:  # safetensors stores a tied tensor once, under one of its names
        shared = state.get('lm_head.weight', state.get('transformer.wte.weight'))
        if shared is not None:
            state['lm_head.weight'] = state['transformer.wte.weight'] = shared
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"{weights} does not match the architecture in {checkpoint.CONFIG}: "
                                         f"{' '.join(str(e).split())[:300]}") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval(), info, checkpoint.load_meta(info)


def lora_weights(model):
    """The weight tensors that carry adapters (the stacked expert tensors for per-expert adapters)."""
    return [module.weight if tensor is None else getattr(module, tensor) for _, module, tensor in model.lora_sites()]


def export_merged(model, meta, origin, export_dir, dtype, max_shard_bytes):
    """Fold the adapters into the weights and write the Hugging Face layout; returns the files written."""
    if model.config.lora_rank:
        for weight in lora_weights(model):
            weight.data = weight.data.float()  # merged in float32, rounded once when written in dtype
        model.merge_lora()
    model.save_pretrained(export_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    checkpoint.write_text_atomic(Path(export_dir) / checkpoint.META,
                                 json.dumps(meta, indent=2, ensure_ascii=False) + '\n')  # never through a link
    if not copy_tokenizer_files(origin, export_dir):
        try:
            write_tokenizer_files(meta, export_dir, model.config.block_size)
        except TokenizerError as e:  # e.g. offline without a tiktoken cache: the weights are still useful
            print(f"note: no Hugging Face tokenizer files written ({e}): give vLLM --tokenizer")
    return sorted(os.listdir(export_dir))


def write_tokenizer_files(meta, export_dir, model_max_length):
    """Our tokenizer (the one meta.json names) and chat template in Hugging Face's files."""
    files = hf_tokenizer_files(load_tokenizer(meta), meta.get('chat_format'), model_max_length)
    for name, text in files.items():
        (Path(export_dir) / name).write_text(text, encoding='utf-8')


def copy_tokenizer_files(origin, export_dir):
    """Copy the tokenizer files of the Hugging Face model the run started from, when it is a local directory or
    a hub id (only those small files are downloaded); returns their names. Nothing for a run from scratch, from
    an out_dir, or from a directory with a meta.json (our export): its tokenizer is ours, which we write."""
    if origin in ('scratch', '') or checkpoint.find(origin) is not None or \
            os.path.isfile(os.path.join(origin, checkpoint.META)):
        return []
    if os.path.isdir(origin):
        source = origin
    else:
        try:
            source = hf.hub().snapshot_download(origin, allow_patterns=list(TOKENIZER_FILES))
        except Exception:  # offline, or not a hub id: ours is written instead (the same ids: GPT-2, gpt-oss)
            return []
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]
    for name in copied:
        shutil.copyfile(os.path.join(source, name), os.path.join(export_dir, name))
    return copied


def peft_adapter(model, base_model_name_or_path=None):
    """(adapter_config, tensors): the model's LoRA adapters in PEFT's layout for the transformers model of its
    architecture. Tensor names follow hf.tensor_layout, which maps each of our weights to Hugging Face's."""
    config = model.config
    family = hf.family_of(config)
    hf.hf_config_from(config)  # raises for an architecture no transformers class has, naming the field
    hf_names = defaultdict(list)  # our parameter -> its Hugging Face tensors (q/k/v and gate/up share one of ours)
    for entry in hf.tensor_layout(config):
        hf_names[entry.ours].append(entry)
    modules, parameters, tensors = [], [], {}
    for site, module, tensor in model.lora_sites():
        if tensor is None:  # a Linear: A [r, in], B [out, r], as PEFT stores them (also for GPT-2's Conv1D)
            A, B = module.lora_A.detach(), module.lora_B.detach()
            if not hf_names[f'{site}.weight']:
                raise ValueError(f"the adapter on {site} has no Hugging Face weight to go on")
            for entry in hf_names[f'{site}.weight']:
                if is_parameter_target(entry.hf):  # GPT-OSS's router
                    target = entry.hf
                    parameters.append(target)
                else:
                    target = entry.hf.removesuffix('.weight')
                    modules.append(target)
                rows = slice(*entry.rows) if entry.rows else slice(None)
                tensors[f'{target}.lora_A.weight'], tensors[f'{target}.lora_B.weight'] = A, B[rows]
        else:  # per-expert A [E, in, r], B [E, r, out] -> PEFT's [E * r, in] (expert-major) and [out, r * E]
            A, B = module.lora[f'{tensor}_A'].detach(), module.lora[f'{tensor}_B'].detach()
            (entry,) = hf_names[site]
            E, n_in, r = A.shape
            parameters.append(entry.hf)
            tensors[f'{entry.hf}.lora_A.weight'] = A.transpose(1, 2).reshape(E * r, n_in)
            tensors[f'{entry.hf}.lora_B.weight'] = B.permute(2, 1, 0).reshape(-1, r * E)
    tensors = {peft_key(name, parameters): t.to(torch.float32, copy=True).contiguous()  # shared A: copies
               for name, t in tensors.items()}
    alpha = config.lora_alpha
    adapter_config = dict(
        peft_type='LORA', task_type='CAUSAL_LM', base_model_name_or_path=base_model_name_or_path,
        r=config.lora_rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=0.0 if parameters else config.lora_dropout, target_modules=sorted(set(modules)) or None,
        bias='none', fan_in_fan_out=family == 'gpt2', use_rslora=False, init_lora_weights=True, inference_mode=True,
        modules_to_save=None)
    if parameters:  # only PEFT >= 0.17 knows the key
        adapter_config['target_parameters'] = sorted(parameters)
    return adapter_config, tensors


def is_parameter_target(hf_name):
    module, _, param = hf_name.rpartition('.')
    return any(module.endswith(m) and param in params for m, params in PARAMETER_MODULES.items())


def peft_key(name, parameters):
    """PEFT's key for adapter tensor `name` ('<target>.lora_A.weight'): a parameter target is wrapped by one more
    '.base_layer' for every targeted parameter of its module that comes later in the module's order."""
    target, _, suffix = name.partition('.lora_')
    if target in parameters:
        module, _, param = target.rpartition('.')
        order = next(params for m, params in PARAMETER_MODULES.items() if module.endswith(m))
        outer = [p for p in order[order.index(param) + 1:] if f'{module}.{p}' in parameters]
        target = module + '.base_layer' * len(outer)
    return f'base_model.model.{target}.lora_{suffix}'


def export_adapter(model, origin, export_dir):
    if not model.config.lora_rank:
        raise ValueError("this run has no LoRA adapters (it trained all weights): export it merged, without "
                         "--adapter_only")
    base = None if origin in ('scratch', '') else origin
    adapter_config, tensors = peft_adapter(model, base)
    os.makedirs(export_dir, exist_ok=True)
    save_file(tensors, os.path.join(export_dir, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(export_dir, 'adapter_config.json'), 'w', encoding='utf-8') as f:
        json.dump(adapter_config, f, indent=2)
        f.write('\n')
    if base is None or checkpoint.find(base) is not None:
        print(f"note: PEFT needs the base model in Hugging Face form: export the run it started from ({origin!r}) "
              f"with export.py and set base_model_name_or_path in adapter_config.json to that directory")
    if 'target_parameters' in adapter_config:
        print("note: expert/router adapters use PEFT's target_parameters (PEFT >= 0.17), which has no dropout: "
              "lora_dropout is written as 0")
    return sorted(os.listdir(export_dir))


# ----------------------------------------------------------------------------------------------------------------
# the model card (README.md) and the upload to the Hugging Face Hub

FAMILY_NAMES = {'gpt2': 'GPT-2', 'gemma3_text': 'Gemma 3', 'gpt_oss': 'GPT-OSS'}
# the train_config keys of the card's recipe table, in this order (those the checkpoint has); the whole config
# follows in a collapsed block, without the training machine's own paths
RECIPE_KEYS = ('dataset', 'batch_size', 'gradient_accumulation_steps', 'block_size', 'optimizer', 'learning_rate',
               'min_lr', 'decay_lr', 'warmup_iters', 'lr_decay_iters', 'weight_decay', 'beta1', 'beta2', 'grad_clip',
               'dropout', 'dtype', 'base_dtype', 'model_overrides', 'seed')
LOCAL_KEYS = ('REPO', 'out_dir')
# files of an earlier export in the hub repo that a push deletes unless this export has them
STALE_PATTERNS = sorted(EXPORT_FILES) + ['model-*-of-*.safetensors']


def run_folder(info):
    """The train.py out_dir of a checkpoint: where history.jsonl and eval_results.json are."""
    ckpt = Path(info['dir'])
    return ckpt.parent if ckpt.name in (checkpoint.CKPT, checkpoint.OLD) else ckpt


def is_hub_id(name):
    """True for a Hugging Face hub id (train.py keeps local paths absolute, so anything else is one)."""
    if name in ('scratch', '') or name.startswith(('.', '/', '~')) or os.path.exists(name):
        return False
    try:
        hf.hub().utils.validate_repo_id(name)
    except ValueError:
        return False
    return True


def first_origin(origin):
    """Where a chain of runs began: an out_dir's init_from, followed back to scratch or a Hugging Face model or
    folder (a run fine-tuned from a run fine-tuned from gpt2 derives from gpt2)."""
    for _ in range(32):  # a bound: hand-edited configs could make a loop
        if checkpoint.find(origin) is None:
            return origin
        try:
            origin = checkpoint.read(origin).get('init_from', 'scratch')
        except checkpoint.CheckpointError:  # moved or damaged since: the chain ends here
            return origin
    return origin


def base_license(origin):
    """license (and license_name, license_link) from the card of the Hugging Face model a run started from: its
    README.md in a local folder, or on the hub; {} for scratch, no card, or offline."""
    hub = hf.hub()
    try:
        if os.path.isfile(os.path.join(origin, CARD)):
            data = hub.ModelCard.load(os.path.join(origin, CARD), ignore_metadata_errors=True).data.to_dict()
        elif is_hub_id(origin):
            card = hub.HfApi().model_info(origin, expand=['cardData'], timeout=10).card_data
            data = card.to_dict() if card is not None else {}
        else:
            return {}
    except Exception:  # offline, no such repo, a card that does not parse: --license or 'other' then
        return {}
    return {k: data[k] for k in ('license', 'license_name', 'license_link') if isinstance(data.get(k), str)}


def card_metadata(info, config, adapter, license):
    """The card's YAML front matter: the fields the Hub indexes and filters by."""
    origin = info.get('init_from', 'scratch')
    root = first_origin(origin)
    base = origin if adapter else root  # an adapter applies to its own base only, a merged model derives from all
    licensing = {'license': license} if license else base_license(root) or {'license': 'other'}
    tags = ['nanoforge', hf.family_of(config)] + (['lora'] if config.lora_rank else [])
    return dict(base_model=base if is_hub_id(base) else None, library_name='peft' if adapter else 'transformers',
                **licensing, pipeline_tag='text-generation', tags=tags)


def shown(value):
    """A config value for a public card: local paths by their last component only."""
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.basename(value.rstrip('/')) or value
    return value


def count(n):
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M" if n >= 1e6 else f"{n:,}"


def describe(config, n_params, n_adapter, meta, info, adapter, base_model):
    """The card's first paragraph: what the model is and where it came from."""
    shape = f"{config.n_layer} layers, {config.n_head} heads"
    if config.n_kv_head and config.n_kv_head != config.n_head:
        shape += f" ({config.n_kv_head} key/value heads)"
    shape += (f", {config.n_embd}-dim embeddings, {config.block_size}-token context, {config.vocab_size:,}-token "
              f"vocabulary")
    if config.n_expert:
        shape += f", {config.n_expert} experts ({config.n_expert_active} per token)"
    tokenizer = f"tokenizer `{meta.get('tokenizer', '?')}`"
    if meta.get('chat_format'):
        tokenizer += f", chat format `{meta['chat_format']}`"
    what = f"A PEFT LoRA adapter ({count(n_adapter)} parameters) for a" if adapter else "A"
    text = (f"{what} {FAMILY_NAMES[hf.family_of(config)]}-architecture language model of {count(n_params)} "
            f"parameters ({shape}; {tokenizer}), trained with nanoforge (nanoGPT-style) and exported with its "
            f"export.py.")
    origin = info.get('init_from', 'scratch')
    if origin in ('scratch', ''):
        text += " Trained from scratch."
    else:
        name = f"[{origin}](https://huggingface.co/{origin})" if is_hub_id(origin) else f"`{shown(origin)}`"
        text += f" Fine-tuned from {name}"
        if base_model and base_model != origin:
            text += f", which descends from [{base_model}](https://huggingface.co/{base_model})"
        text += "."
    if config.lora_rank:
        text += (f" LoRA rank {config.lora_rank}, alpha {config.lora_alpha:g}, on `{config.lora_targets}`"
                 f"{': the adapter alone, for its base model.' if adapter else ', merged into the weights.'}")
    return text


def usage(adapter, where, base_model):
    """How to load the export: transformers, or PEFT on the base model."""
    if not adapter:
        return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{where}\")\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{where}\")\n```\n\nor `vllm serve {where}`.")
    note = '' if base_model else '  # the model it was fine-tuned from, exported with export.py'
    return ("```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{base_model or 'BASE_MODEL'}\"){note}\n"
            f"model = PeftModel.from_pretrained(base, \"{where}\")\n```")


def cell(text):
    return text.replace('|', '\\|')  # a bare | ends a markdown table cell, also inside `code`


def recipe(info):
    """The training recipe: a table of the main settings and the whole train_config, collapsed."""
    config = {k: v for k, v in info.get('train_config', {}).items() if k not in LOCAL_KEYS}
    rows = [('iterations', f"{info.get('iter_num', 0):,}" + (f" (max_iters {config['max_iters']:,})"
                                                             if isinstance(config.get('max_iters'), int) else ''))]
    try:
        batch = config['batch_size'] * config['gradient_accumulation_steps']
        rows.append(('tokens per iteration', f"{batch * config['block_size']:,} ({batch} sequences of "
                                             f"{config['block_size']} tokens)"))
    except (KeyError, TypeError):  # a checkpoint written by hand or by another tool
        pass
    rows += [(k, f"`{v if isinstance(v, str) else json.dumps(v)}`") for k in RECIPE_KEYS if k in config
             for v in [shown(config[k])]]
    table = "| setting | value |\n|---|---|\n" + "".join(f"| {k} | {cell(v)} |\n" for k, v in rows)
    whole = json.dumps({k: shown(v) for k, v in config.items()}, indent=2)
    return f"{table}\n<details><summary>the whole train.py config</summary>\n\n```json\n{whole}\n```\n\n</details>"


def losses(info, folder):
    """The best val loss and the losses evaluated at the exported iteration (history.jsonl), as lines."""
    lines = []
    if info.get('best_val_loss') is not None:
        lines.append(f"- best val loss: **{info['best_val_loss']:.4f}**")
    history = folder / 'history.jsonl'
    at = [r for r in (lossplot.read_history(history) if history.is_file() else [])
          if r.get('iter') == info.get('iter_num') and 'val_loss' in r]
    if at:
        lines.append(f"- at iteration {at[-1]['iter']:,} (this model): val loss {at[-1]['val_loss']:.4f}, "
                     f"train loss {at[-1].get('train_loss', float('nan')):.4f}")
    return lines


def eval_table(folder, info):
    """eval.py's results (lm-evaluation-harness) as a table, when out_dir has them for this checkpoint: results
    written before the checkpoint (the run went on since) are not this model's."""
    path = folder / 'eval_results.json'
    try:
        if path.stat().st_mtime < (Path(info['dir']) / checkpoint.CONFIG).stat().st_mtime:
            return None
        results = json.loads(path.read_text(encoding='utf-8'))
        shots, samples = results.get('n-shot', {}), results.get('n-samples', {})
        rows = []
        for task, metrics in sorted(results['results'].items()):
            for key, value in metrics.items():
                metric, _, filter_ = key.partition(',')
                if not filter_ or '_stderr' in metric or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_}")
                n = samples.get(task, {}).get('effective', '')
                rows.append(f"| {task} | {metric}{'' if filter_ == 'none' else f' ({filter_})'} | {value:.4f} | "
                            f"{f'{stderr:.4f}' if isinstance(stderr, (int, float)) else ''} | "
                            f"{shots.get(task, '')} | {n} |")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, or not lm-eval's format
        return None
    if not rows:
        return None
    head = "| task | metric | value | stderr | n-shot | examples |\n|---|---|---:|---:|---:|---:|\n"
    return head + "\n".join(rows)


def model_card(info, meta, model, adapter, license, where, title):
    """README.md: YAML front matter for the Hub, then what the model is, how to load it (from `where`), the
    training recipe and the results the run recorded."""
    config = checkpoint.model_config(info)  # as trained: the merge has set the model's lora_rank to 0
    metadata = card_metadata(info, config, adapter, license)
    folder = run_folder(info)
    n_adapter = sum(p.numel() for p in model.lora_parameters())  # 0 once merged
    sections = [f"# {title}", describe(config, model.num_params() - n_adapter, n_adapter, meta, info, adapter,
                                       metadata['base_model']),
                "## Usage", usage(adapter, where, metadata['base_model']), "## Training", recipe(info)]
    results = losses(info, folder)
    table = eval_table(folder, info)
    if results or table:
        sections += ["## Results", "\n".join(results)]
        if table:
            sections += ["Evaluated with eval.py (EleutherAI's lm-evaluation-harness):", table]
    front = hf.hub().ModelCardData(**metadata).to_yaml()
    return f"---\n{front}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def check_push(args):
    """--push_to_hub's settings, checked before the export's work so that a typo costs a second, not minutes."""
    hub = hf.hub()
    repo_id = args['push_to_hub']
    try:
        hub.utils.validate_repo_id(repo_id)
    except ValueError as e:
        fail(f"--push_to_hub={repo_id!r} is not a Hugging Face repo id ({' '.join(str(e).split())}): give one "
             f"like your-name/model-name")
    if not args['revision']:
        fail("--revision must name a branch (main, the default, or another one, which is created)")
    if hub.constants.HF_HUB_OFFLINE:
        fail("--push_to_hub needs the network, but HF_HUB_OFFLINE is set: unset it (or export without "
             "--push_to_hub)")
    try:
        token = hub.get_token()
    except Exception as e:  # HF_OIDC_RESOURCE set and its token exchange failed
        fail(f"--push_to_hub: no Hugging Face token ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    if token is None:
        fail("--push_to_hub needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login`")


def push_to_hub(folder, files, repo_id, private=False, revision='main', commit_message='Upload model'):
    """Upload `files` of the finished export in `folder` as one commit on `revision` of the model repo `repo_id`
    (created if missing), deleting the repo's earlier export files that are not among them; returns the repo id
    (a bare name lands in the token's own namespace). Raises huggingface_hub's errors."""
    hub = hf.hub()
    api = hub.HfApi()  # token=None: huggingface_hub's own (HF_TOKEN, or `hf auth login`'s)
    repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True).repo_id
    if private and not api.model_info(repo_id, expand=['private']).private:
        raise PermissionError(f"{repo_id} exists and is public, and --private=True does not change an existing repo: "
                              f"make it private in its settings on the Hub, or push to a new repo id")
    if revision != 'main':
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message,
                      allow_patterns=list(files), delete_patterns=STALE_PATTERNS)
    return repo_id


def push_failure(error, repo_id):
    """One line on why an upload failed and what to do."""
    response = getattr(error, 'response', None)
    status = getattr(response, 'status_code', None)
    detail = ' '.join(str(getattr(error, 'server_message', None) or error).split())[:200]
    if isinstance(error, PermissionError):
        return str(error)
    if status == 401:
        return (f"the Hub did not accept the token (401 {detail}): set HF_TOKEN to a token with write access "
                f"(https://huggingface.co/settings/tokens) or run `hf auth login`")
    if status == 403:
        return (f"the token may not write to {repo_id} (403 {detail}): use a token with write access to that "
                f"namespace, or push to your own your-name/model-name")
    if status is not None:
        return f"the Hub refused the upload to {repo_id} ({status} {detail})"
    if isinstance(error, ValueError):  # the Hub's check of README.md's metadata, before anything is uploaded
        return (f"the Hub refused the model card of the upload to {repo_id} ({detail}): fix what it names, e.g. "
                f"pass a --license the Hub knows (apache-2.0, mit, other, ...)")
    return (f"could not reach the Hugging Face Hub at {hf.hub().constants.ENDPOINT} ({type(error).__name__}: "
            f"{detail}): check the network (and HF_ENDPOINT if set)")


def main(argv):
    args = apply_overrides(dict(DEFAULTS), argv)
    if not args['export_dir']:
        fail("pass --export_dir=DIR: where to write the export")
    dtype = devices.DTYPES.get(args['dtype'])
    if dtype is None:
        fail(f"--dtype {args['dtype']!r} is not one of {', '.join(devices.DTYPES)}")
    if not args['max_shard_gb'] > 0:
        fail(f"--max_shard_gb must be positive, not {args['max_shard_gb']}")
    if args['push_to_hub']:
        check_push(args)
    target, mode = check_export_dir(args['export_dir'], args['out_dir'], args['overwrite'])
    try:
        model, info, meta = load_run(args['out_dir'])
    except (checkpoint.CheckpointError, TokenizerError) as e:
        fail(str(e))
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError, RuntimeError) as e:  # a hand-edited
        # config.json of the wrong shape
        fail(f"the checkpoint in {args['out_dir']} is malformed ({type(e).__name__}: "
             f"{' '.join(str(e).split())[:200]}): restore it or retrain")
    origin = info.get('init_from', 'scratch')
    staging = Path(tempfile.mkdtemp(prefix=f'.{target.name}.export-', dir=target.parent))
    try:
        if args['adapter_only']:
            files = export_adapter(model, origin, staging)
        else:
            files = export_merged(model, meta, origin, staging, dtype, int(args['max_shard_gb'] * 2**30))
        if args['model_card'] or args['push_to_hub']:  # in the staging folder: part of the export, renamed with it
            card = model_card(info, meta, model, args['adapter_only'], args['license'],
                              args['push_to_hub'] or args['export_dir'], args['push_to_hub'] or target.name)
            (staging / CARD).write_text(card, encoding='utf-8')
            files = sorted(os.listdir(staging))
        size = sum(os.path.getsize(staging / f) for f in files)
        publish(staging, target, mode)
    except ValueError as e:  # an architecture the Hugging Face layout cannot express, a run without adapters
        fail(f"cannot export {args['out_dir']}: {e}")
    except (OSError, SafetensorError) as e:  # a full disk: export_dir is as it was
        fail(f"could not write the export to {args['export_dir']} ({_reason(e)}): it is as it was; free some space "
             f"or choose another --export_dir")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    what = 'PEFT adapter' if args['adapter_only'] else f"merged {args['dtype']} model"
    print(f"wrote {what} to {args['export_dir']} ({size / 2**20:,.1f} MiB): {', '.join(files)}")
    if args['push_to_hub']:
        repo_id = args['push_to_hub']
        message = args['commit_message'] or f"Upload {what} exported by nanoforge (iter {info.get('iter_num', 0)})"
        try:
            repo_id = push_to_hub(target, files, repo_id, args['private'], args['revision'], message)
        except Exception as e:  # whatever the network or the Hub says: one line, and the export stays as it is
            fail(f"{push_failure(e, repo_id)}; the export in {args['export_dir']} is complete: run again to retry, "
                 f"or upload it with `hf upload {repo_id} {args['export_dir']}`")
        print(f"pushed to {hf.hub().constants.ENDPOINT}/{repo_id}"
              f"{'' if args['revision'] == 'main' else '/tree/' + args['revision']}")


if __name__ == '__main__':
    main(sys.argv[1:])
