# GPU size: a 6-layer, 6-head, 384-dim GPT on 256-character blocks (about 10.7M parameters).
out_dir = "nanoGPT/out/shakespeare_char"
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
batch_size = 64
max_iters = 5000
lr_decay_iters = 5000
learning_rate = 1e-3
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
eval_interval = 250
eval_iters = 200
device = "auto"
dtype = "bfloat16"
