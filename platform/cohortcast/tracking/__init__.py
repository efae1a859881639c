"""MLflow: where runs go, the job's parent/child runs, rank-0 logging from Ray Train workers."""
