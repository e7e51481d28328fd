"""NEPENTHE figures and Table 2.2 rows (thesis sec. 2.6).

    python scripts/plot_nepenthe.py RUN_DIR                 # Table 2.2 rows per round + Fig. 2.13 (last round)
    python scripts/plot_nepenthe.py RUN_DIR --round 6 --out states.png
    python scripts/plot_nepenthe.py --analytic fig2_12.png   # Fig. 2.12 from regstory.pruning.nepenthe_analytic

RUN_DIR is a run folder of ``method=nepenthe`` (its ``rounds.jsonl``). The table also reads an IMP (or any pruning
sweep) run: its six lowest layer entropies come from the ``entropy/<layer>`` keys every sweep records, and a layer
counts as removable when its entropy is 0. Fig. 2.13 needs NEPENTHE's ``states_*`` keys: per layer, neurons with
non-zero entropy (blue), always OFF (orange), always ON (red). Without ``--out`` the figure is written to
``RUN_DIR/nepenthe_states_round<k>.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TABLE_LAYERS = 6


def read_rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    if not path.exists():
        raise SystemExit(f"plot_nepenthe: no rounds.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def layer_entropies(record: dict) -> dict[str, float]:
    """Per layer: NEPENTHE's ``layer_entropy/`` (removed layers at 0), else the sweep's ``entropy/`` keys."""
    own = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("layer_entropy/")}
    return own or {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("entropy/")}


def table_rows(rounds: list[dict]) -> list[str]:
    """Table 2.2's columns (the six lowest layer entropies, top-1) plus sparsity, removable layers, depth."""
    head = ["round", "sparsity"] + [f"H{k + 1}" for k in range(TABLE_LAYERS)] + ["top-1", "removable", "depth"]
    lines = [" | ".join(head)]
    for r in rounds:
        ent = layer_entropies(r)
        low = sorted(ent.values())[:TABLE_LAYERS]
        removable = r.get("removable_layers", sum(1 for v in ent.values() if v == 0))
        depth = r.get("depth_after_collapse", "")
        cells = [str(r["round"]), f"{r.get('sparsity', 0):.4f}"] + [f"{h:.3f}" for h in low]
        cells += [""] * (TABLE_LAYERS - len(low))
        acc = r.get("test_acc")
        cells += [f"{100 * acc:.2f}" if acc is not None else "", str(removable), str(depth)]
        lines.append(" | ".join(cells))
    return lines


def plot_states(record: dict, out: Path) -> None:
    """Fig. 2.13: stacked bars of the neuron states per layer."""
    layers = [k.split("/", 1)[1] for k in record if k.startswith("states_nonzero/")]
    if not layers:
        raise SystemExit("plot_nepenthe: this round has no states_* keys (not a method=nepenthe run)")
    counts = {kind: np.array([record[f"states_{kind}/{site}"] for site in layers]) for kind in ("nonzero", "off", "on")}
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.2))
    bottom = np.zeros(len(layers))
    for kind, colour, label in (("nonzero", "tab:blue", "non-zero entropy"), ("off", "tab:orange", "always OFF"),
                                ("on", "tab:red", "always ON")):
        ax.bar(x, counts[kind], bottom=bottom, color=colour, label=label)
        bottom += counts[kind]
    ax.set_xticks(x, [str(i + 1) for i in range(len(layers))])
    ax.set_xlabel("layer (ReLU call site, forward order)")
    ax.set_ylabel("neurons")
    ax.set_title(f"neuron states, round {record['round']} (sparsity {100 * record.get('sparsity', 0):.1f}%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)


def plot_analytic(out: Path) -> None:
    """Fig. 2.12: (a) pruned weight distribution, (b) eq. 2.20, (c) entropy vs T, eq. 2.21 printed and normalised,
    with Monte Carlo points of the stated model."""
    from regstory.pruning import nepenthe_analytic as na

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    w = np.linspace(-4, 4, 801)
    axes[0].plot(w, na.weight_density(w, -np.inf), color="grey", label="dense")
    axes[0].plot(w, na.weight_density(w, 1.0), color="tab:blue",
                 label=f"T = 1 (point mass {na.pruned_fraction(1.0):.2f} at 0)")
    axes[0].set(xlabel="w", ylabel="density", title="(a) eq. 2.18")
    axes[0].legend(fontsize=7, loc="upper left")
    z = np.linspace(-3, 3, 601)
    for t in (0.0, 0.5, 1.0, 2.0):
        axes[1].plot(z, na.preactivation_density(z, t), label=f"T = {t:g}")
    axes[1].set(xlabel="z", ylabel="f_Z(z, T)", ylim=(0, 1.2), title="(b) eq. 2.20 (integrates to 1 - erf(T/sqrt 2))")
    axes[1].legend(fontsize=8)
    t = np.linspace(0, 6, 241)
    axes[2].plot(t, na.entropy_printed(t), color="tab:red", label="eq. 2.21 as printed")
    axes[2].plot(t, na.entropy_normalised(t), color="tab:blue", label="eq. 2.21 normalised")
    mc = np.arange(0.0, 4.01, 0.5)
    axes[2].plot(mc, na.binary_entropy([na.monte_carlo_p_on(v) for v in mc]), "k.", label="Monte Carlo, W X")
    axes[2].set(xlabel="threshold T", ylabel="entropy (bits)", title=f"(c) entropy, eps = {na.EPS:g}")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a method=nepenthe (or IMP) run folder")
    parser.add_argument("--round", type=int, default=None, help="round for Fig. 2.13 (default: the last)")
    parser.add_argument("--out", type=Path, default=None, help="Fig. 2.13 output (png/pdf)")
    parser.add_argument("--analytic", type=Path, default=None, help="write Fig. 2.12 here")
    args = parser.parse_args(argv)
    if args.run_dir is None and args.analytic is None:
        parser.error("give a RUN_DIR, --analytic OUT, or both")
    if args.analytic is not None:
        plot_analytic(args.analytic)
        print(f"Fig. 2.12 -> {args.analytic}")
    if args.run_dir is not None:
        rounds = read_rounds(args.run_dir)
        print("\n".join(table_rows(rounds)))
        if any(k.startswith("states_nonzero/") for k in rounds[-1]):
            record = rounds[-1] if args.round is None else next((r for r in rounds if r["round"] == args.round), None)
            if record is None:
                raise SystemExit(f"plot_nepenthe: no round {args.round} in {args.run_dir}")
            out = args.out or args.run_dir / f"nepenthe_states_round{record['round']}.png"
            plot_states(record, out)
            print(f"Fig. 2.13 -> {out}")


if __name__ == "__main__":
    sys.exit(main())
