"""cohortcast: Ray-distributed longitudinal disease forecasting (NAMD + CLDM).

The package imports nothing heavy at top level so that `import cohortcast` stays
cheap for CLI help, Ray workers and tests; sub-packages import what they need.
"""

__version__ = "0.1.0"
