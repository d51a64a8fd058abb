"""Model-agnostic MoE toolkit: routers, dispatchers, stacked experts, losses, and the layers composing them."""

from .dispatch import (
    DISPATCHERS,
    DenseDispatcher,
    Dispatcher,
    EinsumDispatcher,
    NaiveDispatcher,
    SortDispatcher,
    capacity_keep_mask,
    create_dispatcher,
    resolve_capacity,
)
from .experts import FiLMExperts, LinearExperts, MlpExperts
from .layer import MoEAttention, MoEAux, MoEFiLM, MoELayer, MoEMlp
from .losses import (
    cv_squared,
    importance_load_loss,
    mutual_information_loss,
    router_z_loss,
    switch_load_balance_loss,
    task_expert_probs,
)
from .router import (
    MultiGateRouter,
    RouterOutput,
    SharedRouter,
    TaskEmbeddingRouter,
    TopKGate,
    UncertaintyRouter,
    create_router,
)
from .upcycle import lead_logit, upcycle_attention, upcycle_mlp

__all__ = [
    "DISPATCHERS",
    "DenseDispatcher",
    "Dispatcher",
    "EinsumDispatcher",
    "NaiveDispatcher",
    "SortDispatcher",
    "capacity_keep_mask",
    "create_dispatcher",
    "resolve_capacity",
    "FiLMExperts",
    "LinearExperts",
    "MlpExperts",
    "MoEAttention",
    "MoEAux",
    "MoEFiLM",
    "MoELayer",
    "MoEMlp",
    "cv_squared",
    "importance_load_loss",
    "mutual_information_loss",
    "router_z_loss",
    "switch_load_balance_loss",
    "task_expert_probs",
    "MultiGateRouter",
    "RouterOutput",
    "SharedRouter",
    "TaskEmbeddingRouter",
    "UncertaintyRouter",
    "TopKGate",
    "create_router",
    "lead_logit",
    "upcycle_attention",
    "upcycle_mlp",
]
