"""
FSDP for train.py (parallel='fsdp' under torchrun): PyTorch's fully_shard (FSDP2) over each Block and then the
root, so every process holds 1/N of the weights, gradients and AdamW state, and gathers one block's weights at a
time (plus the root's: embeddings, final norm, head) to compute.

- Mixed precision: in bfloat16 (dtype=bfloat16) the weights are gathered and computed in bf16, the gradients
  reduce-scattered in float32 onto float32 shards (MixedPrecisionPolicy); in float32 all of it is float32.
- The sharded model is built on the meta device and given storage for its shards only (no GPU ever holds it
  whole): rank 0 builds the run's model as a single process would (the same random init, pretrained weights,
  LoRA adapters: checkpoint.init_model) on its CPU, and every process gets its shards of it by broadcast, tensor
  by tensor; a resume of a sharded checkpoint reads each process's shards straight from it
  (checkpoint.load_sharded_weights), nothing whole anywhere.
- compile=True compiles each block (in place: the weights keep their names).
- Checkpoints: checkpoint.save_sharded (DCP, safetensors), read back on any number of processes.

Not here: Muon (it orthogonalises whole matrices, which no process holds) and float16 (train.py's loss scaling
is not wired for sharded gradients): both are a one-line error in train.py.
"""
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import checkpoint
import hf
from model import GPT, GPTConfig
from tokenizer import TokenizerError


def unsupported(optimizer, dtype):
    """Why this config cannot train with FSDP, or None."""
    if optimizer == 'muon':
        return ("optimizer=muon needs whole weight matrices, which parallel=fsdp shards over the processes: use "
                "optimizer=adamw, or parallel=ddp")
    if dtype == torch.float16:
        return "parallel=fsdp trains in bfloat16 or float32, not float16: set dtype=bfloat16 (or float32)"
    return None


def shard(model, dtype=torch.float32, compile=False):
    """fully_shard each block, then the root (embeddings, final norm, head); compile=True compiles each block."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for block in model.transformer.h:
        if compile:
            block.compile()
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _sharded_skeleton(config, model_config, device, dtype):
    """The model of model_config built on the meta device, sharded, then given (uninitialised) storage for this
    process's shards on device."""
    with torch.device('meta'):
        model = checkpoint.prepare_for_training(GPT(model_config), getattr(torch, config['base_dtype']),
                                                config['gradient_checkpointing'])
    shard(model, dtype, config['compile'])
    model.to_empty(device=device)
    if model_config.tie_embeddings:  # to_empty gives each module its own tensor: tie them again
        model.lm_head.weight = model.transformer.wte.weight
    return model


def init_model(config, meta, planned, device, dtype, verbose=True):
    """(the model, sharded over the processes with its weights in place; checkpoint.Start): checkpoint.init_model
    for FSDP. Collective: every process calls it; an error (CheckpointError) is raised on every process."""
    rank = dist.get_rank()
    if config['init_from'] == 'resume':
        info = checkpoint.read(config['out_dir'])  # the same files for every process: the same errors
        if checkpoint.is_sharded(info) and not info.get('base'):  # every process reads its own shards
            info, overrides, start = checkpoint.resume_point(config, meta, verbose and rank == 0)
            model_config = checkpoint.model_config(info, **overrides)
            checkpoint.check_fits(config, meta, model_config)
            model = _sharded_skeleton(config, model_config, device, dtype)
            return checkpoint.load_sharded_weights(model, info), start
    whole, shared = None, [None]
    if rank == 0:  # the model as one process builds it; the others wait for its config
        try:
            whole, start = checkpoint.init_model(config, meta, planned, 'cpu', verbose)
            shared = [(whole.config.to_dict(), start)]
        except (checkpoint.CheckpointError, TokenizerError) as e:
            shared = [str(e)]
    dist.broadcast_object_list(shared, src=0)
    if isinstance(shared[0], str):
        raise checkpoint.CheckpointError(shared[0])
    model_config, start = shared[0]
    model = _sharded_skeleton(config, GPTConfig.from_dict(model_config), device, dtype)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # tensor by tensor
    set_model_state_dict(model, whole.state_dict() if rank == 0 else {}, options=options)
    return model, start


def gather(model):
    """The whole model, on rank 0's CPU (None on the others), e.g. to evaluate it there; collective."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    whole = hf.empty_model(GPT, GPTConfig.from_dict(model.config.to_dict()))
    whole.load_state_dict(state)
    return whole.eval()


def local_share(model, optimizers):
    """(bytes this process holds, bytes of the whole) of the parameters and the optimizer state, measured from the
    tensors: a DTensor's local shard against its global shape; plain tensors (AdamW's step counts) count whole."""
    def sizes(t):
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size(), t.numel() * t.element_size()
    tensors = list(model.parameters()) + [v for opt in optimizers for state in opt.state.values()
                                          for v in state.values() if torch.is_tensor(v)]
    pairs = [sizes(t) for t in tensors]
    return sum(a for a, _ in pairs), sum(b for _, b in pairs)


def share_report(rank, model, optimizers):
    held, whole = local_share(model, optimizers)
    return (f"rank {rank}: holds {held / 2**20:.2f} MiB of parameters and optimizer state, "
            f"{100 * held / whole:.1f}% of the whole {whole / 2**20:.2f} MiB")


def memory_estimate(model, est, world_size, accumulating, dtype):
    """model.memory_estimate's terms (est) per process under FSDP over world_size processes: the weights,
    gradients and AdamW state sharded (each tensor split along dim 0 as torch.chunk splits it, so the largest shard
    counts: 128 experts over 48 processes are 3 per process, on 43 of them), plus what is whole for a while.
    Gathered weights: the root's (embeddings, final norm, head; kept from forward through backward) and two
    blocks' (one computing, the next prefetched), in the compute dtype. Gradients: one block's whole in float32
    before its reduce-scatter; but while gradient accumulation skips the reduce-scatter (accumulating: several
    micro-steps per process) every trained weight's gradient is whole, in float32, until the last micro-step.
    Reads shapes only (the meta model is fine)."""
    def shard_bytes(params):
        return sum(-(-p.shape[0] // world_size) * (p.numel() // p.shape[0]) * p.element_size() if p.dim() and
                   p.shape[0] else p.numel() * p.element_size() for p in params)

    def gathered_bytes(params):
        return sum(p.numel() * (2 if dtype == torch.bfloat16 else p.element_size()) for p in params)
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    blocks = list(model.transformer.h)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in params if id(p) not in in_blocks]
    biggest = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    whole_grad = 4 * sum(p.numel() for p in biggest.parameters() if p.requires_grad)
    gradients = 4 * sum(p.numel() for p in trained) if accumulating else shard_bytes(trained) + whole_grad
    return dict(weights=shard_bytes(params) + gathered_bytes(root) + 2 * gathered_bytes(biggest.parameters()),
                gradients=gradients, optimizer=2 * shard_bytes(trained), activations=est['activations'])
