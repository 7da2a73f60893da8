"""The one judgement (docs/measurement.md): evidence in, outcome, `blocked`, finding and reasons out.

Pure: no I/O and no clock. The engine gathers an `Observation` per measurement (the
response or failure, every attempt with who overtook whom, the endpoint's datagram
loss, the control's answer, identity and canary checks, the expectation) and this
module turns it into a `Judgement`. A leak or an overblock is a claim others act on,
so every rule that could make one errs towards `null` when the evidence is short.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from probe.answers import AddressCheck, Manipulation, Reach, addresses_of, manipulated, reach_of
from probe.classify import PROHIBITED, ControlResult, Verdict, verdict_of
from probe.fingerprints import Fingerprints
from probe.identity import Identity
from probe.model import POLICY_EDE, Expectation, Finding, Outcome, Transport
from probe.transports.base import Failure, Loss
from probe.wire import parse_response

__all__ = [
    "LOSS_BOUND",
    "Attempt",
    "Judgement",
    "Observation",
    "asking_again_cannot_change",
    "blocked_of",
    "control_checks_matter",
    "finding_of",
    "judge",
    "known_blockpage",
    "silence_proven",
    "waits_for_the_run",
]

# (d): a silence over UDP counts only if loss explains it with probability below this.
LOSS_BOUND = 1e-4
_NEGATIVE = (Outcome.NXDOMAIN, Outcome.NODATA, Outcome.REFUSED)
_VAGUE = "vbw"  # OONI's scope for fingerprints that tell a filter answered, not what it serves


# Attempt, Observation and Judgement are values nobody changes, but not frozen: one of each is
# built per measurement, and a frozen dataclass's __init__ pays object.__setattr__ per field
# (about 4 µs for Observation's 20), a sizeable share of the engine's own cost per query.
@dataclass(slots=True)
class Attempt:
    """One pass of one query: how often it was sent, on which channel, and what came of it."""

    number: int  # 1 for the first pass, 2 for the confirmation pass
    sends: int
    channel: str | None
    response: bool
    failure: Failure | None = None
    overtaken: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pass": self.number, "sends": self.sends, "channel": self.channel}
        if self.response:
            out["result"] = "response"
        elif self.failure is not None:
            out["result"] = str(self.failure.kind)
            out["phase"] = str(self.failure.phase)
            out["error"] = self.failure.text
            if self.failure.silence:
                out["overtaken"] = self.overtaken
        return out


@dataclass(slots=True)
class Observation:
    """What the judgement of one measurement depends on, gathered during the run."""

    domain: str
    qtype: str
    transport: Transport
    response: bytes | None
    failure: Failure | None
    attempts: tuple[Attempt, ...] = ()
    loss: Loss | None = None  # the endpoint's datagram loss in the run (UDP only)
    ede18_name_specific: bool = False
    control: ControlResult | None = None
    expected: Expectation | None = None
    expected_by: dict[str, Any] | None = None
    canary: bool = False
    identity: Identity | None = None
    operator: str | None = None
    canary_failure: str | None = None
    late: tuple[bytes, ...] = ()
    # Answer checks (None: not checked): the resolver's answered addresses, the control's
    # (checked only when they can change the verdict), and whether both answered alike.
    checks: tuple[AddressCheck, ...] | None = None
    control_checks: tuple[AddressCheck, ...] = ()
    same_addresses: bool = False


@dataclass(slots=True)
class Judgement:
    verdict: Verdict
    blocked: bool | None
    finding: Finding | None
    intercepted: bool
    evidence: dict[str, Any] = field(default_factory=dict)
    reach: Reach = Reach.UNCHECKED


def finding_of(expected: Expectation | None, blocked: bool | None) -> Finding | None:
    """The finding table of docs/measurement.md."""
    if expected is None:
        return None
    if blocked is None:
        return Finding.INCONCLUSIVE
    if expected is Expectation.BLOCKED:
        return Finding.ENFORCED if blocked else Finding.LEAK
    return Finding.OVERBLOCK if blocked else Finding.OK


def silence_proven(
    transport: Transport, attempts: tuple[Attempt, ...], loss: Loss | None
) -> tuple[bool, str, dict[str, Any]]:
    """Whether a silence counts as a block, (a) to (d) of docs/measurement.md, with the reason."""
    passes = {a.number for a in attempts}
    if not {1, 2} <= passes:
        return False, "not asked again in a confirmation pass", {}
    for a in attempts:
        if a.response:
            return False, f"answered in pass {a.number}", {}
        if a.failure is None or not a.failure.silence:
            what = a.failure.text if a.failure is not None else "no attempt"
            return False, f"pass {a.number} failed outside the DNS round trip ({what})", {}
        if not a.overtaken:
            return False, f"in pass {a.number} nothing sent after it was answered while it waited", {}
    if transport is not Transport.UDP:
        return True, "silent in both passes while later queries on the same connection were answered", {}
    n = sum(a.sends for a in attempts)
    rate = loss.rate if loss is not None else 1.0
    chance = rate**n
    facts = {
        "rate": round(rate, 6),
        "sends_seen": loss.sends if loss else 0,
        "lost_seen": loss.lost if loss else 0,
        "n": n,
        "chance": chance,
    }
    if chance >= LOSS_BOUND:
        return False, f"loss explains it: {rate:.3f}^{n} = {chance:.2g} is not below {LOSS_BOUND:g}", facts
    return (
        True,
        f"silent to {n} sends while later queries were answered; loss {rate:.3f}^{n} = {chance:.2g}",
        facts,
    )


def blocked_of(verdict: Verdict, control: ControlResult | None, silence: bool) -> bool | None:
    """`blocked` per docs/measurement.md; `silence` is `silence_proven`'s answer for a timeout."""
    outcome = verdict.outcome
    if outcome in (Outcome.EDE_BLOCKED, Outcome.SINKHOLE):
        return True
    if outcome is Outcome.RESOLVED:
        return False
    if outcome in _NEGATIVE:
        if any(e.code not in POLICY_EDE for e in verdict.ede):
            return None  # the resolver explained a non-policy failure (EDE 22, an EDE 18 on everything)
        return True if control is not None and control.verdict.has_records else None
    if outcome is Outcome.TIMEOUT:
        # Stricter than the letter of the contract, never looser: as with NXDOMAIN, a name
        # the control cannot resolve either (its servers are down) is no evidence of a block.
        has_records = control is not None and control.verdict.has_records
        return True if silence and has_records else None
    # SERVFAIL without a policy EDE is what a resolver says when its upstream fails; an
    # error is the transport's failure. Neither is evidence of a block.
    return None


