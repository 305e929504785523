"""
Train a GPT (GPT-2, Gemma 3 or GPT-OSS architecture, see model.py), nanoGPT style.

To run on a single GPU or on CPU:
$ python train.py config/train_shakespeare_char.py --device=cpu --compile=False
To run with DDP on 4 GPUs (or CPU processes, with gloo) on 1 node:
$ torchrun --standalone --nproc_per_node=4 train.py config/train_gpt2.py
To run with DDP on 4 GPUs across 2 nodes, e.g.:
- on the first (master) node with IP 123.456.123.456:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 --master_port=1234 train.py
- on the worker node:
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=1 --master_addr=123.456.123.456 --master_port=1234 train.py
(If your cluster does not have Infiniband interconnect prepend NCCL_IB_DISABLE=1)

A run is a function of its config and seed alone: each global batch (every micro-step of every rank) is drawn
from one generator seeded by (seed, iteration) and each rank trains on its slice, and dropout is reseeded from
(seed, rank, iteration). So the loss curve does not depend on the number of processes, and init_from='resume'
continues exactly where a killed run's checkpoint left off. Checkpoints are crash-safe: see checkpoint.py.

Fine-tuning: chat data from data/chat/prepare.py (rows plus loss masks) makes a run supervised fine-tuning on the
assistant tokens only; init_from a Hugging Face model or another run's out_dir, and model_overrides with lora_rank
for LoRA (config/finetune_*.py), whose checkpoints hold the adapters and name the base they load with.
Every run first prints a rough memory estimate; estimate_only=True stops there.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import hf
from configurator import apply_overrides
from model import GPT, GPTConfig, device_peak_flops, head_loss_rows
from tokenizer import read_meta

REPO = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, script exits right after the first eval
always_save_checkpoint = True  # if True, always save a checkpoint after each eval (else only when val improves)
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir), a Hugging Face name or path ('gpt2', 'gpt2-xl', ...)
# or another run's out_dir: fine-tune that checkpoint (a LoRA run's adapters are merged into it first)
# wandb logging
wandb_log = False  # disabled by default
wandb_project = 'owt'
wandb_run_name = 'gpt2'  # 'run' + str(time.time())
# data
dataset = 'openwebtext'  # data/<dataset>/ made by its prepare.py, or the path of a prepared folder
gradient_accumulation_steps = 5 * 8  # micro-batches per optimizer step, over all processes together
batch_size = 12  # micro-batch size; the global batch is gradient_accumulation_steps * batch_size sequences
block_size = 1024  # training context length (with model='' also the model's)
# model
model = ''  # a GPTConfig preset ('gpt2', 'gemma3-compact', 'gpt-oss-compact', ... see model.py), or '' for:
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # do we use bias inside LayerNorm and Linear layers?
model_overrides = {}  # any GPTConfig field, applied last to every kind of init, e.g. dict(n_kv_head=2, dropout=0.1)
# LoRA: model_overrides=dict(lora_rank=8, lora_alpha=16.0, lora_targets='attn.c_attn,attn.c_proj') trains adapters only
# optimizer
optimizer = 'adamw'  # 'adamw' (fused) or 'muon' (Muon on the hidden weight matrices, AdamW on the rest)
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
backend = 'auto'  # DDP backend: 'nccl' on GPUs, 'gloo' on CPU; 'auto' picks
device = 'auto'  # 'cpu', 'cuda', 'cuda:1', 'mps', or 'auto': cuda when there is one
dtype = 'auto'  # 'float32', 'bfloat16' or 'float16' (with a GradScaler); 'auto': bf16 or fp16 on GPUs, fp32 on CPU
compile = True  # use PyTorch 2.0 to compile the model to be faster
gradient_checkpointing = False  # recompute each block's activations in backward: less memory, ~30% more compute
base_dtype = 'float32'  # LoRA: dtype of the frozen base weights; 'bfloat16' halves their memory (with dtype=bfloat16)
save_base_weights = False  # LoRA: checkpoints hold the adapters and name their base; True: the whole model too
                           # (chosen when a run starts; a resume keeps the kind its checkpoint has)
estimate_only = False  # print this run's memory estimate and exit: from the config alone, no data or weights loaded
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, dict))]
config = apply_overrides(globals(), sys.argv[1:], allowed_keys=config_keys)  # overrides from command line or config file
# -----------------------------------------------------------------------------
# testing aid: NANOFORGE_TEST_NAN_AT=k makes the loss of iteration k NaN, to exercise the non-finite-loss stop
_nan_at = int(os.environ.get('NANOFORGE_TEST_NAN_AT', -1))

ddp = int(os.environ.get('RANK', -1)) != -1  # is this a ddp run?
rank = int(os.environ.get('RANK', 0))
master_process = rank == 0  # this process will do logging, checkpointing etc.


def fail(message):
    """A mistake the user can fix: one line on stderr (from the master process only), exit status 1."""
    if master_process:
        print(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1)


if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = device.split(':')[0]
if device_type == 'cuda' and not torch.cuda.is_available():
    fail(f"device {device!r} is not available (no CUDA GPU): use --device=cpu")
if ddp:
    local_rank, world_size = int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    dist.init_process_group(backend=backend if backend != 'auto' else 'nccl' if device_type == 'cuda' else 'gloo')
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
else:
    world_size = 1
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be a multiple of the number of "
         f"processes ({world_size})")
local_steps = gradient_accumulation_steps // world_size  # this process's share of the micro-steps
micro_steps = slice(rank * local_steps, (rank + 1) * local_steps)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
    if not estimate_only:
        os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)  # the same initial weights in every process
torch.set_float32_matmul_precision('high')  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
if dtype == 'auto':
    dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device_type == 'cuda' else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
if ptdtype is None:
    fail(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
base_ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(base_dtype)
if base_ptdtype is None:
    fail(f"base_dtype {base_dtype!r} is not one of float32, bfloat16, float16")
if base_ptdtype != torch.float32 and ptdtype == torch.float32:  # float32 activations cannot meet 16-bit weights
    fail(f"base_dtype={base_dtype} needs autocast: set dtype={base_dtype} too")
ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)
if optimizer not in ('adamw', 'muon'):
    fail(f"optimizer {optimizer!r} is not one of adamw, muon")

# -----------------------------------------------------------------------------
# data: flat token streams (train.bin, val.bin) and meta.json, made by data/<dataset>/prepare.py; or chat data for
# supervised fine-tuning (data/chat/prepare.py): fixed rows of row_len tokens plus loss masks (train_mask.bin, ...)


def dataset_dir():
    """data/<dataset>, or dataset itself when it is a path."""
    return dataset if os.sep in dataset or '/' in dataset else os.path.join(REPO, 'data', dataset)


def find_data_dir():
    data_dir = dataset_dir()
    is_path = data_dir == dataset
    name = os.path.basename(os.path.normpath(data_dir))
    for file in ('train.bin', 'val.bin', 'meta.json'):
        if not os.path.isfile(os.path.join(data_dir, file)):
            if not os.path.isfile(os.path.join(REPO, 'data', name, 'prepare.py')):
                known = sorted(d for d in os.listdir(os.path.join(REPO, 'data'))
                               if os.path.isfile(os.path.join(REPO, 'data', d, 'prepare.py')))
                fail(f"dataset {dataset!r} has no {file} and there is no data/{name}/prepare.py to make it "
                     f"(datasets: {', '.join(known)})")
            out = f" --out_dir={data_dir}" if is_path else ""
            fail(f"dataset {dataset!r} is not prepared (no {os.path.join(data_dir, file)}): "
                 f"run python data/{name}/prepare.py{out}")
    return data_dir


def trained_rows(split):
    """Chat data: the rows with at least one trained target (a row of prompt or padding only would give a
    micro-batch nothing to learn, and a 0/0 loss), checked against meta.json."""
    row_len = meta.get('row_len')
    if not row_len:
        fail(f"dataset {dataset!r} has {split}_mask.bin but its meta.json has no row_len: re-run data/chat/prepare.py")
    if block_size + 1 != row_len:
        fail(f"dataset {dataset!r} holds rows of {row_len} tokens (prepared with --block_size={row_len - 1}): set "
             f"block_size={row_len - 1}, or prepare it again with --block_size={block_size}")
    tokens, mask = (os.path.join(data_dir, f'{split}{suffix}.bin') for suffix in ('', '_mask'))
    if not os.path.isfile(mask):
        fail(f"dataset {dataset!r} has train_mask.bin but no {split}_mask.bin: re-run data/chat/prepare.py")
    n_tokens = os.path.getsize(tokens) // data_dtype.itemsize
    if n_tokens % row_len or os.path.getsize(mask) != n_tokens:
        fail(f"{split}.bin and {split}_mask.bin of {dataset!r} are not rows of {row_len} tokens with one mask byte "
             f"each: re-run data/chat/prepare.py")
    rows = np.flatnonzero(np.memmap(mask, dtype=np.uint8, mode='r').reshape(-1, row_len)[:, 1:].any(axis=1))
    if len(rows) == 0:
        fail(f"{split} of {dataset!r} has no assistant tokens to train on")
    return rows


data_dir = None if estimate_only else find_data_dir()
meta = read_meta(data_dir) if data_dir else {}
if estimate_only and os.path.isfile(os.path.join(dataset_dir(), 'meta.json')):
    meta = read_meta(dataset_dir())  # no data is read, but a prepared dataset's meta.json still sizes the vocabulary
sft = bool(data_dir) and os.path.isfile(os.path.join(data_dir, 'train_mask.bin'))
if data_dir:
    data_dtype = np.dtype(meta['dtype'])
    sft_rows = {split: trained_rows(split) for split in ('train', 'val')} if sft else None
    for split in ('train', 'val'):
        n_tokens = os.path.getsize(os.path.join(data_dir, f'{split}.bin')) // data_dtype.itemsize
        if n_tokens <= block_size:
            fail(f"{split}.bin of {dataset!r} has {n_tokens} tokens, fewer than block_size + 1 ({block_size + 1})")


def get_batch(split, key, n, rows):
    """Inputs and targets (len(rows), batch_size, block_size) of micro-batches `rows` out of n micro-batches
    drawn from one generator seeded by `key`: every process draws the same offsets and keeps its own rows.
    Chat data: whole rows, and targets outside the loss mask (prompts, padding) are -1, which the loss skips."""
    # we recreate np.memmap every batch to avoid a memory leak, as per
    # https://stackoverflow.com/questions/45132940/numpy-memmap-memory-usage-want-to-iterate-once/61472122#61472122
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=data_dtype, mode='r')
    if sft:
        data = data.reshape(-1, block_size + 1)
        ix = sft_rows[split][np.random.default_rng(key).integers(len(sft_rows[split]), size=(n, batch_size))[rows]]
        xy = torch.from_numpy(data[ix].astype(np.int64))
        mask = np.memmap(os.path.join(data_dir, f'{split}_mask.bin'), dtype=np.uint8, mode='r')
        trained = torch.from_numpy(mask.reshape(-1, block_size + 1)[ix][..., 1:] == 1)
        return to_device(xy[..., :-1]), to_device(xy[..., 1:].masked_fill(~trained, -1))
    ix = np.random.default_rng(key).integers(len(data) - block_size, size=(n, batch_size))[rows]
    xy = to_device(torch.from_numpy(data[ix[..., None] + np.arange(block_size + 1)].astype(np.int64)))
    return xy[..., :-1], xy[..., 1:]


def to_device(t):
    if device_type == 'cuda':  # pin arrays, which allows us to move them to GPU asynchronously (non_blocking=True)
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# -----------------------------------------------------------------------------
# model init


def requested_config():
    """The architecture this config asks for: a preset or the n_layer/... knobs, then model_overrides."""
    if model:
        try:
            base = GPTConfig.preset(model).to_dict()
        except ValueError as e:
            fail(f"model: {e}")
    else:
        base = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, dropout=dropout,
                    qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias, norm_bias=bias,
                    gelu_approx='none')  # nanoGPT's model: exact GELU (nn.GELU), as its recipes were trained
    vocab = {'vocab_size': meta['vocab_size']} if meta else {}  # no prepared dataset (estimate_only): the preset's
    return make_config({**base, **vocab, **checked_overrides()})


def checked_overrides():
    """model_overrides, each key a GPTConfig field and each value of that field's type."""
    types = {f.name: f.type for f in fields(GPTConfig)}
    for key, value in model_overrides.items():
        if key not in types:
            fail(f"model_overrides: {key!r} is not a GPTConfig field (see model.py)")
        kind = types[key]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (kind is not bool and isinstance(value, bool)):
            fail(f"model_overrides: {key} must be {kind.__name__}, got {value!r}")
    return model_overrides


