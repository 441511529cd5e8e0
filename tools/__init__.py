"""Tools beside the main path (train_jem.py, sample.py, eval_jem.py), each run from the repository
root as a module, so that it imports the library modules there:

    python -m tools.train_classifier ...   # the sample judge: a plain CNN trained on real data
    python -m tools.score_samples ...      # judge accuracy of a folder of samples
    python -m tools.plot_run ...           # curves over a run's checkpoints
    python -m tools.compare_runs ...       # metric logs of several runs side by side
    python -m tools.bench ...              # seconds per training step, fast paths A/B
    python -m tools.fault_drill ...        # divergences, kills and damaged checkpoints, end to end
"""
