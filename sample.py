"""
Sample from a trained model (an out_dir of train.py) or a Hugging Face one.

$ python sample.py --out_dir=out-shakespeare-char
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life, the universe, and everything?" --num_samples=5
$ python sample.py --out_dir=out-shakespeare-char --interactive=True   # type a prompt, get a completion, repeat

Each sample streams as it is generated and ends with a summary line (tokens/s counts the new tokens over the
whole time, the prompt's forward pass included):
[<n> prompt tokens, <m> new tokens, <seconds>s, <m / seconds> tokens/s]

Interactive mode reads one prompt per line from stdin (type \\n for a newline inside a prompt) and prints the
completion; lines starting with / change the settings without restarting (/help lists them); /quit or
end of input (Ctrl-D) exits. Models fine-tuned on chat data (their meta.json names a chat_format) are
prompted in that format: the line is the user's message, the reply ends at the format's stop token or
string, and the conversation carries on until /reset. A line that cannot be used (not UTF-8, a character the
tokenizer lacks, a prompt that fills the context) is an error message and the session goes on, its conversation
as it was.

Sampling settings follow engine.sampling, the one rule every entry point applies: finite numbers, temperature >= 0
(below engine.GREEDY_BELOW it is greedy), top_k >= 0, top_p in (0, 1]; num_samples and max_new_tokens are at
least 1. A mistake in the settings or the prompt (a bad value, a FILE: prompt that is missing or not UTF-8, a
missing or corrupt checkpoint) is one line on stderr starting "error: ", exit status 2.
"""
import sys
import time

import torch

import checkpoint
import devices
import engine
from configurator import apply_overrides
from tokenizer import CHAT_FORMATS, TokenizerError, load_tokenizer, render_prompt, stop_strings, stop_tokens

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
device = 'auto'  # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1', 'mps'; 'auto': devices.py's policy
dtype = 'auto'  # 'float32' or 'bfloat16' or 'float16'; 'auto': bf16 (or fp16) on GPUs, fp32 on CPU
compile = False  # torch.compile the one-token decoding step (the first sample waits for the compile)
quantize = ''  # 'int8': weight-only int8 on CPU, ~2x faster decoding (lossy: ~+0.01% perplexity); '' = off
threads = 0  # CPU threads (torch.set_num_threads); 0 = torch's default. On a busy machine 1 can be much faster
tokenizer = ''  # '' = the checkpoint's; a tiktoken name ('gpt2', ...) for models that do not name one (Gemma)
interactive = False  # read prompts from stdin, one per line, until /quit or end of input
chat_format = 'auto'  # 'auto': the checkpoint's (chat fine-tunes), else none; 'none': plain text; plain|gemma|harmony
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
apply_overrides(globals(), sys.argv[1:], allowed_keys=config_keys)  # overrides from command line or config file
# -----------------------------------------------------------------------------


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


SEEDS = (-2**63, 2**64 - 1)  # what torch.manual_seed takes


def settings_error():
    """What is wrong with the sampling settings (they can change in interactive mode), or None."""
    try:
        engine.sampling(temperature, top_k, top_p)  # the one rule: finite, temperature >= 0, top_p in (0, 1], ...
    except ValueError as e:
        return str(e)
    if max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {max_new_tokens}"
    if not SEEDS[0] <= seed <= SEEDS[1]:
        return f"seed must be an integer from {SEEDS[0]} to {SEEDS[1]}, got {seed}"
    return None


def text_error(text):
    """Why `text` cannot be a prompt (it holds lone surrogates: bytes that were not UTF-8), or None."""
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as e:
        return f"not valid UTF-8 text (at character {e.start}: {text[e.start]!r})"
    return None


if settings_error():
    fail(f"--{settings_error()}")  # each message starts with the setting's name
if num_samples < 1:
    fail(f"--num_samples must be >= 1, got {num_samples}")
if threads < 0:
    fail(f"--threads must be >= 0 (0 = torch's default), got {threads}")
if threads:
    torch.set_num_threads(threads)
try:
    device, ptdtype = devices.resolve(device, dtype)
except devices.DeviceError as e:
    fail(str(e))
if checkpoint.quantize_error(quantize, device):
    fail(checkpoint.quantize_error(quantize, device))
