# evaluate the base gpt2-xl (1558M) on OpenWebText
# first: python data/openwebtext/prepare.py
# n_layer, n_head, n_embd come from the Hugging Face checkpoint
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-xl'
