"""Top-k x sparse-phase learning rate on the main config (2 x 2 runs).

  python launch.py --sweep experiments/sweep_topk.py --dry-run
  python launch.py --sweep experiments/sweep_topk.py

The main config has seq_len 1024, top-k 128 and sparse lr 3e-4; this brackets
both. Runs go to work/sweep_topk/<run name> (topk-64_sparse.optim.lr-0.0001,
...);
the table at the end comes from each run's summary.json.
"""

CONFIG = "main"

GRID = {
    "model.indexer.topk": [64, 256],
    "phases.sparse.optim.lr": [1e-4, 3e-4],
}
