"""The report's "Secure aggregation" section (issue 22) from the members' SecureViews
(secure.py): the plan, ε by the accountant, what a member learns, and per round the
outcome, who dealt, entered and was selected, who was left out or named and why, and the
ledger's charge. Every string from a state dir is HTML-escaped."""

from __future__ import annotations

import html
import posixpath
from pathlib import Path
from typing import Any

from node.ops.report_html.secure import (
    DOC,
    MAX_TABLE_ROUNDS,
    MAX_TEXT,
    SecureRound,
    SecureView,
    delta_text,
    disagreements,
)

MUTED_DASH = '<span class="muted">—</span>'
# docs/privacy-secure.md "What the agreement does not close": the entry and sum agreements
# close the split views; what is left (a member missing the opening keeps another model).
# Keep this sentence as far as that section goes; drop it (and the anchor) when it does.
KNOWN_HOLE = ("The mode is experimental: the members agree on who entered before any degree-2 "
              "value (norms, distances) leaves and on what they open before any sum piece "
              "leaves; a member whose round failed while others opened keeps a different "
              "model (named missed_opening) ")
HOLE_ANCHOR = "#what-the-agreement-does-not-close"

# What a member learns, per variant (docs/privacy-secure.md "What each party learns").
LEARNS = {
    "sum_only": "the noised sum of the contributions that entered the round, and who dealt, "
                "entered and was named; nothing per member (no norms, no distances)",
    "distances": "the sum of the selected members' contributions, every entered member's "
                 "squared norm and every pair's squared distance, who entered, who was "
                 "selected and who was named",
    "norm_only": "the sum of the members under the norm bound, every entered member's "
                 "squared norm, who passed and who was named",
    "range": "the noised sum of the members in range, one bit per entered member (in range "
             "or not: node/secagg/range_check.py), who dealt, entered and was named",
}


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _short(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


def _who(names: list[str], universe: list[str]) -> str:
    """"all 8" or "6 of 8" with who is missing."""
    n = len(universe)
    if not names:
        return f"none of {n}" if n else "none"
    if set(names) >= set(universe):
        return f"all {len(names)}"
    missing = [m for m in universe if m not in set(names)]
    return (f"{len(names)} of {n}" + (f' <span class="muted">(not {_e(", ".join(missing))})'
                                       "</span>" if missing else ""))


def _kept(ev: str | list[str] | None) -> str:
    """What the node kept for a named member: one file is a dealer's signed deal; a list is
    the signed messages of an agreement step's split (shown as their folder)."""
    if not ev:
        return ""
    if isinstance(ev, str):
        return f' <span class="muted">(its signed deal kept: {_e(ev)})</span>'
    try:
        where = posixpath.commonpath(ev) if len(ev) > 1 else posixpath.dirname(ev[0])
    except ValueError:  # absolute and relative mixed: not one folder
        where = ""
    where = where or ", ".join(ev)
    return (f' <span class="muted">(the signed messages of the split kept: '
            f'{_e(_short(where))} ({len(ev)} file{"s" if len(ev) != 1 else ""}))</span>')


def _why_list(d: dict[str, str], view: SecureView | None = None,
              evidence: dict[str, str | list[str]] | None = None) -> str:
    if not d:
        return "none"
    out = []
    for m, why in sorted(d.items()):
        out.append(f"<div><b>{_e(m)}</b>: {_e(_short(why))}{_kept((evidence or {}).get(m))}"
                   "</div>")
    return "".join(out)


def _outcome(sr: SecureRound) -> str:
    if sr.unreadable:
        return f'<span class="neg">unreadable</span><div class="muted">{_e(sr.unreadable)}</div>'
    if sr.ok is None:
        return ('<span class="muted">charged, no outcome recorded (the node stopped before '
                "the round closed?)</span>")
    if sr.ok:
        return '<span class="pos">opened</span>'
    return (f'<span class="neg">failed: <b>{_e(sr.reason)}</b></span>'
            + (f'<div class="muted">{_e(_short(sr.detail))}</div>' if sr.detail else ""))


def _charge(sr: SecureRound, dp: bool) -> str:
    if not sr.charged:
        if dp and sr.ok:  # DP on the sum: an opened round the ledger never charged
            return '<span class="neg">none (an opened round without a charge)</span>'
        return "none" if dp else MUTED_DASH
    return ", ".join(f"{m} contributors" for m in sr.charged) + (
        ' <span class="neg">(charged twice)</span>' if len(sr.charged) > 1 else "")


def _universe(views: list[SecureView], names: list[str] | None) -> list[str]:
    if names:
        return sorted(names)
    seen: set[str] = set()
    for v in views:
        for sr in v.rounds.values():
            seen.update(sr.dealt)
    return sorted(seen)


def _doc_link(anchor: str = "") -> str:
    """docs/privacy-secure.md as a link to this checkout's copy when there is one (a report
    opened elsewhere still names the page)."""
    here = Path(__file__).resolve().parents[3] / DOC
    if here.is_file():
        return f'<a href="{_e(here.as_uri() + anchor)}"><code>{DOC}</code></a>'
    return f"<code>{DOC}</code>"


def _facts(view: SecureView, views: list[SecureView], rules: dict[str, Any],
           universe: list[str]) -> str:
    items: list[tuple[str, str]] = []
    plan = view.plan
    rounds = [sr for sr in view.rounds.values() if sr.ok is not None or sr.unreadable]
    opened = sum(1 for sr in rounds if sr.ok)
    reasons: dict[str, int] = {}
    for sr in rounds:
        if sr.ok is False:
            reasons[sr.reason or "?"] = reasons.get(sr.reason or "?", 0) + 1
    unreadable = sum(1 for sr in rounds if sr.unreadable)
    text = f"{len(rounds)} closed: {opened} opened"
    if reasons:
        text += ", " + ", ".join(f'<span class="neg">{n} failed ({_e(r)})</span>'
                                 for r, n in sorted(reasons.items()))
    elif rounds:
        text += ", none failed"
    if unreadable:
        text += f', <span class="neg">{unreadable} unreadable</span>'
    items.append(("rounds", text))
    t = plan.coalition if plan is not None else (
        view.charge_coalition if view.charge_coalition is not None
        else rules.get("secure_threshold"))
    n = plan.members if plan is not None else view.charge_members or len(universe) or None
    if plan is not None:
        items.append(("plan", _e(
            f"n {plan.members} members, t {plan.coalition} (colluding members tolerated), "
            f"floor {plan.min_contributors} contributors, σ {plan.noise_multiplier:.4g} on the "
            f"sum, sampling q {plan.sample_rate:.4g} of {plan.rows_total} rows, "
            f"{plan.steps} rounds, lr {plan.lr:.4g}, clip C {plan.clip_norm:g}, "
            f"ε budget {'none' if plan.epsilon is None else f'{plan.epsilon:g}'} at "
            f"δ {plan.delta:g}; variant {plan.variant} "
            f"(plan {plan.digest()})")))
    elif view.plan_problem:
        items.append(("plan", f'<span class="neg">{_e(view.plan_problem)}</span>'))
    else:
        items.append(("plan", _e(
            f"n {n if n is not None else '?'} members, t {t if t is not None else '?'} "
            "(colluding members tolerated); no DP on the sum (privacy off): no σ, no floor "
            "of contributors" + (f"; selection {rules['secure_select']}"
                                 if isinstance(rules.get("secure_select"), str) else ""))))
    eps = {v.member: v.epsilon for v in views}
    if view.ledger_problem and len(views) == 1:
        items.append(("ε spent", f'<span class="neg">{_e(view.ledger_problem)}</span>'))
    elif any(e is not None for e in eps.values()):
        budget = f" of {plan.epsilon:g}" if plan is not None and plan.epsilon is not None else ""
        delta = ("" if view.delta is None else f" at {delta_text(plan.delta, view.delta)}"
                 if plan is not None else f" at δ {view.delta:g}")
        vals = {round(e, 4) for e in eps.values() if e is not None}
        if len(views) == 1 and view.epsilon is not None:
            spent = f"{view.epsilon:.4f}{budget}"
        elif len(views) > 1 and len(vals) == 1 and None not in eps.values():
            spent = f"{next(iter(vals)):.4f}{budget} for every member"
        else:
            spent = ", ".join(f"{_e(m)} {e:.4f}" if e is not None else
                              f'{_e(m)} <span class="neg">unreadable</span>'
                              for m, e in eps.items()) + budget
        floor = plan.min_contributors if plan is not None else None
        items.append(("ε spent", f"{spent}{delta}: the rdp accountant over the ledger's "
                      f"{view.charges} secure charge{'s' if view.charges != 1 else ''}, each "
                      "counting only the noise of the contributors outside a coalition of t"
                      + (f", at the plan's floor of {floor} contributors (a round never opens "
                         "with fewer; more contributors add noise, so a charge over-counts, "
                         "never under-counts)" if floor is not None else "")))
    else:
        items.append(("ε spent", "no secure charge in the ledger (no DP on the sum)"))
    variant = plan.variant if plan is not None else (
        "sum_only" if view.reveal == "sum" else
        {"multi-krum": "distances", "norm": "norm_only"}.get(str(rules.get("secure_select"))))
    learns = LEARNS.get(str(variant))
    items.append(("what a member learns", (
        f"In this mode ({_e(variant)}) a member learns {learns}; no other member's "
        f"contribution, unless more than t members pool their pieces ({_doc_link()}). "
        if learns else f"see {_doc_link()}. ")
        + (f'<span class="neg">{KNOWN_HOLE}</span>("What the agreement does not close" in '
           f'{_doc_link(HOLE_ANCHOR)}).' if variant != "sum_only" else
           "The agreement step opens the sum only for a selection a quorum agreed on "
           f"(experimental: {_doc_link(HOLE_ANCHOR)}).")))
    return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>"
                                          for k, v in items) + "</dl>"


