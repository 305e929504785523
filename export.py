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

Errors a user can cause (no checkpoint or a corrupt one, no --export_dir, an export_dir that is a file, cannot be
created, or holds what export.py did not write, --adapter_only on a run without adapters) print one line on
stderr starting "error: " and exit with status 2.
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
)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'chat_template.jinja', 'generation_config.json', 'vocab.json', 'merges.txt')
# GPT-OSS modules that transformers does not build from nn.Linear: PEFT adapts their parameters instead, and
# wraps several parameters of one module one inside the other, in the module's own parameter order
PARAMETER_MODULES = {'mlp.experts': ('gate_up_proj', 'down_proj'), 'mlp.router': ('weight',)}


# what an export folder holds: anything else in an existing export_dir means it is not (only) an earlier export
EXPORT_FILES = {'config.json', 'model.safetensors', 'model.safetensors.index.json', checkpoint.META,
                'adapter_config.json', 'adapter_model.safetensors', *TOKENIZER_FILES}
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


def main(argv):
    args = apply_overrides(dict(DEFAULTS), argv)
    if not args['export_dir']:
        fail("pass --export_dir=DIR: where to write the export")
    dtype = devices.DTYPES.get(args['dtype'])
    if dtype is None:
        fail(f"--dtype {args['dtype']!r} is not one of {', '.join(devices.DTYPES)}")
    if not args['max_shard_gb'] > 0:
        fail(f"--max_shard_gb must be positive, not {args['max_shard_gb']}")
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


if __name__ == '__main__':
    main(sys.argv[1:])
