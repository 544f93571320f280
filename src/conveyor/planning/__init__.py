"""Profile a model, then plan its pipeline: split points, schedule and micro-batch count.

::

    prof = conveyor.profile(model, (x,), target=y, loss_fn=loss)   # per-block costs + link
    best = conveyor.plan(prof, n_ranks=4, memory_per_rank=8 << 30, batch_size=32)
    print(best.table()); print(best.explain())

See docs/planning.md for the cost model.
"""

from .costs import MemoryEstimate
from .profile import BlockProfile, Cost, Link, Profile, profile
from .search import Candidate, Plan, plan

__all__ = ["BlockProfile", "Candidate", "Cost", "Link", "MemoryEstimate", "Plan", "Profile", "plan", "profile"]
