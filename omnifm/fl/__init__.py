"""omnifm.fl: a thin federation layer (strategies, knowledge bank, partitioners,
in-process simulation)."""
from .bank import KnowledgeBank
from .client import Client, Update
from .partition import dirichlet_label_skew, modality_per_client, sample_participants
from .simulation import FLConfig, Simulation
from .strategies import STRATEGIES, Strategy, make_strategy

__all__ = ["STRATEGIES", "Client", "FLConfig", "KnowledgeBank", "Simulation", "Strategy", "Update",
           "dirichlet_label_skew", "make_strategy", "modality_per_client", "sample_participants"]
