"""Evaluators trained on ground-truth renders only, and the paper's metrics plus ground-truth ones.

`train_evaluators(world, cfg, out_dir)` -> `Evaluators` (score / frechet / face_diversity / paper_metrics);
`scores` holds the metric math (Fréchet distance, motion measures, bootstrap intervals).
"""
from lofa.metrics.evaluators import EvalConfig, Evaluators, evaluator_sanity_table, train_evaluators
from lofa.metrics.scores import (bootstrap_ci, calibrate_motion_threshold, dynamic_degree, frechet_distance,
                                 motion_magnitude, motion_smoothness)

__all__ = ["EvalConfig", "Evaluators", "bootstrap_ci", "calibrate_motion_threshold", "dynamic_degree",
           "evaluator_sanity_table", "frechet_distance", "motion_magnitude", "motion_smoothness",
           "train_evaluators"]
