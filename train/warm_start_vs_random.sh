#!/usr/bin/env bash
# Warm start against random init, the paper's central comparison, at a CPU-friendly size: BERT2BERT from the
# real MiniLM BERT vs Rnd2Rnd of the same shape and vocabulary, same data, same steps. Draws both loss curves
# into out/warm_vs_random/curves.png.   Usage: bash train/warm_start_vs_random.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-200}"
BERTGEN="${BERTGEN:-.venv/bin/bertgen}"
for init in bert2bert rnd2rnd; do
  "$BERTGEN" train --config train/fusion_minilm.toml model.init=$init run.output_dir=out/warm_vs_random/$init \
    run.steps="$STEPS" run.log_every=10 run.eval_every=0 eval.generate=false eval.best_metric=eval_loss \
    run.export=false run.save_every=100000 data.synthetic_train=4000 data.synthetic_eval=64 data.batch_size=16 \
    optim.warmup_steps=10 optim.learning_rate=1e-4 model.dropout=0.0
done
"${PYTHON:-.venv/bin/python}" -c "
from bertgen_flax.training import plot_comparison
print(plot_comparison({'BERT2BERT (MiniLM)': 'out/warm_vs_random/bert2bert/metrics.jsonl',
                       'Rnd2Rnd': 'out/warm_vs_random/rnd2rnd/metrics.jsonl'}, 'out/warm_vs_random/curves.png',
                      title='train loss: warm start vs random init'))"
