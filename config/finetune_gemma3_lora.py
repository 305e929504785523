# LoRA fine-tuning of a Gemma-3-architecture model on chat data, in Gemma's turn format.
# Our Gemma models use the GPT-2 tokenizer (tiktoken; Gemma's own SentencePiece one is not supported), so this
# fine-tunes one pretrained here (config/train_gemma3.py -> out-gemma3), not google/gemma-3-270m.
#
# $ python data/chat/make_reverse.py                       # or your own chats.jsonl
# $ python data/chat/prepare.py --input=data/chat/reverse_train.jsonl --val_input=data/chat/reverse_val.jsonl \
#       --chat_format=gemma --block_size=64 --pack=False --out_dir=data/chat/reverse_gemma
# $ python train.py config/finetune_gemma3_lora.py
# $ python sample.py --out_dir=out-gemma3-lora --interactive=True
# $ python export.py --out_dir=out-gemma3-lora --export_dir=out-gemma3-lora/hf          # merged, for transformers/vLLM
# $ python export.py --out_dir=out-gemma3-lora --export_dir=out-gemma3-lora/adapter --adapter_only=True   # PEFT

out_dir = 'out-gemma3-lora'
init_from = 'out-gemma3'  # a train.py out_dir of a Gemma-3-architecture model (GPT-2 tokens)
dataset = 'data/chat/reverse_gemma'

# rank 16 on every attention and MLP projection of every layer
model_overrides = dict(lora_rank=16, lora_alpha=32.0, lora_dropout=0.05,
                       lora_targets='attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj')
dtype = 'bfloat16'  # on a GPU; on a CPU add --dtype=float32 --base_dtype=float32 --compile=False
base_dtype = 'bfloat16'
gradient_checkpointing = False

batch_size = 16
block_size = 64  # = prepare.py --block_size
gradient_accumulation_steps = 2

learning_rate = 1e-3
min_lr = 1e-4
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
weight_decay = 0.0
eval_interval = 100
eval_iters = 20
log_interval = 10