LORA_DEFAULTS = {f.name: f.default for f in fields(GPTConfig) if f.name.startswith('lora_')}


def lora_settings():
    """The adapters model_overrides asks for (every lora_* field, unset ones at their defaults), or {} for none."""
    asked = {k: v for k, v in checked_overrides().items() if k in LORA_DEFAULTS}
    return {**LORA_DEFAULTS, **asked} if asked.get('lora_rank') else {}


def base_overrides():
    return {k: v for k, v in checked_overrides().items() if k not in LORA_DEFAULTS}


def make_config(d):
    try:
        return GPTConfig(**d)
    except (AssertionError, TypeError, ValueError) as e:
        fail(f"invalid model config: {e}")


def hf_config(name_or_path):
    """The GPTConfig of a Hugging Face checkpoint from its config.json alone (a hub id downloads just that file)."""
    path = os.path.join(name_or_path, 'config.json')
    if not os.path.isdir(name_or_path):
        try:
            path = hf.hub().hf_hub_download(name_or_path, 'config.json')
        except Exception as e:  # offline, a wrong name, a gated model: several kinds
            reason = (str(e).strip().splitlines() or [''])[0]
            raise OSError(f"no local directory of that name, and no config.json from the Hugging Face Hub "
                          f"({type(e).__name__}: {reason})") from None
    with open(path, encoding='utf-8') as f:
        return hf.config_from_hf(json.load(f))


