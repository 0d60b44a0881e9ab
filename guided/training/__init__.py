"""Training on Accelerate: one loop shared by the score-model and classifier trainers, the run state
(random generators, EMA, checkpoints, resume, snapshots), loss meters, the digits sample-quality probe
and the classifier's evaluation and calibration; the training recipes of the eps objective (recipes.py:
loss weightings, the preconditioned U-Net), EDM2's post-hoc EMA (posthoc_ema.py) and the done and
diverging signals with the classifier's accuracy-against-t figure (progress.py). docs/training.md."""
