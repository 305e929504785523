# Time to quality on a CPU: character-level Shakespeare to val loss <= 1.89 in under a minute on 2 cores.
# nanoGPT's CPU recipe (4 layers, 128 wide, batch 12 x 64, AdamW lr 1e-3, 2000 iterations) gets to ~1.89 in
# about two minutes. Same model and batch here; Muon (ops.Muon: torch.optim.Muon's update, on the 2D weights inside
# the blocks, scaled to AdamW's size; AdamW on embeddings, norms and biases) at a 10x higher learning rate gets
# there in under a third of the iterations, each ~1.3x the cost of an AdamW step (Newton-Schulz on small matrices).
# python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_fast.py
# measured (AMD EPYC, 2 cores): val loss at iteration 600: 1.860 / 1.856 / 1.846 (seeds 1337 / 2 / 3); at 550:
# 1.885 / 1.877 / 1.872 (too close to 1.89); at 650 (this recipe before): 1.830 / 1.817 (README) / 1.843. Start to finish
# (python's start and both evals included): 0.39x nanoGPT's whole run for its CPU recipe, side by side (python
# bench.py --mode=recipe --recipe_rounds=3: medians 33.9 s vs 85.9 s, AMD EPYC, 2 cores).

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
max_iters = 600
lr_decay_iters = 600
beta2 = 0.99
eval_interval = 600  # evaluate at the start and the end only: evals cost time too
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
