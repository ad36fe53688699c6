"""Judging explanations: faithfulness and localisation metrics, the evaluation run, the ground-truth data."""
