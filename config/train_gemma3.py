# train the compact Gemma 3 (164,654,976 parameters, GPT-2 tokenizer) on English Wikipedia:
# the recipe of the original Gemma-3 training scripts, on one GPU
# first: python data/wikipedia/prepare.py   (the hub needs pip install datasets; or --input=docs.jsonl)
# $ python train.py config/train_gemma3.py
#
# on a CPU, a gemma3-shaped model small enough to learn in a few minutes on two cores (the same switches:
# sandwich norms, q/k norms, gated GELU, MQA, five sliding layers then one full):
# python train.py config/train_gemma3.py --device=cpu --compile=False --out_dir=out-gemma3-cpu --model_overrides="{'n_layer': 6, 'n_embd': 128, 'n_head': 4, 'head_dim': 32, 'mlp_hidden': 512, 'sliding_window': 64, 'attn_scale_dim': 32}" --block_size=128 --batch_size=4 --gradient_accumulation_steps=1 --learning_rate=2e-3 --max_iters=300 --lr_decay_iters=300 --warmup_iters=20 --eval_interval=100 --eval_iters=20 --log_interval=10
#
# what out_dir holds after training (see checkpoint.py): config.json (architecture and training config),
# model.safetensors, meta.json (the tokenizer: gpt2, its vocab size and end-of-text id), history.jsonl
# (every logged train loss and every eval's train/val loss, one JSON object per line) and loss.png

out_dir = 'out-gemma3'
wandb_project = 'gemma3'
wandb_run_name = 'gemma3-compact'

dataset = 'wikipedia'  # train = the first 10,000 articles of wikimedia/wikipedia 20231101.en, val the next 1,000
model = 'gemma3-compact'  # the model's context is 32,768; it is trained on 2,048-token windows

# 4 micro-batches * 1 sequence * 2048 tokens = 8,192 tokens per step
gradient_accumulation_steps = 4
batch_size = 1
block_size = 2048

# AdamW, 100 warmup steps then cosine decay over the whole run
learning_rate = 1e-4
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
max_iters = 10000
warmup_iters = 100
lr_decay_iters = 10000
min_lr = 0.0  # cosine all the way down, like transformers' get_cosine_schedule_with_warmup

eval_interval = 200
eval_iters = 100
log_interval = 10
