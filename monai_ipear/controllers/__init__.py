from .base import (
    ControllerSession,
    Decision,
    FixedIterations,
    IterationController,
    SinglePass,
    controlled_refinement,
    select_samples,
    simulate_controller,
)
from .iterstop import IterStop
from .similarity import get_similarity, global_ncc, global_ncc_iirp, negative_mae, negative_mse
from .spec import controller_from_spec
from .tci import TCI, TCI_ORDERS, TCIWindow, convergence_reached, stability_reached
