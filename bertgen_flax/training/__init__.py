"""Training: optimisers and schedules, sharding rules, the train step (and the data pipeline)."""
from .optim import inverse_sqrt_schedule, linear_warmup_linear_decay, make_optimizer
from .sharding import batch_sharding, make_mesh, tree_shardings
from .step import TrainState, create_state, make_eval_step, make_train_step, shard_state, token_loss
from .data import (BatchIterator, DataError, TokenizedPairs, decoder_start_id, read_pairs, synthetic_pairs,
                   target_eos_id, word_tokenizer, write_jsonl)
from .checkpointing import Checkpointer

__all__ = [
    "inverse_sqrt_schedule", "linear_warmup_linear_decay", "make_optimizer", "batch_sharding", "make_mesh",
    "tree_shardings", "TrainState", "create_state", "make_eval_step", "make_train_step", "shard_state", "token_loss",
    "BatchIterator", "DataError", "TokenizedPairs", "decoder_start_id", "read_pairs", "synthetic_pairs",
    "target_eos_id", "word_tokenizer", "write_jsonl", "Checkpointer",
]
