"""MLflow: where runs go, the job's parent/child runs, the Forecaster as a pyfunc model.
Rank-0 logging from Ray Train workers is training.stage_tracker (training sits below)."""
