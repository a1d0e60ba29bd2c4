#!/usr/bin/env bash
# Converts every HF checkpoint directory listed in $1 (one per line) into native checkpoints under $2.
set -euo pipefail
list="$1"; out_root="$2"
mkdir -p "$out_root"
while IFS= read -r src || [ -n "$src" ]; do
  [ -z "$src" ] && continue
  bertgen convert "$src" "$out_root/$(basename "$src")"
done < "$list"
