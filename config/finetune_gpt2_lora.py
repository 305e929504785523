# LoRA fine-tuning of GPT-2 (124M) on chat data, sized for a CPU (minutes), in the plain chat template
# ("User: ...\nAssistant: ...<|endoftext|>").
#
# $ python data/chat/make_reverse.py                       # a synthetic task; or your own chats.jsonl
# $ python data/chat/prepare.py --input=data/chat/reverse_train.jsonl --val_input=data/chat/reverse_val.jsonl \
#       --block_size=32 --pack=False --out_dir=data/chat/reverse_gpt2
# $ python train.py config/finetune_gpt2_lora.py
# $ python sample.py --out_dir=out-gpt2-lora --interactive=True --temperature=0
# $ python export.py --out_dir=out-gpt2-lora --export_dir=out-gpt2-lora/hf               # merged, for transformers/vLLM
# $ python export.py --out_dir=out-gpt2-lora --export_dir=out-gpt2-lora/adapter --adapter_only=True   # PEFT
# (GPT-2's BPE splits random letters into multi-letter tokens, so reversing them is hard for it: the task shows
# the workflow, not a skill GPT-2 small picks up well.)

out_dir = 'out-gpt2-lora'
init_from = 'gpt2'
dataset = 'data/chat/reverse_gpt2'
compile = False

model_overrides = dict(lora_rank=8, lora_alpha=16.0, lora_targets='attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj')

batch_size = 16
block_size = 32  # = prepare.py --block_size
gradient_accumulation_steps = 1

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
weight_decay = 0.0
eval_interval = 100
eval_iters = 10
log_interval = 10
