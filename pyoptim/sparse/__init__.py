"""Sparse sub-tensor update (Lin et al., "On-Device Training Under 256KB Memory", 2022): train
only some layers and, inside them, only a channel sub-tensor, with a backward that skips every
gradient nobody needs — so the memory and time savings are real in PyTorch."""
from .modules import MaskReLU6, SparseConv2d, SparseLinear, trained_channels
from .reorder import reorder_channels
from .scheme import SparseUpdateScheme, apply_scheme, fuse_bn, layer_names

__all__ = ["MaskReLU6", "SparseConv2d", "SparseLinear", "SparseUpdateScheme", "apply_scheme", "fuse_bn",
           "layer_names", "reorder_channels", "trained_channels"]
from .memory import measure_memory, memory_estimate, scheme_masks  # noqa: E402
__all__ += ["measure_memory", "memory_estimate", "scheme_masks"]
from .search import (SearchResult, SearchSpace, Scheme, evaluations_to_reach,  # noqa: E402
                     evolution_search, exact_search, random_search)
__all__ += ["SearchResult", "SearchSpace", "Scheme", "evaluations_to_reach", "evolution_search",
            "exact_search", "random_search"]
from .tasks import TASKS, PretrainConfig, Task, finetune, make_task, pretrain  # noqa: E402
from .contribution import ContributionTables, contribution, search_space  # noqa: E402
__all__ += ["TASKS", "PretrainConfig", "Task", "finetune", "make_task", "pretrain",
            "ContributionTables", "contribution", "search_space"]
from .plugin import SparseUpdate, format_bytes, parse_bytes, scheme_for_budget  # noqa: E402
__all__ += ["SparseUpdate", "format_bytes", "parse_bytes", "scheme_for_budget"]
