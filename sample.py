"""
Sample from a trained model (an out_dir of train.py) or a Hugging Face one.

$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life, the universe, and everything?" --num_samples=5
"""
import sys
import time

import torch

import checkpoint
from configurator import apply_overrides
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
init_from = 'resume'  # either 'resume' (from an out_dir) or a Hugging Face name or path (e.g. 'gpt2-xl')
out_dir = 'out'  # ignored if init_from is not 'resume'
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, 0 = greedy (always the likeliest)
top_k = 200  # retain only the top_k most likely tokens, clamp others to have 0 probability; 0 = off
top_p = 1.0  # nucleus sampling: keep the fewest tokens whose probabilities add up to top_p; 1.0 = off
seed = 1337
device = 'auto'  # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1', etc.; 'auto': cuda when there is one
dtype = 'auto'  # 'float32' or 'bfloat16' or 'float16'; 'auto': bf16 (or fp16) on GPUs, fp32 on CPU
compile = False  # use PyTorch 2.0 to compile the model's decoding step (the first samples are slower)
tokenizer = ''  # '' = the checkpoint's; a tiktoken name ('gpt2', ...) for models that do not name one (Gemma)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
apply_overrides(globals(), sys.argv[1:], allowed_keys=config_keys)  # overrides from command line or config file
# -----------------------------------------------------------------------------


def fail(message):
    sys.exit(f"error: {message}")


torch.manual_seed(seed)
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = device.split(':')[0]
if device_type == 'cuda' and not torch.cuda.is_available():
    fail(f"device {device!r} is not available (no CUDA GPU): use --device=cpu")
if dtype == 'auto':
    dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device_type == 'cuda' else 'float32'
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(dtype)
if ptdtype is None:
    fail(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    fail("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")

# model and its tokenizer
if init_from == 'resume' and checkpoint.find(out_dir) is None:
    fail(f"no checkpoint in {out_dir}: train one with train.py, or point --out_dir at its out_dir")
try:
    model, meta = checkpoint.load_model(out_dir if init_from == 'resume' else init_from, device, ptdtype,
                                        tokenizer=tokenizer or None)
except checkpoint.CheckpointError as e:
    fail(str(e))
except (OSError, ValueError) as e:  # Hugging Face loading: a missing directory, an unsupported config
    fail(f"init_from={init_from!r}: {e}")
if device_type == 'cpu':
    model.use_decode_layout()  # faster one-token steps on CPU
if compile:
    model.forward_cached = torch.compile(model.forward_cached)
tok = load_tokenizer(meta)
block_size = model.config.block_size

# encode the beginning of the prompt
if start.startswith('FILE:'):
    try:
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        fail(f"cannot read the prompt file {start[5:]!r}: {e.strerror}")
start_ids = tok.encode(start, allow_special=True)
if not start_ids:
    fail("the prompt is empty: give --start at least one token")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...]
generator = torch.Generator(device=device).manual_seed(seed)


def generate(idx, n):
    """model.generate (KV cache) within the model's block_size; past it, continue from the last
    block_size // 2 tokens, so samples can be longer than the context."""
    while n > 0:
        context = idx if idx.size(1) + n <= block_size else idx[:, -(block_size // 2):]
        steps = min(n, block_size - context.size(1))
        out = model.generate(context, steps, temperature=temperature, top_k=top_k or None, top_p=top_p,
                             generator=generator)
        idx, n = torch.cat([idx, out[:, context.size(1):]], dim=1), n - steps
    return idx


# run generation
new_tokens, seconds = 0, 0.0
with torch.no_grad():
    for k in range(num_samples):
        t0 = time.perf_counter()
        y = generate(x, max_new_tokens)
        seconds += time.perf_counter() - t0
        new_tokens += y.size(1) - x.size(1)
        print(tok.decode(y[0].tolist()))
        print('---------------')
print(f"{new_tokens} tokens in {seconds:.2f}s: {new_tokens / max(seconds, 1e-9):.1f} tokens/s")