if chat_format not in ('auto', 'none') + CHAT_FORMATS:
    fail(f"chat_format {chat_format!r} is not one of auto, none, {', '.join(CHAT_FORMATS)}")
torch.manual_seed(seed)

# model and its tokenizer
if init_from == 'resume' and checkpoint.find(out_dir) is None:
    fail(f"no checkpoint in {out_dir}: train one with train.py, or point --out_dir at its out_dir")
try:
    model, meta = checkpoint.load_for_inference(out_dir if init_from == 'resume' else init_from, device, ptdtype,
                                                tokenizer=tokenizer or None, quantize=quantize)
except (checkpoint.CheckpointError, TokenizerError) as e:
    fail(str(e))
except (OSError, ValueError) as e:  # Hugging Face loading: a missing directory, an unsupported config
    fail(f"init_from={init_from!r}: {e}")
if compile and quantize:  # the int8 kernel is compiled already; the whole step compiled around it is slower
    print("note: --compile skipped with --quantize=int8 (its kernel is compiled on its own)", file=sys.stderr)
elif compile and not engine.compile_decode(model):
    print("note: --compile skipped: mixture-of-experts models (GPT-OSS) decode uncompiled", file=sys.stderr)
try:
    tok = load_tokenizer(meta)
except TokenizerError as e:
    fail(str(e))
block_size = model.config.block_size
if chat_format == 'auto':
    chat_format = meta.get('chat_format') or 'none'  # set by data/chat/prepare.py, kept by train.py
chat = chat_format != 'none'
try:
    stop_ids = set(stop_tokens(tok, chat_format)) if chat else set()  # plain text runs its full length
    stop_texts = stop_strings(tok, chat_format) if chat else []
except ValueError as e:  # harmony without the o200k_harmony tokenizer
    fail(f"chat_format={chat_format!r}: {e}")
generator = torch.Generator(device=device).manual_seed(seed)