def planned_config():
    """The architecture this run trains, read from configs alone (no weights): for the memory estimate."""
    try:
        if init_from == 'scratch':
            return requested_config()
        if init_from == 'resume':
            return checkpoint.model_config(checkpoint.read(out_dir))
        if checkpoint.find(init_from) is not None:  # another run's out_dir; its own adapters get merged
            base = checkpoint.model_config(checkpoint.read(init_from)).to_dict()
        else:
            base = hf_config(init_from).to_dict()
    except checkpoint.CheckpointError as e:
        fail(str(e))
    except (OSError, ValueError) as e:
        fail(f"init_from={init_from!r}: {e}")
    return make_config({**base, 'lora_rank': 0, **base_overrides(), **lora_settings()})


def prepare_for_training(m):
    """LoRA trains the adapters only, and their frozen base may be stored in base_dtype (also on the meta device)."""
    if m.config.lora_rank:
        for name, p in m.named_parameters():
            p.requires_grad_('lora' in name)
            if 'lora' not in name:
                p.data = p.data.to(base_ptdtype)
    m.gradient_checkpointing = gradient_checkpointing
    return m


def is_muon_param(name, p):
    """optimizer='muon': the 2D weights inside the blocks (not the router); AdamW takes the rest."""
    return p.dim() == 2 and name.startswith('transformer.h.') and '.router.' not in name


