"""Fitness: lm-eval tasks scored per model and combined into one weighted number.

``terms`` is light (no lm-eval import); ``evaluator`` sets the offline environment and
imports lm-eval, so import it only where models are scored.
"""
