# LoRA fine-tuning of gpt-oss-20b on chat data, the original recipe: rank 8, alpha 16, adapters on the experts'
# down_proj in layers 7, 15 and 23 (PEFT's target_parameters "7.mlp.experts.down_proj", ...), bf16 weights,
# gradient checkpointing; batch 4 x 2048 tokens, 4 accumulation steps, lr 2e-4 with cosine decay to 10%.
# One 80 GB GPU: python train.py config/finetune_gpt_oss_lora.py --estimate_only=True prints the estimate
# (needs only the model's config.json), about 44 GiB; see README "Fine-tuning".
#
# chats.jsonl: one {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]} per line
# $ python data/chat/prepare.py --input=chats.jsonl --tokenizer=o200k_harmony --block_size=2048 \
#       --out_dir=data/chat/harmony
# $ python train.py config/finetune_gpt_oss_lora.py
# $ python sample.py --out_dir=out-gpt-oss-lora --interactive=True      # chat with it (harmony format)
# $ python export.py --out_dir=out-gpt-oss-lora --export_dir=out-gpt-oss-lora/hf   # merged bf16 safetensors
# $ vllm serve out-gpt-oss-lora/hf
# or the adapters alone for PEFT: python export.py ... --export_dir=out-gpt-oss-lora/adapter --adapter_only=True

out_dir = 'out-gpt-oss-lora'
init_from = 'openai/gpt-oss-20b'
dataset = 'data/chat/harmony'  # the prepare.py command above: harmony format, o200k_harmony tokens

model_overrides = dict(lora_rank=8, lora_alpha=16.0, lora_targets='h.7.mlp.down,h.15.mlp.down,h.23.mlp.down')
dtype = 'bfloat16'
base_dtype = 'bfloat16'  # the frozen 21B weights in bf16 (42 GB); the adapters train in float32
gradient_checkpointing = True
compile = False

batch_size = 4
block_size = 2048  # rows of the prepared data: prepare.py --block_size=2048
gradient_accumulation_steps = 4

learning_rate = 2e-4
min_lr = 2e-5
max_iters = 60  # ~1000 conversations of <= 2048 tokens, one epoch at 16 sequences per step
lr_decay_iters = 60
warmup_iters = 2  # ~3%
weight_decay = 0.0
eval_interval = 20
eval_iters = 10
log_interval = 1
always_save_checkpoint = False  # keep the best val loss (a save writes the 17 MiB of adapters only)
