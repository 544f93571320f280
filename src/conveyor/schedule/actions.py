"""The action IR: a schedule is a per-rank list of small, printable actions.

An :class:`Action` names one unit of work for one (stage, micro-batch):

====  ==================================================================
kind  meaning
====  ==================================================================
F     forward of the stage on the micro-batch
B     full backward (input gradients and weight gradients together)
I     input-gradient half of a split backward (zero-bubble)
W     weight-gradient half of a split backward (zero-bubble)
U     optimizer update of the stage's weights with the gradients accumulated since its
      previous update (asynchronous schedules; ``microbatch`` is the last one it includes)
====  ==================================================================

Two actions of one rank may form an **F&B pair** (``0F5&1B2``): one micro-batch's forward and
another's backward (``B`` or ``I``), issued together so that the runtime can overlap the two
chunks (their communication under each other's compute, as DualPipe does). In the program a pair
is its forward followed by its backward, the forward flagged ``overlaps_next``: everything that
reads a program as a list of actions (links, completeness, costs) sees F then B, so the messages
a pair sends are ordered as the forward's then the backward's at both ends of every link. A pair
starts only once both of its inputs are there (``validate`` checks that this cannot deadlock).

A forward may carry a weight *version* (``0F5v2``: stage 0 runs micro-batch 5 with its weights
as they were after 2 updates); its backward then uses that same version (weight stashing). An
update may carry one too (``0U3v2``): no later forward of the stage uses an older version, so
older ones can be dropped once their backwards are done.

A :class:`Schedule` holds one action list per rank plus the placement of stages on ranks.
Communication is *not* written in the program: it follows from it (see ``links.py``), so the
sending and the receiving rank always derive the same message order.

The text form is one line per rank, actions separated by spaces, ``<stage><kind><microbatch>``,
a pair's two actions joined by ``&``::

    0F0 0F1 0B0 0B1
    1F0 1B0 1F1 1B1
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["Action", "Schedule", "StreamFn", "FORWARD", "BACKWARD", "INPUT_GRAD", "WEIGHT_GRAD", "UPDATE", "PAIR_JOIN"]

FORWARD = "F"
BACKWARD = "B"
INPUT_GRAD = "I"
WEIGHT_GRAD = "W"
UPDATE = "U"
KINDS = (FORWARD, BACKWARD, INPUT_GRAD, WEIGHT_GRAD, UPDATE)
PAIR_JOIN = "&"  # joins the forward and the backward of an F&B pair in the text form

_ACTION_TEXT = re.compile(r"^(\d+)([A-Z])(\d+)(?:v(\d+))?$")


@dataclass(frozen=True, slots=True)
class Action:
    """One unit of work: ``kind`` (F, B, I, W or U) for ``stage`` on ``microbatch``. A forward
    may name the weight ``version`` it runs with, an update the oldest version later forwards
    use (neither is part of the action's identity). ``overlaps_next``: this forward and the
    backward after it form an F&B pair (not part of the identity either)."""

    kind: str
    stage: int
    microbatch: int
    version: int | None = field(default=None, compare=False)
    overlaps_next: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}; expected one of {KINDS}")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"action {self} has a negative stage or micro-batch")
        if self.version is not None and (self.kind not in (FORWARD, UPDATE) or self.version < 0):
            raise ValueError(f"action {self}: only a forward or an update carries a weight version, and it is >= 0")
        if self.overlaps_next and self.kind != FORWARD:
            raise ValueError(f"action {self}: only a forward opens an F&B pair (write it first: '0F1&1B0')")

    def __str__(self) -> str:
        version = "" if self.version is None else f"v{self.version}"
        return f"{self.stage}{self.kind}{self.microbatch}{version}"

    @property
    def sends_gradient(self) -> bool:
        """Whether this action produces the gradient of the stage's inputs."""
        return self.kind in (BACKWARD, INPUT_GRAD)

    def paired(self, flag: bool = True) -> Action:
        """This action with ``overlaps_next`` set to ``flag``."""
        return Action(self.kind, self.stage, self.microbatch, self.version, flag)

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse ``"1F3"`` into ``Action("F", 1, 3)``."""
        match = _ACTION_TEXT.match(text.strip())
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: write <stage><kind><microbatch>[v<version>], e.g. '0F1', "
                "'2W0' or '1F4v2'"
            )
        stage, kind, microbatch, version = match.groups()
        return cls(kind, int(stage), int(microbatch), None if version is None else int(version))


StreamFn = Callable[[int, Callable[[int], bool]], Iterator[Action]]
"""``stream(rank, exists)``: the actions of ``rank`` over an unbounded stream of micro-batches,
generated lazily; ``exists(k)`` says whether micro-batch ``k`` is part of the stream."""


def _default_placement(n_stages: int, n_ranks: int) -> tuple[int, ...]:
    return tuple(stage % n_ranks for stage in range(n_stages))


@dataclass(frozen=True)
class Schedule:
    """A per-rank action program.

    ``ranks[r]`` is the ordered list of actions rank ``r`` executes in one step; ``placement[s]``
    is the rank that holds stage ``s`` (default: stage ``s`` on rank ``s % n_ranks``). A stage
    may be replicated: ``replicas[s]`` lists the ranks that hold it (``placement[s]`` is the
    first) and micro-batch ``k`` of stage ``s`` runs on ``replicas[s][k % len(replicas[s])]``
    (:meth:`rank_of`); replicas combine their gradients (all-reduce) when they update.
    ``name`` is informative only: the runtime never looks at it. An asynchronous schedule also
    has ``stream`` (:data:`StreamFn`), which yields the same program for a stream whose length is
    not known in advance; with ``exists = lambda k: k < n_microbatches`` it yields ``ranks[rank]``.
    """

    ranks: tuple[tuple[Action, ...], ...]
    n_stages: int
    n_microbatches: int
    placement: tuple[int, ...] = field(default=())
    name: str = "custom"
    stream: StreamFn | None = field(default=None, compare=False, repr=False)
    replicas: tuple[tuple[int, ...], ...] = field(default=())

    def __post_init__(self) -> None:
        ranks = tuple(tuple(rank) for rank in self.ranks)
        object.__setattr__(self, "ranks", ranks)
        if self.replicas:
            replicas = tuple(tuple(group) for group in self.replicas)
            if len(replicas) != self.n_stages or not all(replicas):
                raise ValueError(f"replicas lists {len(replicas)} rank groups for {self.n_stages} stages; give "
                                 "a non-empty group of ranks per stage")
            object.__setattr__(self, "replicas", replicas)
            object.__setattr__(self, "placement", tuple(group[0] for group in replicas))
        placement = tuple(self.placement) or _default_placement(self.n_stages, len(ranks))
        object.__setattr__(self, "placement", placement)
        if not self.replicas:
            object.__setattr__(self, "replicas", tuple((rank,) for rank in placement))
        if len(placement) != self.n_stages:
            raise ValueError(
                f"placement has {len(placement)} entries for {self.n_stages} stages; give one rank per stage"
            )
        for stage, group in enumerate(self.replicas):
            for rank in group:
                if not 0 <= rank < len(ranks):
                    raise ValueError(f"stage {stage} is placed on rank {rank}, but the schedule has {len(ranks)} "
                                     "ranks")
        for rank, actions in enumerate(ranks):
            for action in actions:
                if action.stage >= self.n_stages or action.microbatch >= self.n_microbatches:
                    raise ValueError(
                        f"rank {rank} action {action} is outside {self.n_stages} stages x "
                        f"{self.n_microbatches} micro-batches"
                    )
                if self.rank_of(action.stage, action.microbatch) != rank:
                    raise ValueError(
                        f"action {action} is on rank {rank} but stage {action.stage} micro-batch "
                        f"{action.microbatch} runs on rank {self.rank_of(action.stage, action.microbatch)}"
                    )

    @property
    def n_ranks(self) -> int:
        return len(self.ranks)

    def stages_of(self, rank: int) -> list[int]:
        """The stages placed on ``rank`` (as their only holder or as a replica), in increasing order."""
        return [stage for stage, group in enumerate(self.replicas) if rank in group]

    def rank_of(self, stage: int, microbatch: int) -> int:
        """The rank that runs ``stage`` on ``microbatch``."""
        group = self.replicas[stage]
        return group[microbatch % len(group)]

    @property
    def is_replicated(self) -> bool:
        return any(len(group) > 1 for group in self.replicas)

    @property
    def is_streaming(self) -> bool:
        """Whether the program updates weights itself (U actions) and can run as a stream."""
        return self.stream is not None

    @property
    def is_training(self) -> bool:
        return any(action.kind != FORWARD for actions in self.ranks for action in actions)

    def forward_only(self) -> Schedule:
        """The same program with every backward and update removed, forwards on the current
        weights (for inference)."""
        return Schedule(
            tuple(tuple(Action(FORWARD, a.stage, a.microbatch) for a in actions if a.kind == FORWARD)
                  for actions in self.ranks),
            self.n_stages,
            self.n_microbatches,
            self.placement,
            f"{self.name} (forward only)",
            replicas=self.replicas,
        )

    @property
    def has_pairs(self) -> bool:
        """Whether any rank issues an F&B pair."""
        return any(action.overlaps_next for actions in self.ranks for action in actions)

    def unpaired(self) -> Schedule:
        """The same program with every F&B pair split back into its forward and its backward."""
        if not self.has_pairs:
            return self
        return Schedule(tuple(tuple(a.paired(False) if a.overlaps_next else a for a in actions)
                              for actions in self.ranks),
                        self.n_stages, self.n_microbatches, self.placement, self.name, self.stream, self.replicas)

    # --- text form -------------------------------------------------------------------------
    def to_text(self) -> str:
        """One line per rank: ``0F0 0F1 0B0 ...``; a ``# placement:`` header when not default."""
        lines = [" ".join(_tokens(actions)) for actions in self.ranks]
        if self.is_replicated:
            lines.insert(0, "# placement: " + " ".join(",".join(map(str, group)) for group in self.replicas))
        elif self.placement != _default_placement(self.n_stages, self.n_ranks):
            lines.insert(0, "# placement: " + " ".join(str(r) for r in self.placement))
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str, name: str = "custom") -> Schedule:
        """Parse the text form; stage and micro-batch counts are read off the actions."""
        replicas: tuple[tuple[int, ...], ...] = ()
        ranks: list[list[Action]] = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("# placement:"):  # "0 1 2", or "0,1 2 3" for a stage on ranks 0 and 1
                replicas = tuple(tuple(int(r) for r in group.split(",")) for group in line.split(":", 1)[1].split())
                continue
            if not line or line.startswith("#"):
                continue
            ranks.append([action for token in line.split() for action in _parse_token(token)])
        if not ranks:
            raise ValueError("schedule text has no action lines")
        every = [a for rank in ranks for a in rank]
        n_stages = max(len(replicas), 1 + max(a.stage for a in every))
        n_microbatches = 1 + max(a.microbatch for a in every)
        return cls(tuple(tuple(r) for r in ranks), n_stages, n_microbatches, name=name, replicas=replicas)

    def grid(self) -> str:
        """A compact, aligned grid of the program (ranks as rows), for printing."""
        width = max((len(token) for actions in self.ranks for token in _tokens(actions)), default=3)
        rows = []
        for rank, actions in enumerate(self.ranks):
            cells = " ".join(token.rjust(width) for token in _tokens(actions))
            rows.append(f"rank {rank}: {cells}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return f"{self.name}: {self.n_stages} stages, {self.n_microbatches} micro-batches\n{self.grid()}"


def _tokens(actions: Sequence[Action]) -> list[str]:
    """The text tokens of one rank's actions: a pair's forward and backward joined by ``&``."""
    tokens: list[str] = []
    joined = False
    for action in actions:
        if joined:
            tokens[-1] += PAIR_JOIN + str(action)
        else:
            tokens.append(str(action))
        joined = action.overlaps_next
    return tokens


def _parse_token(token: str) -> list[Action]:
    parts = token.split(PAIR_JOIN)
    if len(parts) > 2:
        raise ValueError(f"cannot parse {token!r}: an F&B pair joins two actions, e.g. '0F3&1B1'")
    actions = [Action.parse(part) for part in parts]
    if len(actions) == 2:
        actions[0] = actions[0].paired()
    return actions


def by_rank(n_ranks: int, actions: Iterable[tuple[int, Action]]) -> tuple[tuple[Action, ...], ...]:
    """Group ``(rank, action)`` pairs into per-rank tuples, keeping their order."""
    ranks: list[list[Action]] = [[] for _ in range(n_ranks)]
    for rank, action in actions:
        ranks[rank].append(action)
    return tuple(tuple(r) for r in ranks)


def stage_actions(kinds: Sequence[str], stage: int, microbatches: Iterable[int]) -> list[Action]:
    """``[Action(k, stage, i) for i in microbatches for k in kinds]``: a small helper for generators."""
    return [Action(kind, stage, microbatch) for microbatch in microbatches for kind in kinds]
