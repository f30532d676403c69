"""Control plane: feedback records, threshold tuning, ramp adjustment, accuracy guard, controller actor.

Everything here except ``get_or_create_controller`` / ``ControllerClient`` is pure Python + numpy;
Ray is imported only when those are used.
"""
from .controller import (
    DEFAULT_NAMESPACE,
    ControllerClient,
    ControllerConfig,
    ControllerState,
    ThresholdController,
    get_or_create_controller,
)
from .guard import AccuracyGuard, GuardAction, back_off, is_violation, violating_ramps
from .ramp_adjust import RampBudget, RampDecision, adjust_ramps, candidate_gains, ramp_utilities, tail_overhead
from .records import CLOSED, CostModel, FeedbackWindow
from .tuner import Outcome, TuneResult, evaluate, exit_costs, static_threshold_search, tune_thresholds

__all__ = [
    "CLOSED",
    "CostModel",
    "FeedbackWindow",
    "Outcome",
    "TuneResult",
    "evaluate",
    "exit_costs",
    "tune_thresholds",
    "static_threshold_search",
    "RampBudget",
    "RampDecision",
    "ramp_utilities",
    "tail_overhead",
    "candidate_gains",
    "adjust_ramps",
    "GuardAction",
    "AccuracyGuard",
    "is_violation",
    "violating_ramps",
    "back_off",
    "DEFAULT_NAMESPACE",
    "ControllerConfig",
    "ControllerState",
    "ThresholdController",
    "ControllerClient",
    "get_or_create_controller",
]