def _plain(sr: SecureRound) -> tuple | None:
    """What an uneventful opened round looks like (None: a round worth its own row)."""
    if not sr.ok or sr.unreadable or sr.excluded or sr.named or sr.evidence:
        return None
    return (tuple(sr.dealt), tuple(sr.entered), tuple(sr.selected), tuple(sr.charged))


def _groups(view: SecureView) -> list[list[int]]:
    """Consecutive rounds that opened alike (same dealers, entrants, selection and charge,
    nobody left out or named) share one row; every other round has its own."""
    out: list[list[int]] = []
    for r in sorted(view.rounds):
        sig = _plain(view.rounds[r])
        if (out and sig is not None and out[-1][-1] == r - 1
                and _plain(view.rounds[out[-1][-1]]) == sig):
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _table(view: SecureView, universe: list[str], dp: bool) -> str:
    groups = _groups(view)
    shown = groups
    if len(groups) > MAX_TABLE_ROUNDS:  # the first rows and every round that did not open
        keep = groups[:MAX_TABLE_ROUNDS // 2]
        keep += [g for g in groups[MAX_TABLE_ROUNDS // 2:] if not view.rounds[g[0]].ok]
        shown = keep[:MAX_TABLE_ROUNDS]
    rows = []
    for g in shown:
        sr = view.rounds[g[0]]
        bad = sr.ok is False or sr.unreadable
        ready = sr.ok is not None

        def step(names: list[str], sr: SecureRound = sr, ready: bool = ready) -> str:
            if not ready:
                return MUTED_DASH
            if sr.ok is False and not names:  # the round failed before this step
                return '<span class="muted">not reached</span>'
            return _who(names, universe)

        reached = ready and (sr.ok or sr.selected or sr.excluded)
        first, last = view.rounds[g[0]].epsilon, view.rounds[g[-1]].epsilon
        eps = (MUTED_DASH if last is None else f"{last:.3f}" if len(g) == 1 or first is None
               else f"{first:.3f} → {last:.3f}")
        label = (f"{g[0] + 1}" if len(g) == 1 else
                 f'{g[0] + 1}–{g[-1] + 1}<div class="muted">{len(g)} rounds</div>')
        cells = [f"<td>{label}</td>", f'<td class="wrap">{_outcome(sr)}</td>',
                 f"<td>{step(sr.dealt)}</td>", f'<td class="wrap">{step(sr.entered)}</td>',
                 f'<td class="wrap">{step(sr.selected)}</td>',
                 f'<td class="wrap">{_why_list(sr.excluded) if reached else step([])}</td>',
                 f'<td class="wrap">{_why_list(sr.named, evidence=sr.evidence) if ready else MUTED_DASH}'
                 "</td>"]
        if dp:
            cells += [f"<td>{_charge(sr, dp)}{' each' if len(g) > 1 and sr.charged else ''}</td>",
                      f"<td>{eps}</td>"]
        rows.append(f'<tr{" class=attacker" if bad else ""}>{"".join(cells)}</tr>')
    more = sum(len(g) for g in groups) - sum(len(g) for g in shown)
    return ('<h3>Each secure round</h3><p class="sub">Consecutive rounds that opened alike '
            "share a row. " + ("Ledger charge: the contributors the round was charged for; "
                               "ε after: what the node logged when the round closed (the "
                               "accountant's then). " if dp else "") + "</p>"
            '<div class="scroll"><table><thead><tr><th>round</th>'
            '<th class="l">outcome</th>'
            '<th>dealt</th><th class="l">entered</th><th class="l">selected</th>'
            '<th class="l">left out by the selection</th><th class="l">named (at fault, or a '
            "disputed claim)</th>"
            + ("<th>ledger charge</th><th>ε after</th>" if dp else "")
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
            + (f'<p class="sub">{more} more opened rounds not shown (every failed round is).</p>'
               if more else ""))


def secure_section(views: list[SecureView], rules: dict[str, Any] | None = None,
                   members: list[str] | None = None) -> str:
    """The section, from the first member's view (a run dir: the others are compared with
    it); "" when no view (not a secure consortium)."""
    if not views:
        return ""
    rules = rules or {}
    view = views[0]
    universe = _universe(views, members)
    dp = view.plan is not None or view.charges > 0
    if len(views) > 1:
        differ = disagreements(views)
        agree = (f'<p class="sub">From {_e(view.member)}\'s own records; the other '
                 f"{len(views) - 1} members' records give the same outcome, entered, selected "
                 "and named set for every round.</p>" if not differ else
                 f'<div class="notes"><b>The members\' records differ in {len(differ)} '
                 "round(s)</b> (honest members compute the same from the same messages: see "
                 f"the known hole in {_doc_link()}). Shown below: {_e(view.member)}'s view."
                 "<ul>" + "".join(f"<li>round {r + 1}: " + "; ".join(_e(x) for x in lines)
                                  + "</li>" for r, lines in sorted(differ.items())[:20])
                 + "</ul></div>")
    else:
        agree = (f'<p class="sub">From this member\'s own records ({_e(view.member)}: '
                 "audit.jsonl, ledger.jsonl, secure_plan.json).</p>")
    return ("<h2>Secure aggregation</h2>"
            '<p class="sub">Each round the members exchanged sealed Shamir pieces of their '
            "contributions, never the contributions, and opened only the round's aggregate "
            "(node/runtime/secure_round.py). Dealt: whose pieces arrived; entered: whose "
            "pieces checked out consistent; selected: whose contribution is in the sum. A "
            "round that fails keeps the model it started from; under DP it is still charged "
            "(the charge is written before any piece leaves).</p>"
            + agree + _facts(view, views, rules, universe) + _table(view, universe, dp))


__all__ = ["LEARNS", "secure_section"]
