"""The search benchmark (issue 5): how many trials each strategy needs on recorded landscapes.

For every landscape (default: ``benchmarks/landscapes/*.json``), every strategy (random, grid,
tpe, gp, autotune) and 20 seeds, a study runs 20 trials against the landscape engine in this
process (Optuna InMemoryStorage, no worker process: a replay takes microseconds), once without
limits and once for each of two TPOT limits that put the optimum inside the space (80% and 60%
of the TPOT of the unconstrained best, relaxed until some grid point meets them). It prints,
per case, the median and worst regret after 4, 8, 12 and 20 trials (1 - best feasible
throughput found / best grid point's; 0 when at or above it), the out-of-memory trials that ran
(median, worst) and the trials spent on configurations the worker refused as infeasible.

    .venv/bin/python benchmarks/search.py                       # recorded landscapes
    .venv/bin/python benchmarks/search.py --landscape tests/data/synthetic-llama2-7b-8GiB.json

autotune runs as ``autotune run`` does, with early stop: it ends its study once its model has
converged ("trials run" says when), and later checkpoints keep the regret it ended with.

Targets: median regret <= 3% in <= 12 trials; at most one OOM trial run per study.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autotune import landscape as landscape_mod  # noqa: E402
from autotune.engines import EngineConfig  # noqa: E402
from autotune.engines.landscape import LandscapeEngine  # noqa: E402
from autotune.tune.prior import Limits  # noqa: E402
from autotune.tune.search import (  # noqa: E402
    SAMPLERS,
    InProcessRunner,
    make_sampler,
    run_in_process,
    start_prior,
)

CHECKPOINTS = (4, 8, 12, 20)
STRATEGIES = ("random", "grid", "tpe", "gp", "autotune")


@dataclass
class Result:
    regrets: list[float]  # after each checkpoint (a study that stopped keeps its last best)
    trials: int  # trials run (fewer than asked when autotune stopped early)
    oom: int  # trials that ran out of memory
    infeasible: int  # trials the worker refused (predicted not to fit)
    violated: int  # trials that ran but broke a latency limit


def tpot_limits(land: landscape_mod.Landscape) -> list[Limits]:
    """Two TPOT limits that move the optimum inside the space."""
    best = land.best()
    out = []
    for share in (0.8, 0.6):
        limit = best.tpot_ms * share
        while land.best(Limits(max_tpot_ms=limit)) is None:
            limit *= 1.05
        out.append(Limits(max_tpot_ms=round(limit, 1)))
    return out


def make_runner(path: str) -> tuple[InProcessRunner, landscape_mod.Landscape]:
    land = landscape_mod.read(path)
    wl = land.workload
    config = EngineConfig(
        model=wl["model"], engine="landscape", dtype=wl.get("dtype", "float16"), device="cpu",
        max_batch=land.batches[-1], max_seq_len=land.isl + land.osl,
        options=(("landscape", path),))
    return InProcessRunner(LandscapeEngine.load(config)), land


def run_one(runner: InProcessRunner, land: landscape_mod.Landscape, strategy: str, seed: int,
            limits: Limits, trials: int, early_stop: bool = True) -> Result:
    """One study; autotune stops early once converged, as ``autotune run`` does by default."""
    import optuna

    max_batch = land.batches[-1]
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize",
                                sampler=make_sampler(strategy, seed, max_batch))
    total = land.total_device_budget
    prior = None
    if strategy == "autotune":
        prior = start_prior(study, runner, total=total, isl=land.isl, osl=land.osl,
                            max_batch=max_batch, limits=limits,
                            h2d_gb_s=land.calibration.get("h2d_gb_s"))
    outcomes = run_in_process(study, runner, trials=trials, max_batch=max_batch, isl=land.isl,
                              osl=land.osl, total=total, limits=limits, prior=prior, seed=seed,
                              early_stop=early_stop)
    reference = land.best(limits).throughput_tok_s
    best, regrets = 0.0, []
    done = study.get_trials(deepcopy=False)
    for k in range(1, trials + 1):
        if k <= len(done):
            t = done[k - 1]
            if t.user_attrs.get("status") == "ok" and all(v <= 0 for v in t.constraints.values()):
                best = max(best, t.value)
        if k in CHECKPOINTS:
            regrets.append(max(0.0, 1.0 - best / reference))
    violated = sum(1 for t in study.trials if t.user_attrs.get("status") == "ok"
                   and any(v > 0 for v in t.constraints.values()))
    return Result(regrets, len(done), sum(o.status == "oom" for o in outcomes),
                  sum(o.status == "infeasible" for o in outcomes), violated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landscape", action="append", help="landscape file(s); default: "
                        "benchmarks/landscapes/*.json")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    paths = args.landscape or sorted(str(p) for p in (ROOT / "benchmarks" / "landscapes")
                                     .glob("*.json"))
    if not paths:
        print("no landscapes: record them on the GPU (see README, 'Landscapes') or pass "
              "--landscape FILE", file=sys.stderr)
        return 2
    strategies = args.strategies.split(",")
    for s in strategies:
        if s not in SAMPLERS:
            parser.error(f"unknown strategy {s}")
    cols = " | ".join(f"@{k} med / worst" for k in CHECKPOINTS)
    print(f"| landscape | limit | strategy | {cols} | trials run med / worst | "
          "OOM run med / worst | infeasible med | limit broken med | s |")
    print("|" + "---|" * (8 + len(CHECKPOINTS)))
    for path in paths:
        runner, land = make_runner(path)
        tag = Path(path).stem + (" (SYNTHETIC)" if land.synthetic else "")
        for limits in [Limits(), *tpot_limits(land)]:
            ref = land.best(limits)
            limit = (f"TPOT <= {limits.max_tpot_ms:g} ms" if limits.max_tpot_ms else "none")
            limit += f" (best {ref.throughput_tok_s:.1f} tok/s at batch {ref.batch}, " \
                     f"{ref.budget_fraction:.0%})"
            for strategy in strategies:
                t0 = time.perf_counter()
                results = [run_one(runner, land, strategy, seed, limits, args.trials)
                           for seed in range(args.seeds)]
                cells = []
                for i in range(len(CHECKPOINTS)):
                    r = [x.regrets[i] for x in results if i < len(x.regrets)]
                    cells.append(f"{100 * statistics.median(r):.1f}% / {100 * max(r):.1f}%"
                                 if r else "-")
                ooms = [x.oom for x in results]
                ran = [x.trials for x in results]
                print(f"| {tag} | {limit} | {strategy} | {' | '.join(cells)} | "
                      f"{statistics.median(ran):g} / {max(ran)} | "
                      f"{statistics.median(ooms):g} / {max(ooms)} | "
                      f"{statistics.median(x.infeasible for x in results):g} | "
                      f"{statistics.median(x.violated for x in results):g} | "
                      f"{time.perf_counter() - t0:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
