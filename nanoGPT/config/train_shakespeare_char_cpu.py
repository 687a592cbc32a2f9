# CPU size: a 4-layer, 4-head, 128-dim GPT on 64-character blocks (about 0.8M parameters), 2 threads.
out_dir = "nanoGPT/out/shakespeare_char_cpu"
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
bias = False       # no biases in the linear layers and LayerNorms (ModelConfig's default is True)
dropout = 0.0
batch_size = 12
max_iters = 2000
lr_decay_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 20
device = "cpu"
threads = 2
