"""Parts a and b: the compiled kernels against float64, then EMA, loss and LARS against their
byte floors and the eager / ``_foreach`` baselines (fastbyol.bench.{ema,loss,lars}, run
as they are; their own JSON lands under ``<out>/micro/``)."""
from __future__ import annotations

import os
import traceback
from typing import Dict, List, Optional

from . import settings as S
from .targets import target


def part_kernels(pc) -> Dict:
    from fastbyol_kernels import check

    device = "cpu" if pc.settings.tiny else "cuda"
    res = check.run(device, quick=pc.settings.tiny, log=pc.log)
    rows = [{"case": c["name"], "result": "ok" if c["ok"] else "FAIL", "error": c["error"]} for c in res["cases"]]
    t = target("cases off their float64 reference", res["failed"], 0, higher_is_better=False)
    out = {"rows": rows, "md_rows": [r for r in rows if r["result"] != "ok"], "targets": [t], "summary": f"{res['total'] - res['failed']} of {res['total']} cases pass "
                                                    f"on {res['device']}", "failed": res["failed"]}
    if pc.settings.tiny:
        out["notes"] = ["tiny: CPU tensors under TRITON_INTERPRET=1 (the interpreter, not compiled kernels), "
                        "the benchmark sizes left out"]
    return out


def _row(rows: List[Dict], *, method: str, **match) -> Optional[Dict]:
    for r in rows:
        if method in r.get("method", "") and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def part_micro(pc) -> Dict:
    from fastbyol.bench import ema as bench_ema
    from fastbyol.bench import lars as bench_lars
    from fastbyol.bench import loss as bench_loss

    tiny = pc.settings.tiny
    out_dir = os.path.join(pc.out, "micro")  # their own JSON: scratch (the rows are in gpu-check's record)
    argv = (["--cpu", "--repeats", "2"] if tiny else []) + ["--out", out_dir]
    na = "a tiny CPU run (the floors are GPU targets)" if tiny else None
    rows, targets, errors = [], [], []
    # The loss also at the batch training runs per GPU (256; 16 in a tiny run), not only at 4096.
    train_batch = ["--batch", "16" if tiny else "256"]
    for name, bench, extra in (("ema", bench_ema, []), ("loss", bench_loss, []), ("lars", bench_lars, []),
                               ("loss@train-batch", bench_loss, train_batch)):
        pc.log(f"[micro] {name}")
        try:
            res = bench.main(list(argv) + extra)
        except Exception as e:  # one benchmark failing leaves the other two
            traceback.print_exc()
            errors.append(f"{name}: {type(e).__name__}: {e}")
            continue
        for r in res["rows"]:
            rows.append({"benchmark": name, "batch": res.get("B"), "dtype": r.get("dtype", "float32"), "mode": r.get("mode", ""),
                         "method": r["method"], "time_us": r["time_us"], "x_floor": r.get("x_floor"),
                         "ours_speedup": r.get("ours_speedup"), "max_abs_diff": r.get("max_abs_diff")})
        if name == "ema":
            ours, lerp = _row(res["rows"], method="fastbyol"), _row(res["rows"], method="lerp")
            targets.append(target("EMA time / byte floor", ours and ours["x_floor"], S.EMA_X_FLOOR, False, "x",
                                  na or (None if ours else "no fused row (Triton cannot run here)")))
            targets.append(target("EMA speed-up over _foreach_lerp_ (timm)", lerp and lerp.get("ours_speedup"),
                                  1.0, True, "x", na or (None if ours else "no fused row")))
        elif name == "loss":
            for dtype in ("float32", "bfloat16"):
                mode = "launched" if tiny else "graph"
                ours = _row(res["rows"], method="fastbyol", dtype=dtype, mode=mode)
                if ours is None and dtype == "bfloat16" and tiny:
                    continue
                targets.append(target(f"loss {dtype} fwd+bwd ({mode}) / byte floor", ours and ours["x_floor"],
                                      S.LOSS_X_FLOOR, False, "x", na))
            eager = _row(res["rows"], method="eager", dtype="float32", mode="launched")
            targets.append(target("loss float32 speed-up over eager PyTorch", eager and eager.get("ours_speedup"),
                                  S.LOSS_VS_EAGER, True, "x", na))
        elif name == "lars":
            # The Triton kernel pair where it ran (GPU), else the foreach LARS.
            ours = _row(res["rows"], method="fastbyol LARS Triton") or _row(res["rows"], method="fastbyol")
            targets.append(target("LARS step / byte floor", ours and ours["x_floor"], S.LARS_X_FLOOR, False, "x", na))
    out = {"rows": rows, "targets": targets}
    if errors:
        out["errors"] = errors
        if len(errors) == 4:
            raise RuntimeError("; ".join(errors))
    return out