def memory_estimate(m):
    """Rough device memory of this run per process, in bytes: weights, gradients, optimizer state, and the
    activations of one micro-batch (the peak comes in its backward pass). Reads only shapes, dtypes and
    requires_grad, so m may live on the meta device: estimate_only builds nothing else."""
    named = list(m.named_parameters())  # each shared (tied) parameter once
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    trained = [(n, p) for n, p in named if p.requires_grad]
    momentum_only = [p for n, p in trained if optimizer == 'muon' and is_muon_param(n, p)]
    return dict(weights=size(p for _, p in named), gradients=size(p for _, p in trained),
                optimizer=2 * size(p for _, p in trained) - size(momentum_only),  # AdamW: 2 moments, Muon: 1
                activations=activation_bytes(m.config, m.chunked_head_loss(batch_size * block_size, ptdtype)))


def activation_bytes(cfg, chunked_head):
    """Activations kept for backward in one micro-batch, counted per token and layer from what a block saves:
    norm and projection inputs, q/k/v (GQA's repeated k/v too) and the attention output, the MLP's (or the top-k
    experts') hidden states. Gradient checkpointing keeps each block's input and recomputes one block at a time.
    Fused (GPU) attention is assumed: no T x T scores, except the additive mask attention sinks need. The logits
    come on top: whole, with their float32 log-probabilities and gradients, where GPT.chunked_head_loss says no;
    else one chunk of model.head_loss's rows at a time (float32 logits turned softmax in place, their gradient in
    the compute dtype, the tanh of a softcap)."""
    a = 4 if ptdtype == torch.float32 else 2  # bytes per activation: autocast computes in 16 bits
    tokens = batch_size * block_size
    C, q, kv, hidden = cfg.n_embd, cfg.n_head * cfg.hd, cfg.kv_heads * cfg.hd, cfg.hidden
    attn = 2 * C + 3 * q + 2 * kv + (2 * q if kv != q else 0)
    if cfg.n_expert:  # each token's rows through gate_up, the clamped SwiGLU's intermediates, down, weighting
        mlp = 2 * C + cfg.n_expert_active * (2 * C + 7 * hidden)
    else:  # c_fc's output and the activation's; gated: [gate | up], act(gate) and the product
        mlp = 2 * C + (2 if cfg.mlp == 'gelu' else 4) * hidden
    block = tokens * (attn + mlp + (2 * C if cfg.sandwich_norm else 0)) * a
    if cfg.attn_sinks:
        block += cfg.n_head * block_size * (block_size + 1) * a
    blocks = cfg.n_layer * tokens * C * a + block if gradient_checkpointing else cfg.n_layer * block
    if not chunked_head:
        return blocks + tokens * cfg.vocab_size * (a + 12)
    rows = min(tokens, head_loss_rows(cfg.vocab_size))
    return blocks + rows * cfg.vocab_size * (4 + a + (8 if cfg.logit_softcap else 0))


def print_memory_estimate(m):
    est = memory_estimate(m)
    n_trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in m.parameters())
    if m.config.lora_rank:
        print(f"training {n_trained:,} LoRA adapter parameters, {100 * n_trained / n_all:.3f}% of {n_all:,}")
    else:
        print(f"training all {n_all:,} parameters")
    human = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"memory estimate (rough, per process): {', '.join(f'{k} {human(v)}' for k, v in est.items())}; "
          f"total {human(sum(est.values()))} (micro-batch {batch_size} x {block_size} tokens, {dtype}, "
          f"gradient checkpointing {'on' if gradient_checkpointing else 'off'})")


