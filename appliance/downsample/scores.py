"""Model scores as data: each window's model outputs join that machine's telemetry message.

The telemetry of a window is produced when the window closes; its scores arrive a batch later
(``batch.max_delay_ms``, 20 ms by default). :class:`ScoreJoiner` holds each machine's newest
telemetry envelope until every model serving the machine has scored the message's last window,
adds ``"scores": {model: score}`` to its body and passes it on. A window that a model does not
score (outside the model's ``condition``, incomplete, a dropped row) is never waited for beyond
the machine's next message: the held message goes out, with the scores that did arrive, when the
next one comes, or at shutdown (:meth:`flush`). So telemetry is late by one batch normally and
by at most one message. Machines no model serves pass straight through.

A message may span several model windows (``telemetry.interval_s`` > 0): every score of a window
ending within its ``window`` (``start`` < end ≤ ``end``) counts. ``scores[model]`` is then the
highest of them (the most anomalous window, as in a coarsened message) and, with
``interval_stats``, ``"score_stats": {model: {"n", "max", "mean", "last"}}`` says how many
windows the model scored in the interval, their highest and mean score and the newest one. The
scores of an interval's earlier windows arrive before its message exists; they are summed up as
they come (constant memory per machine and model, whatever the interval).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from appliance.contracts import Envelope, ScoreBatch

#: Window end times closer than this (s) are the same window.
_SAME_S = 1e-6


@dataclass
class _Acc:
    """One model's scores of one message so far."""

    n: int = 0
    total: float = 0.0
    high: float = float("-inf")
    last: float = 0.0
    last_end: float = float("-inf")

    def add(self, end: float, score: float) -> None:
        self.n += 1
        self.total += score
        self.high = max(self.high, score)
        if end >= self.last_end:
            self.last, self.last_end = score, end


class ScoreJoiner:
    """Joins scores into telemetry envelopes. Called on the event loop only.

    ``models_of`` maps a machine to the names of the models serving it; ``emit`` receives the
    telemetry envelopes (the outbox), each exactly once, in window order per machine.
    ``interval_stats``: add ``score_stats`` (``telemetry.interval_s`` > 0).
    """

    def __init__(
        self,
        models_of: Mapping[str, Sequence[str]],
        emit: Callable[[Sequence[Envelope]], None],
        *,
        interval_stats: bool = False,
    ) -> None:
        self._models_of = {m: frozenset(names) for m, names in models_of.items() if names}
        self._emit = emit
        self.interval_stats = interval_stats
        self._held: dict[str, tuple[Envelope, float, dict[str, _Acc]]] = {}  # env, start, scores
        self._pending: dict[str, dict[str, _Acc]] = {}  # scores of windows not yet in a message
        self._sent_end: dict[str, float] = {}  # end of the newest message sent, per machine
        self.joined = 0  #: scores added to telemetry
        self.late_scores = 0  #: scores whose window's telemetry had already gone out

    def hold(self, envelopes: Sequence[Envelope]) -> None:
        """Telemetry envelopes (the downsampler's emit)."""
        out: list[Envelope] = []
        for env in envelopes:
            machine = str(env.body.get("machine", ""))
            if machine not in self._models_of:
                out.append(env)
                continue
            prev = self._held.pop(machine, None)
            if prev is not None:
                out.append(self._finish(machine, prev))
            window = env.body.get("window")
            start = float(window["start"]) if isinstance(window, dict) else env.ts
            pending = self._pending.pop(machine, {})
            for model, acc in list(pending.items()):
                if acc.last_end <= start + _SAME_S:  # windows that never got a message
                    self.late_scores += acc.n
                    self.joined -= acc.n
                    del pending[model]
            self._held[machine] = (env, start, pending)
        if out:
            self._emit(out)

    def on_scores(self, model: str, batch: ScoreBatch) -> None:
        """One model's scored batch: each row's score joins the message of its window."""
        out: list[Envelope] = []
        scores = batch.score.tolist()
        ends = batch.window_end.tolist()
        for machine, end, score in zip(batch.machines, ends, scores, strict=True):
            if machine not in self._models_of or end <= self._sent_end.get(machine, -1.0):
                self.late_scores += 1
                continue
            held = self._held.get(machine)
            if held is not None and end <= held[0].ts + _SAME_S:
                if end <= held[1] + _SAME_S:  # before the held message's window
                    self.late_scores += 1
                    continue
                held[2].setdefault(model, _Acc()).add(end, score)
                self.joined += 1
                if self._complete(machine, held):
                    out.append(self._finish(machine, self._held.pop(machine)))
            else:  # a window whose message is not out yet (an interval's earlier windows)
                self._pending.setdefault(machine, {}).setdefault(model, _Acc()).add(end, score)
                self.joined += 1
        if out:
            self._emit(out)

    def _complete(self, machine: str, held: tuple[Envelope, float, dict[str, _Acc]]) -> bool:
        """Whether every model serving ``machine`` has scored the held message's last window."""
        env, _, accs = held
        models = self._models_of[machine]
        return all(m in accs and abs(accs[m].last_end - env.ts) <= _SAME_S for m in models)

    def _finish(self, machine: str, held: tuple[Envelope, float, dict[str, _Acc]]) -> Envelope:
        env, _, accs = held
        self._sent_end[machine] = env.ts
        scored = {m: a for m, a in accs.items() if a.n}
        if scored:
            env.body["scores"] = {m: a.high for m, a in scored.items()}
            if self.interval_stats:
                env.body["score_stats"] = {
                    m: {"n": a.n, "max": a.high, "mean": a.total / a.n, "last": a.last}
                    for m, a in scored.items()
                }
        return env

    def flush(self) -> None:
        """Pass on every held message (at shutdown, after the last scores)."""
        held, self._held = self._held, {}
        out = [self._finish(machine, h) for machine, h in held.items()]
        if out:
            self._emit(out)
