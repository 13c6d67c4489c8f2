"""Results table and curves of finished runs, for any task: the metric columns are
the task's own (every numeric field of a metrics row that is not bookkeeping)."""
import os

BOOKKEEPING = ("round", "loss", "seconds", "bytes_up", "bytes_down", "clients", "rejected", "aggregated", "bank_size",
               "epsilon", "dp_delta")


def metric_names(history):
    """The task's metrics, in the order the rows hold them (rows of rounds without
    evaluation, --eval-every, hold none)."""
    for row in history:
        names = [k for k, v in row.items() if k not in BOOKKEEPING and isinstance(v, (int, float))]
        if names:
            return names
    return []


def summary(history, main=None):
    names = metric_names(history)
    main = main or names[0]
    last = [r for r in history if main in r][-1]  # the last evaluated round (the last round is always one)
    return {"rounds": history[-1]["round"], **{k: last[k] for k in names},
            f"best_{main}": max(r[main] for r in history if main in r),
            "sec_per_round": sum(r["seconds"] for r in history) / len(history),
            "mb_up_per_round": sum(r["bytes_up"] for r in history) / len(history) / 2**20,
            "mb_down_per_round": sum(r["bytes_down"] for r in history) / len(history) / 2**20}


def table(results, title="", main=None):
    """results: {name: history} -> a Markdown table (returned). main: the metric whose
    best round gets a column (default: the first metric)."""
    names = metric_names(next(iter(results.values())))
    main = main or names[0]
    private = any("epsilon" in h[-1] for h in results.values())  # DP runs: the final epsilon too
    head = ("| run | rounds | " + " | ".join(names) + f" | best {main} | s/round | MB up/round | MB down/round |"
            + (" ε (δ) |" if private else ""))
    rule = "|" + "---|" * (len(names) + 6 + private)
    lines = ([title, ""] if title else []) + [head, rule]
    for run, history in results.items():
        s = summary(history, main)
        cells = [str(s["rounds"]), *(f"{s[k]:.4f}" for k in names), f"{s['best_' + main]:.4f}",
                 f"{s['sec_per_round']:.2f}", f"{s['mb_up_per_round']:.2f}", f"{s['mb_down_per_round']:.2f}"]
        if private:
            last = history[-1]
            cells.append(f"{last['epsilon']:.2f} ({last['dp_delta']:g})" if "epsilon" in last else "no DP")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results, path):
    """Every metric per round for every run, one panel per metric, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for run, history in results.items():
        for ax, name in zip(axes[0], names):
            rows = [r for r in history if name in r]
            ax.plot([r["round"] for r in rows], [r[name] for r in rows], label=run)
    for ax, name in zip(axes[0], names):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
