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
Models larger than one GPU: --parallel=fsdp shards the weights, gradients and optimizer state over the processes
(fsdp.py; checkpoints sharded with torch.distributed.checkpoint, see checkpoint.py), e.g. on 2 nodes of 8 GPUs:
$ torchrun --nproc_per_node=8 --nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT train.py config/... --parallel=fsdp

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

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import devices
import lossplot
import ops
from configurator import apply_overrides
from dataset import DatasetError, open_dataset
from eval import EvalError, check_tasks, evaluate, write_results
from model import GPT
from tokenizer import TokenizerError, load_tokenizer

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
parallel = 'ddp'  # under torchrun: 'ddp' (a whole copy of the model per process) or 'fsdp' (sharded: see fsdp.py)
device = 'auto'  # 'cpu', 'cuda', 'cuda:1', 'mps', or 'auto': cuda when there is one, else mps, else cpu (devices.py)
dtype = 'auto'  # 'float32', 'bfloat16' or 'float16' (with a GradScaler); 'auto': bf16 or fp16 on GPUs, fp32 on CPU
compile = True  # use PyTorch 2.0 to compile the model to be faster
gradient_checkpointing = False  # recompute each block's activations in backward: less memory, ~30% more compute
base_dtype = 'float32'  # LoRA: dtype of the frozen base weights; 'bfloat16' halves their memory (with dtype=bfloat16)
save_base_weights = False  # LoRA: checkpoints hold the adapters and name their base; True: the whole model too
                           # (chosen when a run starts; a resume keeps the kind its checkpoint has)
estimate_only = False  # print this run's memory estimate and exit: from the config alone, no data or weights loaded
estimate_world_size = 0  # parallel='fsdp': the number of processes the estimate plans for (0: this run's)
seed = 1337
# lm-evaluation-harness tasks on the final model (eval.py; pip install -r requirements-eval.txt); '' = off
eval_tasks = ''  # comma-separated task names, e.g. 'hellaswag,lambada_openai'; results in out_dir/eval_results.json
eval_limit = 0.0  # examples per task: 0 = all, < 1 a fraction
eval_include_path = ''  # a folder of task YAML files
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, dict))]
config = apply_overrides(globals(), sys.argv[1:], allowed_keys=config_keys)  # overrides from command line or config file
# -----------------------------------------------------------------------------
# testing aid: NANOFORGE_TEST_NAN_AT=k makes the loss of iteration k NaN, to exercise the non-finite-loss stop
_nan_at = int(os.environ.get('NANOFORGE_TEST_NAN_AT', -1))

ddp = int(os.environ.get('RANK', -1)) != -1  # is this a ddp run? (a torchrun run: DDP, or FSDP if sharded)
rank = int(os.environ.get('RANK', 0))
master_process = rank == 0  # this process will do logging, checkpointing etc.
sharded = ddp and parallel == 'fsdp'  # FSDP: every process holds a shard of the model; all of them save


