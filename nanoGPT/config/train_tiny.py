# Tiny size for tests and --quick runs: trains in seconds on one CPU core.
out_dir = "nanoGPT/out/tiny"
block_size = 32
n_layer = 2
n_head = 2
n_embd = 32
bias = False       # no biases in the linear layers and LayerNorms (ModelConfig's default is True)
dropout = 0.0
batch_size = 8
max_iters = 50
lr_decay_iters = 50
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 5
eval_interval = 25
eval_iters = 4
device = "cpu"