planned = planned_config()
if planned.lora_rank == 0 and base_ptdtype != torch.float32:
    fail(f"base_dtype={base_dtype} is for the frozen weights of LoRA runs: add lora_rank to model_overrides, or "
         f"train all weights with base_dtype=float32")
try:
    with torch.device('meta'):  # the estimate builds no weights: shapes and dtypes only
        estimate_model = prepare_for_training(GPT(planned))
except ValueError as e:  # lora_targets that match nothing, or a tied head
    fail(f"model_overrides: {e}")
if master_process:
    print_memory_estimate(estimate_model)
if estimate_only:
    sys.exit(0)


def check_init_vocab():
    """init_from a pretrained model: its tokenizer must be the dataset's (checked before any weight is loaded)."""
    if checkpoint.find(init_from) is not None:
        try:
            init_meta = checkpoint.load_meta(checkpoint.read(init_from))
        except checkpoint.CheckpointError as e:
            fail(str(e))
        if any(init_meta.get(k) != meta.get(k) for k in ('tokenizer', 'vocab_size', 'chars')):
            fail(f"vocab mismatch: the checkpoint in {init_from} was trained on tokenizer "
                 f"{init_meta.get('tokenizer')!r} ({init_meta.get('vocab_size')} tokens), dataset {dataset!r} uses "
                 f"{meta['tokenizer']!r} ({meta['vocab_size']} tokens): prepare the dataset with the checkpoint's "
                 f"tokenizer (for 'char': the same characters)")
        return
    want = checkpoint.hf_tokenizer(planned)  # None for Gemma: its tokenizer is not one of ours
    if os.path.isfile(os.path.join(init_from, checkpoint.META)):  # export.py's output names its tokenizer
        want = read_meta(init_from)['tokenizer']
    if want and meta['tokenizer'] != want:
        fail(f"{init_from} was trained with tokenizer {want!r} but dataset {dataset!r} uses {meta['tokenizer']!r}: "
             f"pick a dataset tokenized with {want!r}")


iter_num = 0
best_val_loss = float('inf')
origin = init_from  # 'scratch', or the Hugging Face model or out_dir the weights came from, kept through resumes
base_ref = None  # LoRA on a pretrained model: checkpoints hold the adapters and this reference to their base
ckpt_info = None
if init_from == 'scratch':
    if master_process:
        print("Initializing a new model from scratch")
    raw_model = GPT(planned)
elif init_from == 'resume':
    if master_process:
        print(f"Resuming training from {out_dir}")
    try:
        ckpt_info = checkpoint.read(out_dir)
        ckpt_config = checkpoint.model_config(ckpt_info)
        ckpt_meta = checkpoint.load_meta(ckpt_info)
    except checkpoint.CheckpointError as e:
        fail(str(e))
    origin, base_ref = ckpt_info.get('init_from', 'scratch'), ckpt_info.get('base')
    if (ckpt_meta.get('tokenizer'), ckpt_meta.get('vocab_size')) != (meta['tokenizer'], meta['vocab_size']):
        fail(f"vocab mismatch: the checkpoint in {out_dir} was trained on tokenizer {ckpt_meta.get('tokenizer')!r} "
             f"({ckpt_meta.get('vocab_size')} tokens), dataset {dataset!r} uses {meta['tokenizer']!r} "
             f"({meta['vocab_size']} tokens): resume with the checkpoint's dataset")
    resume_overrides = {}
    if origin == 'scratch':  # the checkpoint's architecture must be the one this config asks for
        asked = requested_config()
        diff = [f"{f.name}={getattr(ckpt_config, f.name)!r} (config asks {getattr(asked, f.name)!r})"
                for f in fields(GPTConfig) if f.name != 'dropout'
                and getattr(ckpt_config, f.name) != getattr(asked, f.name)]
        if diff:
            fail(f"architecture mismatch: the checkpoint in {out_dir} has {', '.join(diff)}: resume with the "
                 f"settings it was trained with")
        resume_overrides = {'dropout': asked.dropout}
    try:  # built on the meta device and filled: no random init for the checkpoint to overwrite
        raw_model = checkpoint.build_model(ckpt_info, **resume_overrides)
    except checkpoint.CheckpointError as e:
        fail(str(e))
    iter_num = ckpt_info['iter_num']
    best_val_loss = ckpt_info['best_val_loss'] if ckpt_info['best_val_loss'] is not None else float('inf')
    seed = ckpt_info['seed']  # continue the checkpoint's data stream and dropout RNG
