"""Long-context truth (issue 14): models trained here whose quality needs attention far back (multi-query
associative recall without position embeddings; a character LM with a 4096-token block), and the end-to-end
evaluation of every attention method swapped into them.

Library: ``recall`` (the task), ``training``, ``checkpoints`` (files + manifests), ``evaluation`` (rows: metric
beside attention time), ``figures``, ``qkv_source`` (inputs ``recall`` / ``lm`` of ``common.compare``).
Scripts: ``train_recall``, ``train_lm``, ``evaluate``, ``plot``; ``gpu_train.sh``, ``gpu_eval.sh``.
"""
