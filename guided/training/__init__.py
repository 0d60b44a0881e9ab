"""Training on Accelerate: one loop shared by the score-model and classifier trainers, the run state
(random generators, EMA, checkpoints, resume, snapshots), loss meters, the digits sample-quality probe
and the classifier's evaluation and calibration."""
