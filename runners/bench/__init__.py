"""Benchmarks, and the scripts that run them and sweeps on the GPU machine (device/).

step.py times the whole training step (tokens/s, MFU), moe_layer.py the MoE layer, fit.py the fits,
sweep.py and sweepstats.py whole sweeps; log.py is the one writer of results/benchmarks.jsonl (its fields:
date, device, commit, benchmark, metric, value, unit, config). It sits beside the other rooms, importing
them; nothing imports it.
"""