def waits_for_the_run(response: bytes, qname: str, qtype: str) -> bool:
    """Whether a response's judgement must wait for the rest of the run: it carries EDE 18,
    which blocks this name only if the same endpoint answered others without it (rule 2)."""
    # An EDE 18 option holds the bytes 00 0f ... 00 12; without them nothing to parse twice.
    if b"\x00\x0f" not in response or b"\x00\x12" not in response:
        return False
    try:
        ede = parse_response(response, qname, qtype).ede
    except Exception:  # noqa: BLE001 - a hostile answer is classified (by `judge`), never a crash
        return False  # malformed: judged as such, nothing to wait for
    return any(e.code == PROHIBITED for e in ede)


def asking_again_cannot_change(failure: Failure | None) -> bool:
    """A failure the confirmation pass need not ask again: the resolver's certificate does not
    name it, and a second connection would show the same certificate."""
    return failure is not None and failure.text.startswith("tls: certificate verify failed")


def control_checks_matter(checks: tuple[AddressCheck, ...] | list[AddressCheck]) -> bool:
    """Whether the control's addresses must be checked too: only when every one of the
    resolver's addresses showed a certificate not valid for the name (`manipulated` looks at
    them in no other case), so a genuine answer costs no connection to the control's."""
    return bool(checks) and all(c.presents_invalid_cert for c in checks)


def judge(obs: Observation, fingerprints: Fingerprints) -> Judgement:
    """Outcome, `blocked`, finding and the evidence of why, for one measurement."""
    verdict = verdict_of(
        obs.response, obs.failure, obs.domain, obs.qtype, fingerprints, obs.ede18_name_specific
    )
    evidence: dict[str, Any] = dict(verdict.evidence)
    if obs.attempts:
        evidence["attempts"] = [a.to_json() for a in obs.attempts]
        evidence["pass"] = obs.attempts[-1].number
    silence = False
    if verdict.outcome is Outcome.TIMEOUT:
        silence, why, loss = silence_proven(obs.transport, obs.attempts, obs.loss)
        evidence["silence"] = {"proven": silence, "reason": why}
        evidence["overtaken"] = bool(obs.attempts) and all(a.overtaken for a in obs.attempts)
        if loss:
            evidence["loss"] = loss
    blocked = blocked_of(verdict, obs.control, silence)
    verdict, blocked, reach = _reach(obs, verdict, blocked, evidence, fingerprints)
    finding = finding_of(obs.expected, blocked)
    intercepted = obs.identity is not None and obs.identity.ok is False
    if obs.identity is not None:
        evidence["identity"] = obs.identity.to_json()
    if finding is not None and not obs.canary:
        # Someone else's answers, or a resolver that failed its canaries, prove nothing
        # about the order: say so rather than report a leak or an enforcement.
        if intercepted:
            finding = Finding.INCONCLUSIVE
            evidence["inconclusive_reason"] = f"answered by someone other than {obs.operator}"
        elif obs.canary_failure is not None:
            finding = Finding.INCONCLUSIVE
            evidence["inconclusive_reason"] = obs.canary_failure
    if obs.late:
        late = [_late(obs, w) for w in obs.late]
        evidence["late_answers"] = late
        evidence["injected"] = any(la.get("answers") != list(verdict.answers) for la in late)
    if verdict.nsid:
        evidence["nsid"] = verdict.nsid
    if obs.expected_by:
        evidence["expected_by"] = obs.expected_by
    return Judgement(verdict, blocked, finding, intercepted, evidence, reach)


