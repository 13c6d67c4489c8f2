"""Results table and curves of finished runs."""
import os


def summary(history):
    last = history[-1]
    return {"rounds": last["round"], "accuracy": last["accuracy"], "f1": last["f1"],
            "best_accuracy": max(r["accuracy"] for r in history),
            "sec_per_round": sum(r["seconds"] for r in history) / len(history),
            "mb_up_per_round": sum(r["bytes_up"] for r in history) / len(history) / 2**20,
            "mb_down_per_round": sum(r["bytes_down"] for r in history) / len(history) / 2**20}


def table(results, title=""):
    """results: {name: history} -> a Markdown table (printed and returned)."""
    head = "| run | rounds | accuracy | macro-F1 | best acc | s/round | MB up/round | MB down/round |"
    lines = [title, "", head, "|" + "---|" * 8] if title else [head, "|" + "---|" * 8]
    for name, history in results.items():
        s = summary(history)
        lines.append(f"| {name} | {s['rounds']} | {s['accuracy']:.4f} | {s['f1']:.4f} | {s['best_accuracy']:.4f} | "
                     f"{s['sec_per_round']:.2f} | {s['mb_up_per_round']:.2f} | {s['mb_down_per_round']:.2f} |")
    return "\n".join(lines)


def plot_curves(results, path):
    """Accuracy and macro-F1 per round for every run, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, history in results.items():
        rounds = [r["round"] for r in history]
        axes[0].plot(rounds, [r["accuracy"] for r in history], label=name)
        axes[1].plot(rounds, [r["f1"] for r in history], label=name)
    for ax, label in zip(axes, ("accuracy", "macro-F1")):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
