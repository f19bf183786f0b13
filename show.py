"""Draw one GiGPO group from a run's trajectories.jsonl: ``python siri.py show run.out_dir=DIR [unit=N] [group=K]``.

A group is the G rollouts of one task from the same initial state. The picture has one row per
trajectory and one cell per step. Cells whose steps start from the same observation (one anchor
state, GiGPO Eq. 5) share a colour and are linked across rows: those steps form one step group,
and their step advantages A^S compare the discounted returns R_t inside it (Eq. 7-8). Grey cells
are states no other drawn step visited (A^S = 0). Each cell shows the action and its joint
advantage A = A^E + ω·A^S (Eq. 9), with a green (A > 0) or red (A < 0) frame as thick as |A|. The
row ends show the episode return R(τ) (with the invalid-action penalty in the default "reward"
mode) and the episode advantage A^E (Eq. 3). In a Phase 2 skill-guided group the advantages were
computed together with the paired plain rollouts (not drawn), so a grey cell may have A^S ≠ 0. A
star marks a distilled step. The same group is printed as a table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from core import save_figure


def load_groups(path: Path) -> dict[int, list[tuple[str, list[dict]]]]:
    """{unit: [(label, rows of one group), ...]} from trajectories.jsonl, groups in file order; a
    group is one task's rollouts of one kind (plain or skill-guided). Rows without advantages
    (a skill's source trajectories) are skipped."""
    out: dict[int, dict[str, list[dict]]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if not row["steps"] or "A" not in row["steps"][0]:
            continue
        label = f"{row['group']}" + (" +skill" if row["skill_id"] else "")
        out.setdefault(row["unit"], {}).setdefault(label, []).append(row)
    return {u: list(groups.items()) for u, groups in out.items()}


def anchor_labels(rows: list[dict]) -> dict[str, str]:
    """A short label (A, B, ...) for every anchor state visited by two or more steps of the group."""
    counts: dict[str, int] = {}
    for r in rows:
        for s in r["steps"]:
            counts[s["anchor"]] = counts.get(s["anchor"], 0) + 1
    shared = [a for a, n in counts.items() if n > 1]
    names = [chr(ord("A") + i) if i < 26 else f"S{i}" for i in range(len(shared))]
    return dict(zip(shared, names))


def text_table(rows: list[dict], title: str) -> str:
    """The group as text: per trajectory R(τ), A^E, then each step as action [anchor] A."""
    labels = anchor_labels(rows)
    lines = [title, f"task: {rows[0]['task']}",
             "[X] = anchor state shared with other steps (one step group); · = visited once (A^S = 0); * = distilled", ""]
    for r in rows:
        cells = [f"{s['action'] or '(invalid)'} [{labels.get(s['anchor'], '·')}] A={s['A']:+.2f}"
                 + ("*" if s.get("distilled") else "") for s in r["steps"]]
        lines.append(f"τ{r['index']}  R={r['R']:+.2f}  A^E={r['steps'][0]['A_E']:+.2f}  "
                     f"{'won ' if r['won'] else 'lost'} | " + " → ".join(cells))
    return "\n".join(lines)


def draw(rows: list[dict], title: str, path: Path) -> None:
    """The group picture (see the module docstring) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    labels = anchor_labels(rows)
    light, pastel = plt.get_cmap("tab20").colors, plt.get_cmap("Pastel1").colors
    # light fills (black text stays legible), no green or red (they mean the sign of A on the frames)
    palette = [light[i] for i in (1, 3, 9, 11, 13, 17, 19)] + [pastel[i] for i in (1, 3, 4, 5, 6, 7)]
    colour = {a: palette[i % len(palette)] for i, a in enumerate(labels)}
    width = max(len(r["steps"]) for r in rows)
    scale = max((abs(s["A"]) for r in rows for s in r["steps"]), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(2.0 + 1.9 * width + 2.2, 1.0 + 0.95 * len(rows)))
    centres: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i
        for t, s in enumerate(r["steps"]):
            a = s["A"]
            ax.add_patch(Rectangle((t + 0.05, y + 0.1), 0.9, 0.8, facecolor=colour.get(s["anchor"], (0.9, 0.9, 0.9)),
                                   edgecolor="tab:green" if a > 0 else "tab:red" if a < 0 else "grey",
                                   linewidth=0.5 + 3.5 * abs(a) / scale))
            action = (s["action"] or "(invalid)")[:22]
            mark = " ★" if s.get("distilled") else ""
            ax.text(t + 0.5, y + 0.62, action, ha="center", va="center", fontsize=6.5)
            ax.text(t + 0.5, y + 0.3, f"[{labels.get(s['anchor'], '·')}] A={a:+.2f}{mark}", ha="center",
                    va="center", fontsize=7, fontweight="bold")
            if s["anchor"] in labels:
                centres.setdefault(s["anchor"], []).append((t + 0.5, y + 0.5))
        ax.text(-0.1, y + 0.5, f"τ{r['index']}", ha="right", va="center", fontsize=9)
        ax.text(width + 0.1, y + 0.5, f"R={r['R']:+.2f}  A^E={r['steps'][0]['A_E']:+.2f}"
                + ("  won" if r["won"] else "  lost"), ha="left", va="center", fontsize=8)
    for anchor, points in centres.items():  # link each step group from row to row (first visit per row)
        first: dict[float, float] = {}
        for x, y in points:
            first[y] = min(x, first.get(y, x))
        rows_y = sorted(first, reverse=True)
        for y0, y1 in zip(rows_y, rows_y[1:]):
            ax.plot([first[y0], first[y1]], [y0 - 0.4, y1 + 0.4], color=colour[anchor], linewidth=1.2,
                    alpha=0.8, zorder=0)
    ax.set_xlim(-0.8, width + 2.3)
    ax.set_ylim(-0.1, len(rows) + 0.1)
    ax.axis("off")
    ax.set_title(f"{title}\n{rows[0]['task']}   (colour + letter: one anchor state = one step group; "
                 "frame: green A>0, red A<0, width ∝ |A|; ★ distilled)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def main(argv: list[str]) -> Path:
    """`siri.py show` entry: key=value arguments run.out_dir (required), unit, group."""
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "run.out_dir" not in args:
        raise SystemExit("usage: python siri.py show run.out_dir=DIR [unit=N] [group=K]")
    run_dir = Path(args["run.out_dir"])
    path = run_dir / "trajectories.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} not found (runs write it when run.log_groups > 0)")
    groups = load_groups(path)
    if not groups:
        raise SystemExit(f"error: {path} holds no training group")
    unit = int(args.get("unit", max(groups)))
    if unit not in groups:
        raise SystemExit(f"error: unit {unit} logged no group; units with groups: {sorted(groups)}")
    k = int(args.get("group", 0))
    if not 0 <= k < len(groups[unit]):
        raise SystemExit(f"error: unit {unit} has groups 0..{len(groups[unit]) - 1}")
    label, rows = groups[unit][k]
    rows = sorted(rows, key=lambda r: r["index"])
    title = f"unit {unit} ({rows[0]['phase']}{', ' + rows[0]['arm'] if rows[0]['arm'] else ''}), group {k}: {label}"
    print(text_table(rows, title))
    out = run_dir / f"group_u{unit:03d}_g{k}.png"
    draw(rows, title, out)
    print(f"\nwrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