def fail(message):
    """A mistake the user can fix: one line on stderr (from the master process only), exit status 2."""
    if master_process:
        print(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


try:  # the one device/dtype policy: see devices.py
    device, ptdtype = devices.resolve(device, dtype)
except devices.DeviceError as e:
    fail(str(e))
device_type = torch.device(device).type
dtype = str(ptdtype).removeprefix('torch.')
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
        try:  # a dataset or an exported model there would be overwritten by the run's published files
            checkpoint.check_out_dir(out_dir)
            os.makedirs(out_dir, exist_ok=True)
        except (checkpoint.CheckpointError, OSError) as e:
            fail(str(e) if isinstance(e, checkpoint.CheckpointError) else f"cannot create out_dir {out_dir}: {e}")
torch.manual_seed(seed)  # the same initial weights in every process
torch.set_float32_matmul_precision('high')  # allow tf32 on matmul
torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
base_ptdtype = devices.DTYPES.get(base_dtype)
if base_ptdtype is None:
    fail(f"base_dtype {base_dtype!r} is not one of {', '.join(devices.DTYPES)}")
if base_ptdtype != torch.float32 and ptdtype == torch.float32:  # float32 activations cannot meet 16-bit weights
    fail(f"base_dtype={base_dtype} needs autocast: set dtype={base_dtype} too")
ctx = devices.autocast(device, ptdtype)  # a no-op in float32
if optimizer not in ('adamw', 'muon'):
    fail(f"optimizer {optimizer!r} is not one of adamw, muon")
if parallel not in ('ddp', 'fsdp'):
    fail(f"parallel {parallel!r} is not one of ddp, fsdp")
if parallel == 'fsdp':
    import fsdp  # FSDP and torch.distributed.checkpoint: a second of imports that other runs do without
    if fsdp.unsupported(optimizer, ptdtype):
        fail(fsdp.unsupported(optimizer, ptdtype))
if eval_tasks and master_process and not estimate_only:  # before training: a typo must not cost the run's end
    try:
        check_tasks([t.strip() for t in eval_tasks.split(',') if t.strip()], eval_include_path)
    except EvalError as e:
        fail(str(e))

# -----------------------------------------------------------------------------
# data: flat token streams (train.bin, val.bin) and meta.json, made by data/<dataset>/prepare.py; or chat data for
# supervised fine-tuning (data/chat/prepare.py): fixed rows of row_len tokens plus loss masks (train_mask.bin, ...)
try:  # checked here, before any weight is loaded: see dataset.py
    data_dir, meta, sft_rows = open_dataset(dataset, block_size, estimate_only)
except (DatasetError, TokenizerError) as e:
    fail(str(e))
sft = sft_rows is not None
data_dtype = np.dtype(meta['dtype']) if data_dir else None


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
# model init: the architecture from configs alone, a memory estimate, then the weights (checkpoint.init_model)


def print_memory_estimate(m):
    est = m.memory_estimate(batch_size, block_size, ptdtype, gradient_checkpointing, optimizer)
    procs = estimate_world_size or world_size
    fsdp_estimate = parallel == 'fsdp' and (sharded or estimate_world_size)
    if fsdp_estimate:  # per process: sharded state plus the weights and gradients whole for a while
        est = fsdp.memory_estimate(m, est, procs, gradient_accumulation_steps > procs, ptdtype)
    n_trained = sum(p.numel() for p in m.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in m.parameters())
    if m.config.lora_rank:
        print(f"training {n_trained:,} LoRA adapter parameters, {100 * n_trained / n_all:.3f}% of {n_all:,}")
    else:
        print(f"training all {n_all:,} parameters")
    human = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    how = f"fsdp over {procs} processes" if fsdp_estimate else "whole model"
    print(f"memory estimate (rough, per process, {how}): {', '.join(f'{k} {human(v)}' for k, v in est.items())}; "
          f"total {human(sum(est.values()))} (micro-batch {batch_size} x {block_size} tokens, {dtype}, "
          f"gradient checkpointing {'on' if gradient_checkpointing else 'off'})")


try:
    planned = checkpoint.planned_config(config, meta)
except checkpoint.CheckpointError as e:
    fail(str(e))
if planned.lora_rank == 0 and base_ptdtype != torch.float32:
    fail(f"base_dtype={base_dtype} is for the frozen weights of LoRA runs: add lora_rank to model_overrides, or "
         f"train all weights with base_dtype=float32")
try:
    with torch.device('meta'):  # the estimate builds no weights: shapes and dtypes only
        estimate_model = checkpoint.prepare_for_training(GPT(planned), base_ptdtype, gradient_checkpointing)
except ValueError as e:  # lora_targets that match nothing, or a tied head
    fail(f"model_overrides: {e}")
if master_process:
    print_memory_estimate(estimate_model)
if estimate_only:
    sys.exit(0)

try:  # scratch, resume (checked against this config and dataset), or pretrained weights (+ LoRA adapters)
    if sharded:  # built sharded over the processes: fsdp.py
        raw_model, start = fsdp.init_model(config, meta, planned, device, ptdtype, verbose=master_process)
    else:
        raw_model, start = checkpoint.init_model(config, meta, planned, device, verbose=master_process)
except (checkpoint.CheckpointError, TokenizerError) as e:  # e.g. a resume that does not fit this config
    fail(str(e))
iter_num, best_val_loss, seed = start.iter_num, start.best_val_loss, start.seed  # seed: a resume's data and dropout

# -----------------------------------------------------------------------------
# optimizer(s)


def make_optimizers(m):
    """AdamW for everything (model.configure_optimizers), or Muon for the 2D weights inside the blocks
    (ops.Muon: torch.optim.Muon's update, orthogonalised in float32 on CPUs that multiply bf16 slowly; its lr scaled
    to match AdamW's update size) and AdamW for embeddings, head, norms, biases."""
    if optimizer == 'adamw':
        return [m.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)]
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if m.is_muon_param(n, p)]
    rest = [p for n, p in named if id(p) not in {id(q) for q in hidden}]
    muon = ops.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn='match_rms_adamw')
    groups = [{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}]
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2), fused=device_type in ('cuda', 'cpu'))
    return [muon, adamw]


