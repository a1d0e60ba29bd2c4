"""In-process A/B of two settings of the library on one generate workload: paired timings, one ratio.

On a shared 2-core machine the speed drifts by 10-20% within minutes, more than most changes worth measuring,
so comparing two runs of ``bench_ct2.py`` taken one after the other says little. Here one process builds the
generate program twice, once under each setting (each a Python statement run with ``bertgen_flax``'s modules in
scope: ``cpu_kernels``, ``decoding``, ``generation``, ``modeling``), then times the two programs alternately and
reports the median of the paired ratios B / A, which drift hardly moves. It also checks both give the same tokens.

A setting must take effect when the program is traced (a module constant or function read at trace time); the
statement runs again before each timed call, so switches read at run time work too.

    .venv/bin/python bench/bench_ab.py b32 "generation.PACKING_BUCKETS = 0" "generation.PACKING_BUCKETS = 16"
    .venv/bin/python bench/bench_ab.py b128 "cpu_kernels.GEMM_MIN_ROWS = 1 << 40" "pass" --runs 9
    .venv/bin/python bench/bench_ab.py b32 "cpu_kernels.QUANTIZED_MAX_ROWS = 32" "cpu_kernels.QUANTIZED_MAX_ROWS = 8" \
        --quantize int8
    .venv/bin/python bench/bench_ab.py b1 "pass" "pass" --preset l24 --batch 8 --new-tokens 40 --runs 5
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

import numpy as np  # noqa: E402

from _workload import CASES, PRESETS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("a", help="setting A: a Python statement")
    p.add_argument("b", help="setting B: a Python statement")
    p.add_argument("--runs", type=int, default=11, help="timed pairs (default 11)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="the model's shape (default: small)")
    p.add_argument("--new-tokens", type=int, default=None, help="override the preset's new tokens")
    p.add_argument("--batch", type=int, default=None, help="override the case's batch (its beams kept)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="time the model quantized (weight-only) instead of in float32")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    for label, stmt in (("A", args.a), ("B", args.b)):
        try:
            compile(stmt, f"<setting {label}>", "exec")
        except SyntaxError as e:
            p.error(f"setting {label} is not a Python statement: {e.msg}: {stmt!r}")

    import jax
    import bench_generate as bg
    import bertgen_flax
    from bertgen_flax import cpu_kernels, decoding, generation, modeling

    shape = PRESETS[args.preset]
    if args.new_tokens:
        shape = dataclasses.replace(shape, new_tokens=args.new_tokens)
    case = CASES[args.case] if not args.batch else dataclasses.replace(CASES[args.case], batch=args.batch)
    scope = dict(cpu_kernels=cpu_kernels, decoding=decoding, generation=generation, modeling=modeling)
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as work:
        bg.build_reference(shape, 0).save_pretrained(work)
        model = bertgen_flax.EncoderDecoderModel.from_pretrained(work, scan_layers=False, quantize=args.quantize)
    ids, mask = bg.make_inputs(case.batch, shape.source, shape.vocab, 0)
    kwargs = bg.generate_kwargs(shape, case.beams)
    programs, outputs = {}, {}
    for name, stmt in (("A", args.a), ("B", args.b)):
        exec(stmt, scope)
        # a fresh program cache per setting, kept for its timed calls
        generation._seq2seq_program = functools.lru_cache(maxsize=64)(generation._seq2seq_program.__wrapped__)
        outputs[name] = np.asarray(model.generate(ids, mask, **kwargs))
        programs[name] = generation._seq2seq_program

    def timed(name: str) -> float:
        exec(args.a if name == "A" else args.b, scope)
        generation._seq2seq_program = programs[name]
        start = time.perf_counter()
        np.asarray(jax.block_until_ready(model.generate(ids, mask, **kwargs)))
        return time.perf_counter() - start

    for name in "AABB":
        timed(name)
    a, b = [], []
    for _ in range(args.runs):
        a.append(timed("A"))
        b.append(timed("B"))
    per = lambda ts: 1e3 * statistics.median(ts) / shape.new_tokens
    same = np.array_equal(outputs["A"], outputs["B"])
    print(f"{args.case} ({args.preset}, batch {case.batch}): A {per(a):.3f} ms/token, B {per(b):.3f} ms/token "
          f"(medians of {args.runs}); "
          f"B / A, median of paired ratios: {statistics.median(y / x for x, y in zip(a, b)):.3f}; "
          f"same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
