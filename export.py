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

Errors a user can cause (no checkpoint, no --export_dir, --adapter_only on a run without adapters) print
one line and exit with status 1.
"""
import json
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch
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
)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'chat_template.jinja', 'generation_config.json', 'vocab.json', 'merges.txt')
# GPT-OSS modules that transformers does not build from nn.Linear: PEFT adapts their parameters instead, and
# wraps several parameters of one module one inside the other, in the module's own parameter order
PARAMETER_MODULES = {'mlp.experts': ('gate_up_proj', 'down_proj'), 'mlp.router': ('weight',)}


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def load_run(path):
    """(model, checkpoint info, meta) of a train.py checkpoint. The model is built on the meta device and takes
    the stored tensors as they are, so a LoRA run's bfloat16 base stays bfloat16: peak memory is one copy."""
    info = checkpoint.read(path)
    if info.get('base'):  # adapters only: the base is rebuilt in the dtype the run trained it in
        return checkpoint.build_model(info).eval(), info, checkpoint.load_meta(info)
    config = checkpoint.model_config(info)
    model = hf.empty_model(GPT, config, device='meta')  # no storage: load_state_dict(assign=True) brings it
    weights = Path(info['dir']) / checkpoint.WEIGHTS
    state = load_file(weights)
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
    (Path(export_dir) / checkpoint.META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + '\n',
                                                     encoding='utf-8')
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
        fail(f"dtype {args['dtype']!r} is not one of {', '.join(devices.DTYPES)}")
    if args['max_shard_gb'] <= 0:
        fail(f"max_shard_gb must be positive, not {args['max_shard_gb']}")
    if checkpoint.find(args['out_dir']) is not None and \
            Path(args['export_dir']).resolve() in (Path(args['out_dir']).resolve(),
                                                   Path(checkpoint.find(args['out_dir'])).resolve()):
        fail("export_dir must not be the run's own out_dir (its config.json and weights would "
             "be overwritten)")
    try:
        model, info, meta = load_run(args['out_dir'])
    except (checkpoint.CheckpointError, TokenizerError) as e:
        fail(str(e))
    origin = info.get('init_from', 'scratch')
    try:
        if args['adapter_only']:
            files = export_adapter(model, origin, args['export_dir'])
        else:
            files = export_merged(model, meta, origin, args['export_dir'], dtype,
                                  int(args['max_shard_gb'] * 2**30))
    except ValueError as e:  # an architecture the Hugging Face layout cannot express, a run without adapters
        fail(f"cannot export {args['out_dir']}: {e}")
    size = sum(os.path.getsize(os.path.join(args['export_dir'], f)) for f in files)
    what = 'PEFT adapter' if args['adapter_only'] else f"merged {args['dtype']} model"
    print(f"wrote {what} to {args['export_dir']} ({size / 2**20:,.1f} MiB): {', '.join(files)}")


if __name__ == '__main__':
    main(sys.argv[1:])
