"""Training: config, data pipeline, optimisers and schedules, sharding rules, the train step, checkpoints, metrics,
observability and the train loop (``train``, what ``bertgen train`` runs)."""
from .optim import inverse_sqrt_schedule, linear_warmup_linear_decay, make_optimizer
from .sharding import batch_sharding, make_mesh, tree_shardings
from .step import TrainState, create_state, make_eval_step, make_train_step, shard_state, token_loss
from .data import (BatchIterator, DataError, TokenizedPairs, decoder_start_id, read_pairs, synthetic_pairs,
                   target_eos_id, word_tokenizer, write_jsonl)
from .checkpointing import Checkpointer
from .config import TrainConfig, TrainConfigError
from .metrics import bleu, exact_match, generation_metrics, rouge, write_predictions
from .observe import MetricsLog, ProgressBar, plot_comparison, plot_curves, read_metrics
from .trainer import TrainResult, TrainingError, train

__all__ = [
    "inverse_sqrt_schedule", "linear_warmup_linear_decay", "make_optimizer", "batch_sharding", "make_mesh",
    "tree_shardings", "TrainState", "create_state", "make_eval_step", "make_train_step", "shard_state", "token_loss",
    "BatchIterator", "DataError", "TokenizedPairs", "decoder_start_id", "read_pairs", "synthetic_pairs",
    "target_eos_id", "word_tokenizer", "write_jsonl", "Checkpointer", "TrainConfig", "TrainConfigError", "bleu",
    "exact_match", "generation_metrics", "rouge", "write_predictions", "MetricsLog", "ProgressBar",
    "plot_comparison", "plot_curves", "read_metrics", "TrainResult", "TrainingError", "train",
]