def _reach(
    obs: Observation,
    verdict: Verdict,
    blocked: bool | None,
    evidence: dict[str, Any],
    fingerprints: Fingerprints,
) -> tuple[Verdict, bool | None, Reach]:
    """`reach`: from the answer checks of a resolved answer, or from a known block page."""
    if obs.checks is not None and verdict.outcome is Outcome.RESOLVED:
        return _answer_checks(obs, verdict, blocked, evidence)
    page = known_blockpage(verdict, obs.qtype, fingerprints)
    if page is None:
        return verdict, blocked, Reach.UNCHECKED
    # A known block page needs no connection to know what a user meets there.
    evidence["blockpage"] = page
    return verdict, blocked, Reach.BLOCKPAGE


def known_blockpage(verdict: Verdict, qtype: str, fingerprints: Fingerprints) -> dict[str, str] | None:
    """The fingerprint that makes a sinkhole a known block page (`reach: blockpage`), or None.

    A CNAME target or an answered address (IPv4-mapped judged as IPv4) that a fingerprint names
    is a page a user would meet: one is enough, since a browser tries the next address when one
    fails. A null route (0.0.0.0, ::) or loopback address is a sinkhole but no page, even where
    OONI lists it (as its "vague but works" rows, scope `vbw`, such as 1.2.3.4, which say a
    filter answered, not that a page is there): a user meets a connection error on their own
    machine, and the probe does not connect there to find out, so reach stays `unchecked`.
    Private addresses that a fingerprint names do count: ISPs serve block pages from them.
    """
    if verdict.outcome is not Outcome.SINKHOLE:
        return None
    for target in verdict.cname:
        fp = fingerprints.name(target)
        if fp is not None and fp.scope != _VAGUE:
            return {"match": target, "source": fp.describe()}
    for address in addresses_of(qtype, verdict.answers):
        ip = ipaddress.ip_address(address)
        if ip.is_unspecified or ip.is_loopback:
            continue
        fp = fingerprints.address(ip)
        if fp is not None and fp.scope != _VAGUE:
            return {"match": address, "source": fp.describe()}
    return None


def _answer_checks(
    obs: Observation, verdict: Verdict, blocked: bool | None, evidence: dict[str, Any]
) -> tuple[Verdict, bool | None, Reach]:
    """docs/measurement.md, "Answer checks": certificates at the answered addresses.

    Only a certificate not valid for the name, at every address, while the control's answer
    validates, makes a resolved answer a block; a failed connection never does.
    """
    assert obs.checks is not None
    manipulation = manipulated(obs.checks, obs.control_checks, obs.same_addresses)
    evidence["answer_checks"] = [c.to_json() for c in obs.checks]
    if obs.control_checks:
        evidence["control_checks"] = [c.to_json() for c in obs.control_checks]
    evidence["manipulation"] = str(manipulation)
    if manipulation is Manipulation.MANIPULATED:
        cert = next((c.cert for c in obs.checks if c.cert is not None), None)
        match = ", ".join(cert.names) if cert is not None and cert.names else obs.checks[0].address
        verdict = dataclasses.replace(
            verdict, outcome=Outcome.SINKHOLE, sinkhole={"match": match, "source": "tls"}
        )
        blocked = True
    elif manipulation is Manipulation.NOT_MANIPULATED:
        evidence["verified"] = True
    elif manipulation is Manipulation.CANNOT_TELL:
        blocked = None  # perhaps a block page no fingerprint knows
    return verdict, blocked, reach_of(obs.checks, manipulation)


def _late(obs: Observation, wire: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"wire": base64.b64encode(wire).decode("ascii")}
    try:
        p = parse_response(wire, obs.domain, obs.qtype)
    except Exception:  # noqa: BLE001 - a hostile racing answer is evidence, never a crash
        out["error"] = "malformed"
        return out
    out.update(rcode=p.rcode, answers=list(p.answers))
    return out
