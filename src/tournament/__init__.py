"""The tournament reference system, built on Accord.

Two services with their own databases: the **Match Engine** (tournaments and
match records) and the **Score Engine** (event-sourced score ledgers and a
leaderboard projection). "Create tournament" is a saga (orchestrated or
choreographed); ``match.recorded`` flows through the outbox into the Score
Engine's inbox. ``accord up`` runs it; ``accord demo`` shows it.
"""

from tournament.config import StackConfig
from tournament.supervisor import Supervisor

__all__ = ["StackConfig", "Supervisor"]
