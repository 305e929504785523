# train the compact GPT-OSS (16 experts, top-4; 1,442,041,488 parameters at its 32,000-token vocabulary,
# 1,470,084,240 with the GPT-2 tokens of data/shakespeare) with the original compact recipe, on one GPU
# first: python data/shakespeare/prepare.py
# $ python train.py config/train_gpt_oss.py
#
# on a CPU, a small mixture of experts with the same switches (sinks, clamped SwiGLU experts with biases,
# sliding/full layers, YaRN, top-k routing with the load-balancing loss) learns in a few minutes on two cores:
# python train.py config/train_gpt_oss.py --device=cpu --compile=False --dtype=float32 --out_dir=out-gpt-oss-cpu --model_overrides="{'n_layer': 4, 'n_embd': 128, 'n_head': 4, 'n_kv_head': 2, 'head_dim': 32, 'mlp_hidden': 256, 'n_expert': 8, 'n_expert_active': 2, 'sliding_window': 64}" --learning_rate=2e-3 --min_lr=1e-4 --max_iters=300 --lr_decay_iters=300 --eval_interval=100 --eval_iters=20 --log_interval=10
# each eval prints the load-balancing loss and every expert's share of the routed tokens (mean over layers:
# the loss, transformers' formula, balances the load of all layers together, so a layer may idle an expert)

out_dir = 'out-gpt-oss'
wandb_project = 'gpt-oss'
wandb_run_name = 'gpt-oss-compact'

dataset = 'shakespeare'
model = 'gpt-oss-compact'  # its load-balancing loss weight, moe_aux_loss_weight, is 0.01 (change it in model_overrides)

# 5 sequences * 128 tokens = 640 tokens per step
gradient_accumulation_steps = 1
batch_size = 5
block_size = 128

# AdamW (eps 1e-8: model.configure_optimizers' default), cosine from 1e-4 to 1e-6 over 1000 steps, no warmup
learning_rate = 1e-4
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
grad_clip = 1.0
max_iters = 1000
warmup_iters = 0
lr_decay_iters = 1000
min_lr = 1e-6

dtype = 'bfloat16'  # autocast; the weights and AdamW state stay float32

eval_interval = 100
eval_iters = 50
log_interval = 10
