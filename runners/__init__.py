"""Running sweeps: the layer above the spec (sweeps/), the models (models/) and the fits (fitting/).

Its rooms follow the one-way data flow, each importing only the rooms before it (tests/test_layers.py):
data/ (documents -> tokens), tracking/ (MLflow names, run writer, points collector), training/ (one trial),
scheduling/ (trials on Ray), and the front door, cli.py and pipeline.py (spec -> trials -> Ray -> MLflow ->
points -> fits -> results/), with planview.py (the plan at the terminal's width). bench/ measures the others and runs them on the GPU machine (bench/device/).
"""
