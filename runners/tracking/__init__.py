"""Tracking: everything about MLflow, and the points table read back from it.

names.py is the one place MLflow names are defined (tags, params, metrics, statuses); runs.py creates a
sweep's experiment, parent run and one child run per trial, and holds the sink that trials log through;
labels.py names trial runs by what they are; summary.py puts the fitted law on the parent run; collect.py reads
a sweep's runs back into the points table whose columns fitting/points.py defines; results.py puts a sweep's
results folder on its parent run and pulls it back. Its contract is those names and the runs they describe:
training writes into them, the front door reads from them.
"""