def token_stream(ids, n, counter):
    """Up to n new token ids after the prompt ids, as they come (engine.generate_stream: KV cache). Within the
    model's block_size in one run; past it, go on from the last block_size // 2 tokens, so a sample can be
    longer than the context. A stop token ends the stream and is not yielded. counter[0] counts the tokens."""
    ids = list(ids)
    while n > 0:
        context = ids if len(ids) + n <= block_size else ids[-(block_size // 2):]
        steps = min(n, block_size - len(context))
        for (token,) in engine.generate_stream(model, [context], steps, temperature, top_k or None, top_p,
                                               stop_tokens=stop_ids, generator=generator):
            counter[0] += 1
            if token in stop_ids:
                return
            ids.append(token)
            n -= 1
            yield token


def complete(ids):
    """Print the continuation of prompt ids as it streams, then the summary line; returns the text (None when the
    prompt leaves no room for a reply)."""
    counter, pieces = [0], []
    # a chat reply must keep its conversation in view: cap it at the context left, never slide the window
    n = min(max_new_tokens, block_size - len(ids)) if chat else max_new_tokens
    if n < 1:
        print(f"error: the prompt ({len(ids)} tokens) fills the model's {block_size}-token context; /reset or "
              f"shorten it", file=sys.stderr, flush=True)
        return None
    if n < max_new_tokens:
        print(f"(reply capped at {n} tokens: {len(ids)} prompt tokens of a {block_size}-token context)",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    text = engine.TextStream(tok.decode, stop_texts)
    for token in token_stream(ids, n, counter):
        piece, stopped = text.push(token)
        print(piece, end='', flush=True)
        pieces.append(piece)
        if stopped:
            break
    else:
        pieces.append(text.flush())
        print(pieces[-1], end='', flush=True)
    dt = time.perf_counter() - t0
    rate = counter[0] / max(dt, 1e-9)
    print(f"\n[{len(ids)} prompt tokens, {counter[0]} new tokens, {dt:.2f}s, {rate:.1f} tokens/s]", flush=True)
    return ''.join(pieces)


def encode(text, history):
    """The prompt's token ids: the text itself, or in a chat format the conversation so far plus this user
    message, dropping the oldest exchanges while prompt + max_new_tokens would overflow the context."""
    if not chat:
        return tok.encode(text, allow_special=True)
    messages = history + [{"role": "user", "content": text}]
    ids = render_prompt(tok, messages, chat_format)
    while len(ids) + max_new_tokens > block_size and len(messages) > 1:
        messages = messages[2:]  # a user message and the reply to it
        ids = render_prompt(tok, messages, chat_format)
    return ids


# -----------------------------------------------------------------------------
# interactive mode: one prompt per line; /commands change the settings

SETTINGS = {'temperature': float, 'top_k': int, 'top_p': float, 'max_new_tokens': int, 'seed': int}
HELP = f"""commands:
  /temperature T     0 = greedy, < 1 sharper, > 1 flatter (now {{temperature}})
  /top_k K           keep the K likeliest tokens; 0 = off (now {{top_k}})
  /top_p P           keep the fewest tokens whose probabilities add up to P; 1 = off (now {{top_p}})
  /max_new_tokens N  longest completion (now {{max_new_tokens}})
  /seed S            restart the random generator (now {{seed}})
  /reset             forget the conversation (chat formats)
  /help              this list
  /quit              exit (so does end of input, Ctrl-D)
a prompt is one line; type \\n for a newline in it. chat format: {chat_format}"""


def command(line):
    """Apply one /command; returns False when it says to quit."""
    global generator
    name, _, value = line[1:].strip().partition(' ')
    if name in ('quit', 'exit', 'q'):
        return False
    if name == 'help':
        print(HELP.format(**globals()))
    elif name == 'reset':
        history.clear()
        print("conversation cleared")
    elif name in SETTINGS:
        old = globals()[name]
        try:
            globals()[name] = SETTINGS[name](value.strip())
        except ValueError:
            print(f"error: /{name} needs a number, e.g. /{name} {old}", flush=True)
            return True
        if settings_error():
            print(f"error: {settings_error()}")
            globals()[name] = old
            return True
        if name == 'seed':
            generator = torch.Generator(device=device).manual_seed(seed)
        print(f"{name} = {globals()[name]}")
    else:
        print(f"error: unknown command /{name}: /help lists the commands")
    return True


def interact():
    if hasattr(sys.stdin, 'reconfigure'):  # bytes that are not UTF-8 arrive as lone surrogates, which text_error
        sys.stdin.reconfigure(errors='surrogateescape')  # refuses: the line, not the session, ends
    show_prompt = sys.stdin.isatty()
    print(f"interactive: {'a message' if chat else 'a prompt'} per line; /help for commands, /quit to exit",
          flush=True)
    while True:
        if show_prompt:
            print('> ', end='', flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ''
        if not line:  # end of input
            print()
            return
        line = line.rstrip('\r\n')
        if text_error(line):
            print(f"error: this line is {text_error(line)}: skipped, the session goes on", flush=True)
            continue
        if line.startswith('/'):
            if not command(line):
                return
            continue
        text = line.replace('\\n', '\n')
        try:
            ids = encode(text, history) if text else []
        except ValueError as e:  # a character the tokenizer lacks: this line is skipped, the conversation goes on
            print(f"error: {e}: skipped, the session goes on", flush=True)
            continue
        if not ids:
            continue
        try:
            reply = complete(ids)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            print("\n[interrupted]", flush=True)
            continue
        if chat and reply is not None:
            history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": reply}])


history = []  # the conversation (chat formats)
if interactive:
    interact()
    sys.exit(0)

# encode the beginning of the prompt
if start.startswith('FILE:'):
    try:
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    except OSError as e:
        fail(f"cannot read the prompt file {start[5:]!r} (--start=FILE:...): {e.strerror or e}")
    except UnicodeDecodeError as e:
        fail(f"the prompt file {start[5:]!r} (--start=FILE:...) is not UTF-8 text (byte {e.start}: {e.reason}): "
             f"save it as UTF-8")
elif text_error(start):
    fail(f"--start is {text_error(start)}: pass UTF-8 text, or FILE:path")
try:
    start_ids = encode(start, history)
except ValueError as e:
    fail(f"--start: {e}")
if not start_ids:
    fail("the prompt is empty: give --start at least one token")
if chat and len(start_ids) >= block_size:
    fail(f"the prompt (--start, {len(start_ids)} tokens) fills the model's {block_size}-token context: shorten it")

# run generation
for k in range(num_samples):
    if not chat:
        print(tok.decode(start_ids), end='', flush=True)  # the prompt, then its continuation as it comes
    complete(start_ids)
    print('---------------')