else:
    check_init_vocab()
    if os.path.exists(init_from):  # a path, kept absolute so the checkpoints find their base from anywhere
        origin = os.path.abspath(init_from)
    base_spec = dict(init_from=origin, dtype=base_dtype, overrides=base_overrides())
    if master_process:
        print(f"Initializing from {'the checkpoint in' if checkpoint.find(init_from) else 'Hugging Face weights:'} "
              f"{init_from}")
    try:  # a Hugging Face base loads straight into base_dtype; an out_dir's own adapters are merged
        raw_model = checkpoint.load_base(base_spec, device)
    except checkpoint.CheckpointError as e:
        fail(str(e))
    except (OSError, ValueError) as e:
        fail(f"init_from={init_from!r}: {e}")
    if planned.lora_rank:
        raw_model.add_lora(**lora_settings())
        if not save_base_weights:
            base_ref = {**base_spec, 'fingerprint': checkpoint.fingerprint(raw_model)}
if meta['vocab_size'] > raw_model.config.vocab_size:
    fail(f"vocab mismatch: dataset {dataset!r} has {meta['vocab_size']} tokens, the model only "
         f"{raw_model.config.vocab_size}")
if block_size > raw_model.config.block_size:
    fail(f"block_size {block_size} is longer than the model's block_size {raw_model.config.block_size}")
prepare_for_training(raw_model).to(device)

# -----------------------------------------------------------------------------
# optimizer(s)


def make_optimizers(m):
    """AdamW for everything (model.configure_optimizers), or Muon for the 2D weights inside the blocks
    (torch.optim.Muon, its lr scaled to match AdamW's update size) and AdamW for embeddings, head, norms, biases."""
    if optimizer == 'adamw':
        return [m.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)]
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if is_muon_param(n, p)]
    rest = [p for n, p in named if id(p) not in {id(q) for q in hidden}]
    muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn='match_rms_adamw')
    groups = [{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}]
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type in ('cuda', 'cpu'))
    return [muon, adamw]


optimizers = make_optimizers(raw_model)
scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))  # a no-op unless float16
if ckpt_info is not None:
    trained_with = ckpt_info['train_config'].get('optimizer')
    if trained_with != optimizer:
        fail(f"the checkpoint in {out_dir} was trained with optimizer={trained_with!r}, this run asks "
             f"{optimizer!r}: resume with the same optimizer")
    try:
        state = checkpoint.load_train_state(ckpt_info, device)
        for opt, opt_state in zip(optimizers, state['optimizers'], strict=True):
            opt.load_state_dict(opt_state)
        scaler.load_state_dict(state['scaler'])
    except checkpoint.CheckpointError as e:
        fail(str(e))
    except (KeyError, ValueError, RuntimeError) as e:
        fail(f"{ckpt_info['dir']}/{checkpoint.TRAIN_STATE} does not fit this model and optimizer ({e})")
    state = None  # free up memory

# compile the model, then wrap it for DDP; eval and checkpoints use the unwrapped modules
eval_model = torch.compile(raw_model) if compile else raw_model
train_model = DDP(eval_model, device_ids=[local_rank] if device_type == 'cuda' else None,
                  broadcast_buffers=False) if ddp else eval_model
device_peak_flops(device, ptdtype)  # for MFU: measured (and cached) now on CPU, not inside a timed iteration

# -----------------------------------------------------------------------------
# evaluation, learning rate, logging, checkpoints


@torch.no_grad()
def estimate_loss():
    """Mean loss over the same eval_iters batches per split at every eval (fixed seeds: comparable across evals,
    and the training stream is untouched); the processes share the batches and average."""
    out = {}
    eval_model.eval()
    for split_id, split in enumerate(['train', 'val']):
        X, Y = get_batch(split, (seed, 1 + split_id), eval_iters, slice(rank, None, world_size))
        total = torch.zeros((), device=device)
        for k in range(X.size(0)):
            with ctx:
                _, loss = eval_model(X[k], Y[k], return_logits=False)
            total += loss.float()
        if ddp:
            dist.all_reduce(total)
        out[split] = total.item() / eval_iters
    eval_model.train()
    return out


def get_lr(it):
    """Learning rate decay scheduler (cosine with warmup)."""
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if it > lr_decay_iters or lr_decay_iters <= warmup_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


history_path = os.path.join(out_dir, 'history.jsonl')  # one JSON object per log line and per eval
plot_path = os.path.join(out_dir, 'loss.png')
plotter = None  # the child process drawing loss.png


def read_history():
    """Past records before iter_num (a resumed run redoes the rest); a line cut by a crash is skipped."""
    records = []
    if init_from == 'resume' and os.path.exists(history_path):
        with open(history_path, encoding='utf-8') as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get('iter', math.inf) < iter_num:
                    records.append(record)
    return records


