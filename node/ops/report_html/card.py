"""The model card section of a member's report.html (node/ops/report_member.py).

Which card: the one in the member's latest export, if `flnode export` recorded one in
the state dir (last_export.json, node/ops/export.py) and it is still there with the same
SHA-256, its signature checked against the key it declares (`flnode verify DIR
--consortium FILE` checks origin, files and weights); else the card's data read from the
state dir itself (node/ops/model_card.py: shares used per round, this member's ε from its
ledger through the accountant, its last metrics), unsigned, and said so. No torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gossip.errors import LocalError
from node.ops.report_html.render import _e, _fmt
from node.ops.report_html.secure import delta_text

LAST_EXPORT = "last_export.json"  # written by `flnode export` into the state dir
MAX_LAST_EXPORT_BYTES = 64 * 1024  # a path and a digest
MAX_ROUNDS_SHOWN = 20  # the card's table of shares used: the latest rounds; the JSON has all


def find_card(state_dir: Path, rounds_done: int) -> dict[str, Any]:
    """{"signed": bool, "card": {...}, "where": text, "signature": text}."""
    # lean start: nacl and the accountant, only when a report is written
    from node.ops.model_card import CARD_FILE, last_metrics, own_epsilon, shares_used
    from node.ops.model_verify import VerifyError, read_card, verify_signature

    note = ""
    pointer = state_dir / LAST_EXPORT
    if pointer.is_file():
        try:
            if pointer.stat().st_size > MAX_LAST_EXPORT_BYTES:
                raise ValueError(f"over {MAX_LAST_EXPORT_BYTES} bytes")
            rec = json.loads(pointer.read_bytes())
            where = Path(rec["dir"])
            raw = (where / CARD_FILE).read_bytes()
            if hashlib.sha256(raw).hexdigest() != rec["card_sha256"]:
                raise ValueError(f"{where / CARD_FILE} changed since the export wrote it")
            card, sig = read_card(where)
            fp, _, _ = verify_signature(card, sig, None)
            return {"signed": True, "card": card, "where": f"export {where}",
                    "signature": f"valid, by {sig.get('signer')} ({fp}), with the key the card "
                                 f"declares; <code>flnode verify {_e(where)} --consortium "
                                 "FILE</code> checks who signed it, the files and the weights"}
        except (OSError, ValueError, KeyError, TypeError, VerifyError) as exc:
            note = f"the latest export's card is not shown ({_e(str(exc)[:200])}); "
    try:
        card = {"shares_used": shares_used(state_dir, rounds_done),
                "privacy": {"own": own_epsilon(state_dir, rounds_done)},
                "evaluation": last_metrics(state_dir, rounds_done),
                "rounds": {"completed": rounds_done}}
    except LocalError as exc:
        return {"signed": False, "card": {}, "where": "state dir",
                "signature": note + f"unreadable: {_e(exc)}"}
    return {"signed": False, "card": card, "where": "this state dir",
            "signature": note + "none: no export of this member found (<code>flnode export"
                         "</code> writes a signed card)"}


def card_html(found: dict[str, Any]) -> str:
    c = found["card"]
    facts: list[tuple[str, str]] = [("card from", _e(found["where"])),
                                    ("signature", found["signature"])]
    cons = c.get("consortium")
    if isinstance(cons, dict):
        members = ", ".join(str(m.get("name")) for m in cons.get("members", [])
                            if isinstance(m, dict))
        facts.append(("consortium", f"{_e(cons.get('name'))} · id <code>"
                      f"{_e(str(cons.get('id'))[:16])}…</code> · members {_e(members)}"))
    r = c.get("rounds") or {}
    facts.append(("rounds", _e(f"{r.get('completed')} completed"
                               + (f" of {r.get('planned')}" if "planned" in r else ""))))
    agg = c.get("aggregation")
    if isinstance(agg, dict):
        rules = agg.get("rules") or {}
        facts.append(("aggregation", _e(f"{rules.get('aggregation', 'node default')}, f "
                                        f"{rules.get('f', '—')} · topology "
                                        f"{agg.get('topology')}")))
    own = (c.get("privacy") or {}).get("own") or {}
    eps = own.get("epsilon")
    upto = own.get("epsilon_model_rounds")
    facts.append(("ε (this member)", "no DP" if own.get("mode") == "off" else
                  f"{_fmt(eps if isinstance(eps, int | float) else None, 4)} at "
                  f"{_delta(own)} ({_e(own.get('accountant'))} accountant over its "
                  f"ledger, {_e(own.get('releases'))} releases; "
                  f"{_fmt(upto if isinstance(upto, int | float) else None, 4)} over the "
                  "releases of this model's rounds alone)"))
    others = (c.get("privacy") or {}).get("others")
    if others:
        facts.append(("ε (others)", _e(f"{', '.join(others)}: not known to this member (no ε "
                                       "is announced between members)")))
    ev = c.get("evaluation")
    if isinstance(ev, dict):
        metrics = " · ".join(f"{_e(k)} {_fmt(v, 4) if isinstance(v, int | float) else '—'}"
                             for k, v in (ev.get("metrics") or {}).items())
        facts.append(("metrics", f"{metrics} on {_e(ev.get('rows'))} rows"
                      + (f" ({_e(ev['on'])})" if ev.get("on") else "")))
    params = c.get("parameters")
    if isinstance(params, dict):
        facts.append(("parameters", f"{_e(params.get('count'))} · digest <code>"
                      f"{_e(params.get('digest'))}</code>"))
    if isinstance(c.get("manifest"), dict):
        facts.append(("manifest", f"SHA-256 <code>{_e(c['manifest'].get('sha256'))}</code>"))
    if c.get("flnode_version"):
        facts.append(("flnode", _e(c["flnode_version"])))
    out = ['<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in facts)
           + "</dl>"]
    used = c.get("shares_used") or {}
    rows = [r for r in used.get("rounds", []) if isinstance(r, dict)][-MAX_ROUNDS_SHOWN:]
    if rows:
        body = "".join(
            f"<tr><td>{_e(r.get('round'))}</td><td class=\"l\">{_e(r.get('rule'))}</td>"
            f'<td class="wrap">{_e(", ".join(map(str, r.get("used") or [])) or "none")}</td>'
            f'<td class="wrap">{_e(", ".join(f"{k}: {v}" for k, v in (r.get("excluded") or {}).items()) or "none")}'  # noqa: E501
            "</td></tr>" for r in rows)
        out.append('<div class="scroll"><table><thead><tr><th>round</th><th class="l">rule'
                   '</th><th class="l">shares used</th><th class="l">excluded</th></tr>'
                   "</thead><tbody>" + body + "</tbody></table></div>")
    if used.get("not_in_audit_log"):
        out.append(f'<p class="sub">Rounds not in the audit log (rotated away): '
                   f"{_e(', '.join(map(str, used['not_in_audit_log'][:50])))}</p>")
    return "\n".join(out)


def _delta(own: dict[str, Any]) -> str:
    """The card's δ as status and the report say it (node/ops/report_html/secure.py
    delta_text); a hand-edited card's values are shown escaped, never trusted as numbers."""
    d, acc = own.get("delta"), own.get("delta_accountant")
    if isinstance(d, float) and (acc is None or isinstance(acc, float)):
        return _e(delta_text(d, acc))
    return f"δ {_e(d)}"
