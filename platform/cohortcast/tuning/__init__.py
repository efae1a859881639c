"""Ray Tune sweeps over the NAMD job (jobs/tune_namd.py)."""