def log_record(record):
    history_file.write(json.dumps(record) + '\n')


# loss.png (train and val loss against iteration) is drawn from history.jsonl by a short-lived child process:
# matplotlib would add ~35 MB to this one, and the child draws while training goes on
PLOT_SCRIPT = """
import json, os, sys
history_path, plot_path, title = sys.argv[1:]
try:
    import matplotlib
except ImportError:
    print('warning: matplotlib is not installed, so no loss.png: pip install matplotlib', file=sys.stderr)
    sys.exit()
matplotlib.use('Agg')
import matplotlib.pyplot as plt
history = []
for line in open(history_path, encoding='utf-8'):
    try:
        history.append(json.loads(line))
    except ValueError:  # a line being written right now
        pass
train = [(r['iter'], r['loss']) for r in history if 'loss' in r]
evals = [r for r in history if 'val_loss' in r]
fig, ax = plt.subplots(figsize=(8, 5))
if train:
    ax.plot(*zip(*train), color='tab:blue', alpha=0.35, lw=1, label='train (batch)')
ax.plot([r['iter'] for r in evals], [r['train_loss'] for r in evals], 'o-', color='tab:blue', label='train')
ax.plot([r['iter'] for r in evals], [r['val_loss'] for r in evals], 'o-', color='tab:orange', label='val')
ax.set(xlabel='iteration', ylabel='loss', title=title)
ax.grid(alpha=0.3)
ax.legend()
fig.savefig(plot_path + '.tmp.png', dpi=100)
os.replace(plot_path + '.tmp.png', plot_path)
"""


def plot_losses():
    global plotter
    if plotter is not None:
        plotter.wait()  # the previous drawing: they would race for loss.png
    title = os.path.basename(os.path.abspath(out_dir))
    plotter = subprocess.Popen([sys.executable, '-c', PLOT_SCRIPT, history_path, plot_path, title])


def save_checkpoint():
    print(f"saving checkpoint to {out_dir}")
    info = dict(iter_num=iter_num, best_val_loss=best_val_loss if math.isfinite(best_val_loss) else None,
                seed=seed, init_from=origin, train_config=config, **({'base': base_ref} if base_ref else {}))
    state = dict(optimizers=[opt.state_dict() for opt in optimizers], scaler=scaler.state_dict())
    try:
        checkpoint.save(out_dir, raw_model, info, meta, state)
    except checkpoint.CheckpointError as e:  # a full disk, a lost mount: stop rather than train on without a way back
        last = checkpoint.find(out_dir)
        kept = f"the last complete checkpoint is {last}" if last else "no checkpoint was saved before"
        fail(f"iter {iter_num}: {e}; {kept}: make room and continue with --init_from=resume")


def stop_if_not_finite(what, value):
    """A NaN/inf loss ends the run; the last checkpoint, saved before it, stays as it is."""
    if not math.isfinite(value):
        last = checkpoint.find(out_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
        fail(f"{what} is {value} at iter {iter_num}: stopping ({kept}); try a lower learning_rate, grad_clip, "
             f"or dtype=bfloat16/float32")


def print_moe_stats():
    """Mixture-of-experts health at eval: the load-balancing loss and each expert's share of the routed tokens."""
    load = raw_model.expert_load()
    if load is None:
        return
    share = (load.float() / load.sum(dim=1, keepdim=True)).mean(dim=0).tolist()
    aux = raw_model.aux_loss.item() if raw_model.aux_loss is not None else float('nan')
    print(f"  moe aux loss {aux:.4f}, expert load (% of routed tokens, mean over layers): "
          + ' '.join(f"{100 * s:.1f}" for s in share))


if master_process:
    checkpoint.write_text_atomic(history_path, ''.join(json.dumps(r) + '\n' for r in read_history()))
    history_file = open(history_path, 'a', encoding='utf-8', buffering=1)  # line-buffered: each record lands whole
if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True but wandb is not installed: pip install wandb (or --wandb_log=False)")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

stop_signal = None  # SIGTERM (a cluster's preemption notice, kill) or SIGINT (Ctrl-C) received during the run
stop_signal_time = 0.0


def request_stop(signum, frame):
    """Finish the current iteration, save, and exit (see the end of the loop). A second Ctrl-C a second or more
    after the first stops at once; copies that come together (torchrun forwards the signal its workers also got
    from the terminal or the scheduler) and SIGTERMs only ask again."""
    global stop_signal, stop_signal_time
    if signum == signal.SIGINT and stop_signal == signal.SIGINT and time.time() - stop_signal_time > 1.0:
        print("interrupted again: stopping without saving", file=sys.stderr)
        sys.exit(128 + signum)
    if stop_signal is None:
        stop_signal, stop_signal_time = signum, time.time()


def stop_after_signal(signum):
    """Save the state after the finished iteration (resume continues exactly from it) and exit 128 + signal."""
    name = signal.Signals(signum).name
    if master_process:
        saved = always_save_checkpoint and iter_num > start_iter
        if saved:
            save_checkpoint()
        try:
            resume = f"--init_from=resume continues from iter {checkpoint.read(out_dir)['iter_num']}"
        except checkpoint.CheckpointError as e:
            resume = str(e)
        why = "" if saved or iter_num == start_iter else " (always_save_checkpoint=False: the best-val one is kept)"
        print(f"stopped by {name} after iter {iter_num - 1}: {resume}{why}")
    if ddp:
        dist.barrier()  # the others wait for the save: torchrun ends every process once one has exited
    finish()
    sys.exit(128 + signum)


def finish():
    if master_process:
        history_file.close()
        if plotter is not None:
            plotter.wait()
        if wandb_log:
            wandb.finish()
    if ddp:
        dist.destroy_process_group()


for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, request_stop)

