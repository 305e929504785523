# Time to quality on a CPU: character-level Shakespeare to val loss <= 1.89 in under a minute on 2 cores.
# nanoGPT's CPU recipe (4 layers, 128 wide, batch 12 x 64, AdamW lr 1e-3, 2000 iterations) gets to ~1.89 in
# about two minutes. Same model and batch here; Muon (torch.optim.Muon, on the 2D weights inside the blocks,
# its update scaled to AdamW's size; AdamW on embeddings, norms and biases) at a 10x higher learning rate gets
# there in about a third of the iterations, each ~1.4x the cost of an AdamW step (Newton-Schulz on small matrices).
# python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_fast.py
# measured (README, results): val loss 1.834 (seed 1337) and 1.817 (seed 2) at iteration 650, 38 s start to
# finish (python startup and both evals included), 2-core CPU

out_dir = 'out-shakespeare-char-fast'
dataset = 'shakespeare_char'
device = 'cpu'
dtype = 'float32'
compile = False  # inductor's compile on CPU takes longer than the whole run
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 12
gradient_accumulation_steps = 1
dropout = 0.0
optimizer = 'muon'
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 50
max_iters = 650
lr_decay_iters = 650
beta2 = 0.99
eval_interval = 650  # evaluate at the start and the end only: evals cost time too
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
