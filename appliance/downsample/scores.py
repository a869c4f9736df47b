"""Model scores as data: each window's model outputs join that machine's telemetry message.

The telemetry of a window is produced when the window closes; its scores arrive a batch later
(``batch.max_delay_ms``, 20 ms by default). :class:`ScoreJoiner` holds each machine's newest
telemetry envelope until every model serving the machine has scored that window, adds
``"scores": {model: score}`` to its body and passes it on. A window that a model does not score
(outside the model's ``condition``, incomplete, a dropped row) is never waited for beyond the
machine's next window: the held message goes out, with the scores that did arrive, when the
next one comes, or at shutdown (:meth:`flush`). So telemetry is late by one batch normally and
by at most one window. Machines no model serves pass straight through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from appliance.contracts import Envelope, ScoreBatch


class ScoreJoiner:
    """Joins scores into telemetry envelopes. Called on the event loop only.

    ``models_of`` maps a machine to the names of the models serving it; ``emit`` receives the
    telemetry envelopes (the outbox), each exactly once, in window order per machine.
    """

    def __init__(
        self,
        models_of: Mapping[str, Sequence[str]],
        emit: Callable[[Sequence[Envelope]], None],
    ) -> None:
        self._models_of = {m: frozenset(names) for m, names in models_of.items() if names}
        self._emit = emit
        self._held: dict[str, Envelope] = {}
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
                out.append(prev)
            self._held[machine] = env
        if out:
            self._emit(out)

    def on_scores(self, model: str, batch: ScoreBatch) -> None:
        """One model's scored batch: add each row's score to its window's held telemetry."""
        out: list[Envelope] = []
        scores = batch.score.tolist()
        ends = batch.window_end.tolist()
        for machine, end, score in zip(batch.machines, ends, scores, strict=True):
            env = self._held.get(machine)
            if env is None or abs(env.ts - end) > 1e-6:
                self.late_scores += 1
                continue
            joined = env.body.setdefault("scores", {})
            assert isinstance(joined, dict)
            joined[model] = score
            self.joined += 1
            if set(joined) >= self._models_of[machine]:
                out.append(self._held.pop(machine))
        if out:
            self._emit(out)

    def flush(self) -> None:
        """Pass on every held message (at shutdown, after the last scores)."""
        held, self._held = list(self._held.values()), {}
        if held:
            self._emit(held)