optimizers = make_optimizers(raw_model)
scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))  # a no-op unless float16
if start.info is not None:  # resume: the optimizer and scaler state the checkpoint holds
    try:
        checkpoint.load_optimizers(start.info, out_dir, optimizer, optimizers, scaler, device, raw_model)
    except checkpoint.CheckpointError as e:
        fail(str(e))

# compile the model, then wrap it for DDP; eval and checkpoints use the unwrapped modules (FSDP: compiled per block)
eval_model = torch.compile(raw_model) if compile and not sharded else raw_model
train_model = DDP(eval_model, device_ids=[local_rank] if device_type == 'cuda' else None,
                  broadcast_buffers=False) if ddp and not sharded else eval_model
devices.peak_flops(device, ptdtype)  # for MFU: measured (and cached) now on CPU, not inside a timed iteration

# -----------------------------------------------------------------------------
# evaluation, learning rate, logging, checkpoints


EVAL_TOKENS = 2**14  # estimate_loss: the most tokens one forward takes when it evaluates several micro-batches


def eval_group(n_batches):
    """How many of n_batches eval micro-batches one forward takes. A flat token stream's micro-batches all hold
    batch_size * block_size targets, so the mean loss of several evaluated together is the mean of their means, and
    small micro-batches go much faster together (fewer, larger matmuls; nanoGPT's CPU recipe evaluates 20 of 768
    tokens: 1 forward instead of 20). At most EVAL_TOKENS tokens (no-grad: one layer's activations at a time) and
    32 MB of logits (more only as one micro-batch's, as before); the largest divisor of n_batches, so that every
    forward has one shape (one compiled graph). Chat data (masked targets: micro-batches count differently) and FSDP
    (every process runs as many forwards, the last batch repeated) take one at a time."""
    tokens = batch_size * block_size
    if sft or sharded:
        return 1
    most = min(EVAL_TOKENS // tokens, 2**25 // (4 * tokens * raw_model.config.vocab_size), n_batches)
    return max(g for g in range(1, max(1, most) + 1) if n_batches % g == 0)


@torch.no_grad()
def estimate_loss():
    """Mean loss over the same eval_iters batches per split at every eval (fixed seeds: comparable across evals,
    and the training stream is untouched); the processes share the batches and average."""
    out = {}
    eval_model.eval()
    # FSDP: every process runs as many forwards (each gathers weights); an uneven split repeats the last batch
    end = -(-eval_iters // world_size) * world_size if sharded else eval_iters
    rows = [min(r, eval_iters - 1) for r in range(rank, end, world_size)]
    group = eval_group(len(rows))
    for split_id, split in enumerate(['train', 'val']):
        X, Y = get_batch(split, (seed, 1 + split_id), eval_iters, rows)
        total = torch.zeros((), device=device)
        for k in range(0, X.size(0), group):
            with ctx:
                _, loss = eval_model(X[k:k + group].flatten(0, 1), Y[k:k + group].flatten(0, 1), return_logits=False)
            if rank + k * world_size < eval_iters:
                total += loss.float() * group
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
plot_time = time.time()  # when the last drawing started: the first comes a minute into the run (one point is no curve)
plot_behind = False  # history.jsonl has evals that loss.png does not show yet
PLOT_SECONDS = 60  # loss.png is redrawn after an eval at most this often, and at the end of the run


def log_record(record):
    history_file.write(json.dumps(record) + '\n')


def plot_losses(last=False):
    """loss.png, drawn from history.jsonl by lossplot.py in a short-lived child process: matplotlib would add
    ~35 MB to this one, and the child draws while training goes on. A drawing costs about a second of CPU, taken
    from training on a small CPU, so evals draw at most once every PLOT_SECONDS; the run's end (finish: last=True)
    draws what the last drawing did not show yet and waits for it."""
    global plotter, plot_time, plot_behind
    plot_behind = True
    if not last and time.time() - plot_time < PLOT_SECONDS:
        return
    if plotter is not None:
        plotter.wait()  # the previous drawing: they would race for loss.png
    title = os.path.basename(os.path.abspath(out_dir))
    plotter = subprocess.Popen([sys.executable, os.path.join(REPO, 'lossplot.py'), history_path, plot_path, title])
    plot_time, plot_behind = time.time(), False


def save_checkpoint():
    """Called by the master process, or under FSDP by every process (each writes its shards)."""
    if master_process:
        print(f"saving checkpoint to {out_dir}")
    info = dict(iter_num=iter_num, best_val_loss=best_val_loss if math.isfinite(best_val_loss) else None, seed=seed,
                init_from=start.origin, train_config=config, **({'base': start.base_ref} if start.base_ref else {}))
    try:
        if sharded:
            checkpoint.save_sharded(out_dir, raw_model, optimizers, info, meta)
        else:
            state = dict(optimizers=[opt.state_dict() for opt in optimizers], scaler=scaler.state_dict())
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
    parts = []
    aux = raw_model.aux_loss.item() if raw_model.aux_loss is not None else None  # set by training forwards only
    if aux is not None and math.isfinite(aux):  # before the first training step there is none yet: say nothing
        parts.append(f"moe aux loss {aux:.4f}")
    routed = load.float().sum(dim=1, keepdim=True)
    if bool((routed > 0).all()):
        share = (load.float() / routed).mean(dim=0).tolist()
        parts.append("expert load (% of routed tokens, mean over layers): " + ' '.join(f"{100 * s:.1f}" for s in share))
    if parts:
        print("  " + ", ".join(parts))


if master_process:  # a resumed run keeps the records before iter_num and redoes the rest
    resumed = init_from == 'resume' and os.path.exists(history_path)
    past = lossplot.read_history(history_path, before=iter_num) if resumed else []
    checkpoint.write_text_atomic(history_path, ''.join(json.dumps(r) + '\n' for r in past))
    history_file = open(history_path, 'a', encoding='utf-8', buffering=1)  # line-buffered: each record lands whole
if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True but wandb is not installed: pip install wandb (or --wandb_log=False)")
    try:
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    except Exception as e:  # no API key (wandb login), no network: wandb's own error types
        fail(f"wandb_log=True but wandb.init failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}): run "
             f"wandb login, or set WANDB_MODE=offline, or --wandb_log=False")

stop_signal = None  # SIGTERM (a cluster's preemption notice, kill) or SIGINT (Ctrl-C) received during the run
stop_signal_time = 0.0


def request_stop(signum, frame):
    """Finish the current iteration, save, and exit (see the end of the loop). A second Ctrl-C a second or more
    after the first stops at once; copies that come together (torchrun forwards the signal its workers also got
    from the terminal or the scheduler) and SIGTERMs only ask again."""
    global stop_signal, stop_signal_time
    if os.getpid() != train_pid:  # a forked helper (lm-eval's bootstrap pool for eval_tasks) inherited this handler:
        signal.signal(signum, signal.SIG_DFL)  # it must end as its parent's terminate() expects, or the join hangs
        os.kill(os.getpid(), signum)
        return
    if signum == signal.SIGINT and stop_signal == signal.SIGINT and time.time() - stop_signal_time > 1.0:
        print("interrupted again: stopping without saving", file=sys.stderr)
        sys.exit(128 + signum)
    if stop_signal is None:
        stop_signal, stop_signal_time = signum, time.time()


def stop_after_signal(signum):
    """Save the state after the finished iteration (resume continues exactly from it) and exit 128 + signal."""
    name = signal.Signals(signum).name
    saved = always_save_checkpoint and iter_num > start_iter
    if saved and (master_process or sharded):
        save_checkpoint()
    if master_process:
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


def run_eval_tasks(model):
    """lm-eval's eval_tasks on the final model (eval.py): the table, and out_dir/eval_results.json."""
    from lm_eval.utils import make_table
    tasks = [t.strip() for t in eval_tasks.split(',') if t.strip()]
    try:
        results = evaluate(model, load_tokenizer(meta), meta, tasks, limit=eval_limit, batch_size=batch_size,
                           include_path=eval_include_path, seed=seed)
    except EvalError as e:
        fail(str(e))
    print(make_table(results))
    print(f"wrote {', '.join(write_results(results, out_dir))}")


def finish():
    if master_process:
        history_file.close()
        if plot_behind:
            plot_losses(last=True)
        if plotter is not None:
            plotter.wait()
        if wandb_log:
            wandb.finish()
    if ddp:
        dist.destroy_process_group()


train_pid = os.getpid()
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
        if iter_num > start_iter and (improved or always_save_checkpoint) and (master_process or sharded) \
                and not eval_only:
            save_checkpoint()
        t0 = time.time()  # evaluation and saving are not iteration time
    if eval_only or iter_num >= max_iters:
        break

    # forward backward update, with optional gradient accumulation to simulate larger batch size
    torch.manual_seed(int(np.random.SeedSequence((seed, rank, iter_num)).generate_state(1)[0]))  # dropout RNG
    X, Y = get_batch('train', (seed, 0, iter_num), gradient_accumulation_steps, micro_steps)
    step_loss = torch.zeros((), device=device)
    for micro_step in range(local_steps):
        if sharded:  # FSDP: likewise, reduce-scatter the gradients only after the last micro step
            train_model.set_requires_gradient_sync(micro_step == local_steps - 1)
        elif ddp:
            # in DDP training we only need to sync gradients at the last micro step.
            train_model.require_backward_grad_sync = (micro_step == local_steps - 1)
        with ctx:
            _, loss = train_model(X[micro_step], Y[micro_step], return_logits=False)
            if local_steps > 1:  # scale the loss to account for gradient accumulation
                loss = loss / local_steps
        if iter_num == _nan_at:
            loss = loss * float('nan')
        step_loss += loss.detach()
        # backward pass, with gradient scaling if training in fp16
        scaler.scale(loss).backward()
    # clip the gradient
    if grad_clip != 0.0:
        for opt in optimizers:
            scaler.unscale_(opt)
        ops.clip_grad_norm(raw_model.parameters(), grad_clip)  # torch.nn.utils.clip_grad_norm_, less work on CPU
    # step the optimizer and scaler if training in fp16
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    window_loss += step_loss
    if sharded and local_iter_num == 0:  # the optimizer state exists now: what this process holds of the whole
        print(fsdp.share_report(rank, raw_model, optimizers))

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

if eval_tasks and not eval_only:
    final_model = fsdp.gather(raw_model) if sharded else raw_model  # FSDP: rank 0 evaluates the whole model
    if master_process:
        run_eval_tasks(final_model.to(device))
finish()