# -----------------------------------------------------------------------------
# training loop
start_iter = iter_num  # a checkpoint already holds this state: saving it again would change nothing
t0 = time.time()
local_iter_num = 0  # number of iterations in the lifetime of this process
running_mfu = -1.0
window_loss = torch.zeros((), device=device)  # losses summed since the last log: NaN/inf anywhere stays visible
ddp_stop_signal = 0  # a stop signal that the processes agreed on at the last log (DDP)
while True:

    # determine and set the learning rate for this iteration
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for opt in optimizers:
        for param_group in opt.param_groups:
            param_group['lr'] = lr

    # evaluate the loss on train/val sets and write checkpoints; also after the last step
    if iter_num % eval_interval == 0 or iter_num >= max_iters:
        losses = estimate_loss()
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            print_moe_stats()
            log_record(dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'], lr=lr))
            plot_losses()
            if wandb_log:
                wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'], "lr": lr,
                           "mfu": running_mfu * 100})
        stop_if_not_finite('val loss', losses['val'])
        stop_if_not_finite('train loss', losses['train'])
        improved = losses['val'] < best_val_loss
        if improved:
            best_val_loss = losses['val']
        if iter_num > start_iter and (improved or always_save_checkpoint) and master_process and not eval_only:
            save_checkpoint()
        t0 = time.time()  # evaluation and saving are not iteration time
    if eval_only or iter_num >= max_iters:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    torch.manual_seed(int(np.random.SeedSequence((seed, rank, iter_num)).generate_state(1)[0]))  # dropout RNG
    X, Y = get_batch('train', (seed, 0, iter_num), gradient_accumulation_steps, micro_steps)
    step_loss = torch.zeros((), device=device)
    for micro_step in range(local_steps):
        if ddp:
            # in DDP training we only need to sync gradients at the last micro step.
            train_model.require_backward_grad_sync = (micro_step == local_steps - 1)
        with ctx:
            _, loss = train_model(X[micro_step], Y[micro_step], return_logits=False)
            loss = loss / local_steps  # scale the loss to account for gradient accumulation
        if iter_num == _nan_at:
            loss = loss * float('nan')
        step_loss += loss.detach()
        # backward pass, with gradient scaling if training in fp16
        scaler.scale(loss).backward()
    # clip the gradient
    if grad_clip != 0.0:
        for opt in optimizers:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    # step the optimizer and scaler if training in fp16
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    window_loss += step_loss

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0:
        # the one CPU-GPU sync per log: this step's loss and the window's, averaged over the processes
        stats = torch.stack([step_loss, window_loss])
        if ddp:
            dist.all_reduce(stats)
            stats /= world_size
            signalled = torch.tensor(stop_signal or 0, device=device)
            dist.all_reduce(signalled, op=dist.ReduceOp.MAX)  # one process signalled: all stop after this iteration
            ddp_stop_signal = int(signalled.item())
        lossf, window = stats.tolist()
        stop_if_not_finite('training loss', window)
        window_loss.zero_()
        if local_iter_num >= 5:  # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(tokens_per_iter / world_size, dt, device, ptdtype)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        if master_process:
            print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms, "
                  f"{tokens_per_iter / dt:,.0f} tok/s, mfu {running_mfu * 100:.2f}%")
            log_record(dict(iter=iter_num, loss=lossf, lr=lr, ms=dt * 1000, tok_s=tokens_per_iter / dt,
                            mfu=running_mfu))
    iter_num += 1
    local_iter_num += 1
    signum = ddp_stop_signal if ddp else stop_signal
    if signum:
        stop_after_signal(signum)

finish()
