"""The PNG plots of a run's report: the metric per round per member (with the
centralized and local-only levels and the 95 % intervals), ε spent per round, bytes per
round. matplotlib (Agg) is imported only when the plots are drawn."""

from __future__ import annotations

import io
import math
from typing import Any

from node.ops.report_html.reader import Member, Run

LABEL_CHARS = 40


def _label(name: str) -> str:
    """A member name as matplotlib shows it literally: no mathtext, not hidden."""
    text = name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS - 1] + "…"
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", pad_inches=0.15)
    import matplotlib.pyplot as plt  # lean start: matplotlib only once a plot is drawn

    plt.close(fig)
    return buf.getvalue()


def _series(m: Member, what: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in sorted(m.rounds):
        v = getattr(m.rounds[r], what)
        if v is not None and math.isfinite(v):
            xs.append(r + 1)
            ys.append(v)
    return xs, ys


def _lines(ax: Any, members: list[Member], what: str, colors: list[str],
           scale: float = 1.0, together: str = "every member", thin: bool = False) -> None:
    """One line per member; members whose curves are identical (they hold the same model)
    share one line, named after all of them (black, and `together`, when that is all)."""
    groups: dict[tuple, list[tuple[int, Member]]] = {}
    for i, m in enumerate(members):
        xs, ys = _series(m, what)
        if xs:
            groups.setdefault((tuple(xs), tuple(y * scale for y in ys)), []).append((i, m))
    for (xs, ys), group in groups.items():
        i, first = group[0]
        attack = any(m.attack for _, m in group)
        if len(group) > 1 and len(groups) == 1:
            color, label = "black", together
        else:
            color = colors[i % len(colors)]
            names = [_label(m.name) + (" (attacker)" if m.attack else "") for _, m in group]
            label = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4
                                            else "")
        ax.plot(xs, ys, color=color, lw=1.1 if thin else 2 if len(group) > 1 else 1.6,
                marker="o", ms=2 if thin else 3, alpha=0.8 if thin else 1.0,
                ls="--" if attack else "-", label=label)


def _finish(ax: Any, fig: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_below(fig, [ax])
    fig.tight_layout()


def _legend_below(fig: Any, axes: list[Any]) -> None:
    """One legend under the plot(s) for all their lines (a label once), so the plot keeps
    its width however many members there are."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), fontsize=8.5, loc="upper center",
                   bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(seen)), frameon=False)


def plots(run: Run, where: str = "the consortium test set") -> list[tuple[str, str, bytes]]:
    """(title, caption, PNG bytes) per plot: metric, ε (only with DP), bytes. `where`:
    what the metric is measured on."""
    # lean start: matplotlib (~0.5 s) only when the plots are drawn, never for status
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lean start: the same, after the backend is chosen

    s, members = run.summary, run.members
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    out = []
    metric = run.metric.replace("_", "-").upper() if run.metric != "accuracy" else "accuracy"

    fig, ax = plt.subplots(figsize=(10, 4.6))
    _lines(ax, members, "metric", colors,
           together="consortium (every member holds the same model)")
    local = False
    for i, m in enumerate(members):
        if m.local_only is not None and math.isfinite(m.local_only):
            local = True
            ax.axhline(m.local_only, color=colors[i % len(colors)], ls=":", lw=1.3,
                       label=f"{_label(m.name)} local-only")
    central = s.num("centralized")
    centralized = central is not None and math.isfinite(central)
    if centralized:
        ax.axhline(central, color="black", ls="--", lw=1.4, label="centralized (no DP)")
    banded = False
    for i, m in enumerate(members):  # the 95 % interval, where the member recorded one
        band = [(r + 1, p.low, p.high) for r, p in sorted(m.rounds.items())
                if p.low is not None and p.high is not None]
        if band:
            banded = True
            xs, lo, hi = zip(*band, strict=True)
            ax.fill_between(xs, lo, hi, color=colors[i % len(colors)], alpha=0.12, lw=0,
                            label=f"{_label(m.name)} 95 % interval")
    _finish(ax, fig, f"{metric} on {where}, per round", "round", metric)
    # the caption says what is drawn, no more (a member's own report has one line)
    solid = (f"Solid: {members[0].name}'s model after each round." if len(members) == 1 else
             "Solid: each member's model after each round (one black line when every "
             "member holds the same model; one line named after several members when they hold "
             "the same model" + ("; dashed colored: an attacker" if any(m.attack for m in members)
                                 else "") + ").")
    out.append((f"{metric} per round",
                solid
                + (" Dotted: each member trained alone on its own rows (local-only)." if local
                   else "")
                + (" Dashed black: the same model trained on all rows pooled (centralized)."
                   if centralized else "")
                + (" Shaded: the 95 % interval of the metric on the member's held-out rows "
                   "(Wilson for accuracy, Newcombe's score interval for ROC-AUC): how much of a "
                   "swing between rounds the number of rows alone explains." if banded else ""),
                _png(fig)))

    if any(_series(m, "epsilon")[0] for m in members):
        fig, ax = plt.subplots(figsize=(10, 4.2))
        _lines(ax, members, "epsilon", colors, together="every member")
        budget = s.num("epsilon", "budget")
        if budget is not None and math.isfinite(budget):
            ax.axhline(budget, color="crimson", ls="--", lw=1.2, label=f"budget ε = {budget:g}")
        delta = s.num("epsilon", "delta")
        _finish(ax, fig, "privacy spent per member (cumulative)", "round",
                "ε" + (f" at δ = {delta:g}" if delta is not None else ""))
        out.append(("ε per round", "ε each member has spent after each round, from its "
                    "privacy ledger (as the node recorded it in metrics.jsonl).", _png(fig)))

    if any(m.has_log and m.rounds for m in members):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
        for ax, what, title in ((axes[0], "sent", "sent"), (axes[1], "received", "received")):
            _lines(ax, [m for m in members if m.has_log], what, colors, scale=1e-3,
                   together="every member", thin=True)
            ax.set_title(f"bytes {title} per round", fontsize=11)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0].set_ylabel("kB (10³ bytes)")
        axes[0].set_ylim(bottom=0)
        fig.tight_layout()
        _legend_below(fig, list(axes))
        exact = all(m.bytes_per_round_field for m in members if m.has_log)
        out.append(("bytes per round", "Bytes each member's transport sent and received in "
                    "each round (envelopes, hellos and prekey announcements included)"
                    + ("." if exact else ", differenced from the cumulative counters in "
                       "metrics.jsonl; a round a node re-ran after a restart counts both runs. "
                       "A node sends its share in the background: a send still under way "
                       "when the node records its round counts in the next round, so a "
                       "sent curve can alternate between 0 and twice a round's bytes."),
                    _png(fig)))
    return out
