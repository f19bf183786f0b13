"""N seeds of {GiGPO-only, SIRI, SIRI with random skills} at equal budget: one table, one plot.

    python seeds.py                       # 3 seeds of the CPU default, into runs/seeds/
    python seeds.py --seeds 5 run.out_dir=runs/seeds5 warmup.iterations=20

Each seed is one `siri.py` run (run.seed = 0..N-1, run.out_dir = <out_dir>/seed_<k>) with
run.arms=[gigpo,siri,siri_random]: the three arms continue from the same warmup checkpoint with
the same update iterations, rollouts and seeds (siri.build_units), so within a seed they differ
only in the skills. Seeds 1.. start from seed 0's cold-started model (--coldstart shared, the
default; `seed_overrides` says why; --coldstart each: one cold start per seed). A seed whose
folder already holds a run is resumed (a finished one is only read), so the command can be
interrupted and run again. Output: <out_dir>/seeds.md (mean and
90 % interval of eval success per arm and of each arm − GiGPO, per seed), seeds.json, seeds.png.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

import siri
from core import atomic_write, save_figure

ARMS = ["gigpo", "siri", "siri_random"]
T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833}
"""two-sided 90 % Student-t quantiles (0.95) by degrees of freedom; 1.645 beyond"""


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 90 % Student-t interval of the mean over seeds (a point for one seed)."""
    x = np.asarray(values, float)
    if x.size < 2:
        return float(x.mean()), float(x.mean()), float(x.mean())
    half = T90.get(x.size - 1, 1.645) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def seed_dir(out_dir: Path, seed: int) -> Path:
    """The run folder of one seed."""
    return out_dir / f"seed_{seed}"


def seed_overrides(out_dir: Path, seed: int, overrides: list[str], coldstart: str) -> list[str]:
    """siri.py's arguments for one seed. coldstart="shared": a seed other than 0 starts from seed
    0's cold-started model (model.name=<out_dir>/seed_0/coldstart_model, coldstart.enabled=off),
    when seed 0's run has one (none without a cold start, e.g. an instruct model: nothing is shared).

    Our choice (default "shared"): the cold start stands in for the pretrained model, and the
    paper's seeds vary the RL on one set of pretrained weights, not the weights; it also takes a
    third of a CPU seed's time. The seeds' interval then measures the variation of the warmup and
    the arms (tasks, rollouts, updates), not that of the cold start; "each" gives every seed its
    own cold start (run.seed = k), and that variation too."""
    args = [*overrides, f"run.seed={seed}", f"run.out_dir={seed_dir(out_dir, seed)}", f"run.arms=[{','.join(ARMS)}]"]
    shared = seed_dir(out_dir, 0) / siri.COLDSTART_DIR
    if coldstart == "shared" and seed > 0 and (shared / "COMPLETE").exists():
        args += [f"model.name={shared.resolve()}", "coldstart.enabled=off"]
    return args


def seed_result(out: Path, seed: int, args: list[str]) -> dict:
    """Run (or resume, or just read) one seed with siri.py arguments `args`; its per-arm eval
    success and paired arm − GiGPO."""
    result = siri.main((["--resume"] if (out / "checkpoint").exists() else []) + args)
    evals, outcomes = result["evals"], result["outcomes"]
    row = {"seed": seed, **{arm: evals[arm]["eval/success"] for arm in ARMS},
           "warmup": evals["warmup"]["eval/success"]}
    for arm in ARMS[1:]:
        row[f"{arm}-gigpo"] = siri.paired_difference(outcomes[arm], outcomes["gigpo"])["all"][:3]
    return row


def write_table(rows: list[dict], out_dir: Path) -> str:
    lines = [f"# {len(rows)} seeds: eval success at equal budget (mean, 90 % t-interval over seeds)\n",
             "| arm | mean | 90 % interval | per seed |", "|---|---|---|---|"]
    for arm in ["warmup", *ARMS]:
        m, lo, hi = mean_interval([r[arm] for r in rows])
        label = siri.STAGE_LABELS.get(arm, arm)
        lines.append(f"| {label} | {m:.3f} | [{lo:.3f}, {hi:.3f}] | {', '.join(f'{r[arm]:.3f}' for r in rows)} |")
    lines += ["", "| difference | mean | 90 % interval over seeds | per seed (paired 90 % interval over eval episodes) |",
              "|---|---|---|---|"]
    for arm in ARMS[1:]:
        key = f"{arm}-gigpo"
        m, lo, hi = mean_interval([r[key][0] for r in rows])
        per = ", ".join(f"{d:+.3f} [{a:+.3f}, {b:+.3f}]" for d, a, b in (r[key] for r in rows))
        lines.append(f"| {arm} − gigpo | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {per} |")
    text = "\n".join(lines) + "\n"
    atomic_write(out_dir / "seeds.md", text)
    atomic_write(out_dir / "seeds.json", json.dumps(rows, indent=1))
    return text


def plot(rows: list[dict], path: Path) -> None:
    """One dot per seed and arm, the mean as a bar, the arms of one seed joined by a grey line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ["warmup", *ARMS]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.plot(range(len(arms)), [r[a] for a in arms], "-", color="0.8", zorder=1)
    for i, arm in enumerate(arms):
        vals = [r[arm] for r in rows]
        ax.bar(i, np.mean(vals), color=["tab:gray", "tab:purple", "tab:green", "tab:red"][i], alpha=0.35, zorder=0)
        ax.scatter([i] * len(vals), vals, color="black", s=14, zorder=2)
    ax.set_xticks(range(len(arms)), ["after warmup", "GiGPO-only", "SIRI", "SIRI\nrandom skills"])
    ax.set(ylabel="eval success (plain prompt)", title=f"{len(rows)} seeds, equal budget after the warmup")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (run.seed = 0..N-1)")
    parser.add_argument("--coldstart", choices=["shared", "each"], default="shared",
                        help="shared: seeds 1.. start from seed 0's cold-started model (see seed_overrides); "
                             "each: every seed runs its own cold start")
    parser.add_argument("overrides", nargs="*", help="siri.py overrides, e.g. warmup.iterations=5")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    for o in args.overrides:
        if o.split("=", 1)[0] in ("run.seed", "run.arms"):
            raise SystemExit(f"{o}: seeds.py sets run.seed and run.arms itself")
    outs = [o for o in args.overrides if o.startswith("run.out_dir=")]
    out_dir = Path(outs[-1].split("=", 1)[1]) if outs else Path("runs/seeds")
    rest = [o for o in args.overrides if not o.startswith("run.out_dir=")]
    rows = [seed_result(seed_dir(out_dir, s), s, seed_overrides(out_dir, s, rest, args.coldstart))
            for s in range(args.seeds)]
    text = write_table(rows, out_dir)
    plot(rows, out_dir / "seeds.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
