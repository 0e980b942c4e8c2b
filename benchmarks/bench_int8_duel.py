"""vitquant int8 against OpenVINO int8, each in a worker process of its own, alternated by round.

``bench_int8.py`` times every torch variant alternated in one process, but OpenVINO must run in
a process of its own (its thread pool distorts torch timings beside it), so there the two are
timed minutes apart and compared through their ratios to timm fp32 timed in each process. On a
shared machine whose speed drifts (the same timm fp32 forward measured 1,710 and 2,117 ms within
ten minutes on the Zen 4 of docs/int8.md) that comparison is as noisy as the drift.

Here every contender (any ``bench_int8.py`` torch variant, ``openvino-int8``,
``openvino-default``) is built once in its own worker process; the coordinator then runs R
rounds, and in each round tells every worker in turn to time ``--iters`` forwards while the
others wait idle (blocked on a pipe, after a pause that lets their spinning threads sleep). Each
round gives every contender a time and a ratio to the first contender taken in the same minute;
the script prints medians, the median of per-round ratios and their range, and writes JSON with
the CPU's name and ISA flags.

Usage::

    PYTHONPATH=src python benchmarks/bench_int8_duel.py --models vit_base_patch16_224 \\
        deit_small_patch16_224 --batch 8 1 --contenders openvino-int8 vitquant-int8 \\
        vitquant-int8-bf16-compiled --rounds 11 --json benchmarks/results/duel.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
OPENVINO = ("openvino-int8", "openvino-default")


def worker(contender: str, model: str, batch: int, threads: int) -> int:
    """Builds one contender, then answers ``run N`` lines with the seconds of N forwards."""
    import torch

    sys.path.insert(0, HERE)
    torch.set_num_threads(threads)
    info: dict[str, Any] = {}
    if contender in OPENVINO:
        from bench_int8_peers import _openvino

        fn = _openvino(model, batch, threads)[contender]
    else:
        from bench_int8 import build

        fn = build(contender, model, batch, info)
    for _ in range(2):
        fn()
    print(json.dumps({"ready": contender, "info": info}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        n = int(cmd[1])
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        print(json.dumps({"seconds": (time.perf_counter() - t0) / n}), flush=True)
    return 0


def _start(
    contender: str, model: str, batch: int, args: argparse.Namespace
) -> subprocess.Popen[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", contender, "--models", model,
           "--batch", str(batch), "--threads", str(args.threads)]  # fmt: skip
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )


def _reply(proc: subprocess.Popen[str], what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{what}: the worker exited (rc {proc.wait()}); see its stderr above")


def duel(model: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (model, batch): every contender in its worker, ``args.rounds`` alternated rounds."""
    sys.path.insert(0, HERE)
    from bench_int8_common import machine

    procs: dict[str, subprocess.Popen[str]] = {}
    info: dict[str, Any] = {}
    for c in args.contenders:  # built one after another: builds do not overlap timed runs
        procs[c] = _start(c, model, batch, args)
        info[c] = _reply(procs[c], c).get("info", {})
    iters = args.iters or (20 if batch == 1 else 3)
    times: dict[str, list[float]] = {c: [] for c in args.contenders}
    try:
        for r in range(args.rounds):
            order = args.contenders if r % 2 == 0 else args.contenders[::-1]
            for c in order:
                time.sleep(args.pause)
                p = procs[c]
                assert p.stdin is not None
                p.stdin.write(f"run {iters}\n")
                p.stdin.flush()
                times[c].append(_reply(p, c)["seconds"])
            print(f"  round {r + 1}/{args.rounds}: "
                  + "  ".join(f"{c} {times[c][-1] * 1e3:.1f} ms" for c in args.contenders),
                  flush=True)  # fmt: skip
    finally:
        for p in procs.values():
            if p.poll() is None and p.stdin is not None:
                p.stdin.write("quit\n")
                p.stdin.close()
                p.wait(timeout=60)
    base = args.contenders[0]
    out: dict[str, Any] = {
        "model": model, "batch": batch, "rounds": args.rounds, "iters": iters,
        "base": base, "machine": machine(), "info": info, "contenders": {},
    }  # fmt: skip
    for c, ts in times.items():
        ratios = sorted(b / t for b, t in zip(times[base], ts))
        out["contenders"][c] = {
            "median_ms": statistics.median(ts) * 1e3,
            f"speedup_vs_{base}": statistics.median(ratios),
            "ratio_range": [ratios[0], ratios[-1]],
            "faster_rounds": sum(x > 1 for x in ratios),
            "times_ms": [round(t * 1e3, 3) for t in ts],
        }
    return out


def _report(res: dict[str, Any]) -> None:
    m, base, n = res["machine"], res["base"], res["rounds"]
    print(f"\n{res['model']} b{res['batch']}, {m['threads']} threads, {m['cpu']} "
          f"(ISA {m['isa']['level']}), {n} rounds across processes:")  # fmt: skip
    for c, r in res["contenders"].items():
        lo, hi = r["ratio_range"]
        speedup = r[f"speedup_vs_{base}"]
        print(f"  {c:30s} {r['median_ms']:8.1f} ms  {speedup:5.3f}x {base} (rounds "
              f"{lo:.3f}..{hi:.3f}, faster in {r['faster_rounds']}/{n})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224"])
    p.add_argument("--batch", nargs="+", type=int, default=[8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--contenders", nargs="+", default=["openvino-int8", "vitquant-int8"],
        help="the first is the reference of the ratios",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--iters", type=int, default=0, help="forwards per round (0: 20 at b1, else 3)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds idle before each turn")
    p.add_argument("--json", default="")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.models[0], args.batch[0], args.threads)
    results = []
    for model in args.models:
        for batch in args.batch:
            res = duel(model, batch, args)
            results.append(res)
            _report(res)
            if args.json:  # rewritten after each configuration: a cut-off run keeps its part
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(results, f, indent=1)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
